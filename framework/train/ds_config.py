"""DeepSpeed configs for the two engines, built from Sapling's config.

The student engine trains (ZeRO stage 1/2/3, optimizer states and gradients partitioned); the teacher
engine only runs forward (ZeRO-3 partitions its weights, stage 0 replicates them). Each model is built
while transformers sees exactly its own engine's DeepSpeed config (`sapling.models.model_init_scope`).
"""

from __future__ import annotations

import copy
from typing import Any

import torch

# Written into every DeepSpeed checkpoint so `ds_to_universal` can convert it (resume at another world size).
UNIVERSAL_INFO = {"universal_checkpoint_info": {"universal_checkpoint_version": 0.2}}


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _precision(dtype: torch.dtype) -> dict[str, Any]:
    return {"bf16": {"enabled": dtype == torch.bfloat16}, "fp16": {"enabled": dtype == torch.float16}}


def _batch(trainer_cfg: Any, world_size: int) -> dict[str, Any]:
    mbs, gas = int(trainer_cfg.micro_batch_size), int(trainer_cfg.grad_accum)
    return {"train_micro_batch_size_per_gpu": mbs, "gradient_accumulation_steps": gas,
            "train_batch_size": mbs * gas * world_size, "steps_per_print": 10**9, "wall_clock_breakdown": False}


def student_ds_config(cfg: Any, world_size: int, dtype: torch.dtype, *, load_universal: bool = False) -> dict:
    """The training engine's config: `deepspeed.stage`, offloads, clipping, precision (fp32 master weights)."""
    ds, t = cfg.deepspeed, cfg.trainer
    cuda = torch.cuda.is_available()
    zero: dict[str, Any] = {"stage": int(ds.stage), "contiguous_gradients": True, "overlap_comm": cuda,
                            "stage3_param_persistence_threshold": int(ds.param_persistence_threshold),
                            "stage3_gather_16bit_weights_on_model_save": False}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cuda}
    if ds.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": cuda}
    config = {
        **_batch(t, world_size),
        **_precision(dtype),
        "gradient_clipping": float(t.grad_clip),
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # Sapling's own AdamW param groups (decay on matrices only)
        "zero_force_ds_cpu_optimizer": False,
        "checkpoint": {"load_universal": load_universal},
    }
    extra = ds.get("extra") or {}
    if extra:
        from omegaconf import OmegaConf

        config = _merge(config, OmegaConf.to_container(extra, resolve=True) if OmegaConf.is_config(extra) else extra)
    return config


def teacher_ds_config(cfg: Any, world_size: int, dtype: torch.dtype) -> dict:
    """The frozen teacher's config: no optimizer; ZeRO-3 (optionally offloading weights to CPU) or stage 0."""
    ds = cfg.deepspeed
    cuda = torch.cuda.is_available()
    zero: dict[str, Any] = {"stage": int(ds.teacher_stage),
                            "stage3_param_persistence_threshold": int(ds.param_persistence_threshold)}
    if ds.teacher_offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": cuda}
    return {**_batch(cfg.trainer, world_size), **_precision(dtype), "zero_optimization": zero}

