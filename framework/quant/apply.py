"""Quantize a trained student and export it: the library behind `sapling quantize`, `hooks.post=[quantize]`
and the pipeline (all three in `sapling.recipes`).

`quantize_student` is the one recipe all three run: check every linear can be stored (before any work),
take calibration batches from the training split, optionally the distillation-guided saliency from the
teacher, quantize layer by layer (GPTQ) or round to nearest, write the compressed-tensors checkpoint,
then load that checkpoint back with transformers and measure its validation perplexity (the number
reported is the served model's, not a simulation's).

Under torchrun with ZeRO the post-hook (`sapling.recipes.hooks.quantize_hook`) quantizes on rank 0 from the consolidated checkpoint the
training loop saved (`output_dir/model`); the other ranks wait on a barrier without a deadline (GPTQ
of a large model takes longer than a collective's timeout) and re-raise rank 0's error if it failed.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from sapling.data.calibration import calibration_batches
from sapling.errors import ConfigError
from sapling.quant.export import checkpoint_bytes, export_compressed
from sapling.quant.layerwise import plan_targets, quantize_model
from sapling.quant.numerics import QuantSpec, spec_from_config

log = logging.getLogger("sapling")


def resolve_method(quant_cfg: Any) -> str:
    """`auto` is GPTQ, except after quantization-aware training, whose export is RTN (what was trained)."""
    if quant_cfg.method != "auto":
        return quant_cfg.method
    return "rtn" if quant_cfg.aware else "gptq"


def cast_parameters(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast parameters and persistent buffers to `dtype` in place, as a checkpoint saved in `dtype` loads.

    `model.to(dtype)` would also cast non-persistent buffers such as rotary `inv_freq`, which a loaded
    checkpoint recomputes in float32; the logits would then differ from the served model's.
    """
    for p in model.parameters():
        p.data = p.data.to(dtype)
    for module in model.modules():
        for name, buf in list(module._buffers.items()):
            if buf is not None and buf.is_floating_point() and name not in module._non_persistent_buffers_set:
                module._buffers[name] = buf.to(dtype)
    return model


def load_quantized(model_dir: str | Path, device: torch.device | str = "cpu") -> torch.nn.Module:
    """A compressed-tensors export loaded by transformers with its weights decompressed (for evaluation)."""
    import warnings

    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    with warnings.catch_warnings():  # "the checkpoint's own quantization_config is used": that is intended
        warnings.filterwarnings("ignore", message=".*quantization_config.*")
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), quantization_config=CompressedTensorsConfig(
            dequantize=True))
    return cpu_float32(model.to(device))


def cpu_float32(model: torch.nn.Module) -> torch.nn.Module:
    """On CPU, the 16-bit parameters upcast to float32 in place (exactly: same values, same quality). CPUs
    without native 16-bit matmuls run bf16 several times slower than fp32; GPUs keep the served dtype."""
    if next(model.parameters()).device.type == "cpu":
        cast_parameters(model, torch.float32)
    return model


