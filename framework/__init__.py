"""Sapling: structured pruning + knowledge distillation + quantization of LLMs."""

__version__ = "0.1.0"