def sixteen_bit_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's weights stored in 16 bits (tied weights once): the unquantized baseline's size."""
    return 2 * sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def quantize_student(cfg: DictConfig, model: torch.nn.Module, *, teacher: torch.nn.Module | None, data: Any,
                     tokenizer: Any, device: torch.device, out_dir: str | Path, metrics: Any) -> dict[str, Any]:
    """Quantize `model` in place per `cfg.quant` and export it to `out_dir`; returns the summary row.

    `data`: PackedData (train split for calibration, val split for the perplexities) or None (RTN only).
    `teacher`: needed with `quant.guided`. `device`: where the layers are quantized; with `quant.offload` the
    model stays where it is (CPU memory) and each decoder layer visits `device` in turn.
    """
    from sapling.eval.perplexity import evaluate_lm

    q = cfg.quant
    spec: QuantSpec = spec_from_config(q)
    method = resolve_method(q)
    targets, skipped, ignored = plan_targets(model, spec, list(q.ignore), q.skip_incompatible)  # fails early
    if skipped:
        log.warning("quantize: %d linear(s) left 16-bit (input width not a multiple of %s): %s", len(skipped),
                    spec.group_size, ", ".join(skipped[:4]) + (" ..." if len(skipped) > 4 else ""))
    ev = cfg.eval
    evaluate = q.eval and data is not None and len(data.val) > 0
    home = next(model.parameters()).device  # with quant.offload the model stays here (CPU) and so does evaluation

    def val(m: torch.nn.Module) -> dict[str, float]:
        return evaluate_lm(m.to(home), data.val, micro_batch_size=ev.micro_batch_size, max_batches=ev.batches,
                           device=home, progress=cfg.trainer.progress, desc="quantize: validation")

    summary: dict[str, Any] = {"scheme": q.scheme, "dtype": q.dtype, "format": spec.label, "method": method, "guided": bool(q.guided),
                               "act_order": bool(q.act_order) if method == "gptq" else None,
                               "quantized_linears": len(targets), "skipped": skipped,
                               "bytes_16bit": sixteen_bit_bytes(model)}
    if evaluate:
        import copy

        summary["val_16bit"] = val(cpu_float32(cast_parameters(copy.deepcopy(model), spec.scale_dtype)))
    # quantize_s: calibration, saliency, the layer-by-layer quantization and the export (not the validations)
    t0 = time.perf_counter()
    batches: list[torch.Tensor] = []
    if method == "gptq":
        if data is None or len(data.train) == 0:
            raise ConfigError("data.files", None, "GPTQ needs calibration data", "pass data.files=[...] (or use quant.method=rtn)")
        c = q.calibration
        batches = [b["input_ids"] for b in calibration_batches(data.train, c.samples, c.batch_size,
                                                                torch.device("cpu"), seed=cfg.seed)]
    saliency = None
    if q.guided:
        from sapling.quant.guided import distillation_saliency

        if teacher is None:
            raise ConfigError("quant.guided", True, "needs the teacher for the distillation saliency",
                              "pass teacher.path=<teacher checkpoint>, or drop quant.guided")
        from sapling.models import unwrap_hf

        aligned = (unwrap_hf(model).config.vocab_size != unwrap_hf(teacher).config.vocab_size
                   and tokenizer is not None)
        t_saliency = time.perf_counter()
        saliency = distillation_saliency(model, teacher, batches, targets, groups=q.guided_groups,
                                         divergence=cfg.distill.divergence, temperature=cfg.distill.temperature,
                                         progress=cfg.trainer.progress, vocab=len(tokenizer) if aligned else None)
        summary["saliency_s"] = time.perf_counter() - t_saliency

    def on_layer(index: int, seconds: float) -> None:
        metrics.log({"event": "quantize_layer", "layer": index, "wall_s": seconds})

    result = quantize_model(model, spec, method=method, batches=batches, device=device, ignore=list(q.ignore),
                            skip_incompatible=q.skip_incompatible, block_size=q.block_size, damp=q.damp,
                            act_order=q.act_order, observer=q.observer, saliency=saliency, offload=q.offload,
                            progress=cfg.trainer.progress, on_layer=on_layer)
    t_export = time.perf_counter()
    out = export_compressed(model, result, out_dir, tokenizer)
    now = time.perf_counter()
    summary.update({"quantize_s": now - t0, "export_s": now - t_export, "bytes": checkpoint_bytes(out),
                    "model_dir": str(out)})
    if evaluate:
        served = load_quantized(out, home)
        summary["val_quantized"] = val(served)
        del served
    metrics.log({"event": "quantize", **{k: v for k, v in summary.items() if k != "skipped"},
                 "skipped": len(skipped)})
    return summary


def summary_rows(summary: dict[str, Any]) -> list[list[str]]:
    """Report rows (16-bit, quantized) for a quantize summary."""

    def ppl(key: str) -> tuple[str, str]:
        v = summary.get(key)
        return (f"{v['loss']:.4f}", f"{v['ppl']:.2f}") if v else ("-", "-")

    method = summary["method"] + (" + guided" if summary["guided"] else "")
    return [
        [f"16-bit ({summary['dtype']})", "-", *ppl("val_16bit"),
         f"{summary['bytes_16bit'] / 1e6:.2f} (computed)"],
        [f"{summary['format']} {method}", summary["scheme"], *ppl("val_quantized"), f"{summary['bytes'] / 1e6:.2f}"],
    ]


SUMMARY_COLUMNS = ["model", "scheme", "val loss (nats/token)", "val perplexity", "weights on disk (MB)"]


def quantized_ppl_note(summary: dict[str, Any]) -> str:
    """`ppl 16-bit -> quantized (+x%)` for logs."""
    a, b = summary.get("val_16bit"), summary.get("val_quantized")
    if not a or not b:
        return "no validation data"
    return f"perplexity {a['ppl']:.2f} -> {b['ppl']:.2f} ({(b['ppl'] / a['ppl'] - 1) * 100:+.1f}%)"


@contextlib.contextmanager
def single_process() -> Iterator[None]:
    """compressed-tensors working in this process alone while the other ranks wait (rank 0 exporting, or
    loading an export, in the quantize post-hook).

    compressed-tensors takes collective code paths (broadcasts from a source rank) whenever `torch.distributed`
    is initialised; called on one rank only, those would wait forever for the others. Its own switch
    (`as_single_threaded`) turns them off for compressed-tensors alone: the process group, and all other code
    that asks `torch.distributed.is_initialized()` (other threads included), see it as it is.
    """
    from compressed_tensors.offload import as_single_threaded

    with as_single_threaded():
        yield
