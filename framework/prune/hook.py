"""Pruning as a pre-hook (`hooks.pre=[prune]`) and as the body of `sapling prune`.

Calibration batches come from the training split in a fixed order; importance scores are saved to
`output_dir/prune_scores.pt` so pruning the same teacher to another size can reuse them
(`prune.scores=...`) without a new calibration pass.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from sapling.models import count_parameters
from sapling.prune.importance import ImportanceScores, estimate_importance
from sapling.prune.select import TARGET_FIELDS, plan_from_scores, resolve_target
from sapling.prune.slicing import slice_model
from sapling.train.hooks import HookContext, register_hook

log = logging.getLogger("sapling")


def calibration_batches(blocks: Any, samples: int, batch_size: int, device: torch.device, seed: int = 0):
    """Up to `samples` training blocks, drawn in a seeded order, as {"input_ids": [B, L]} batches."""
    order = np.random.default_rng(seed).permutation(len(blocks))[: min(samples, len(blocks))]
    for start in range(0, len(order), batch_size):
        ids = torch.stack([blocks[int(i)] for i in order[start:start + batch_size]]).to(device)
        yield {"input_ids": ids}


def prune_teacher(cfg: Any, teacher: torch.nn.Module, data: Any, device: torch.device, output_dir: Path,
                  metrics: Any) -> torch.nn.Module:
    """Estimate importance (or load saved scores), choose the structures to keep, slice a student."""
    p = cfg.prune
    shape = resolve_target(teacher.config, OmegaConf.to_container(p.target))
    if p.scores is not None:
        scores = ImportanceScores.load(p.scores)
        log.info("prune: importance scores loaded from %s", p.scores)
    else:
        batches = calibration_batches(data.train, p.calibration.samples, p.calibration.batch_size, device,
                                      seed=cfg.seed)
        scores = estimate_importance(teacher, batches, aggregation=p.calibration.aggregation,
                                     layer_loss=p.depth_metric == "layer_loss")
        scores.save(Path(output_dir) / "prune_scores.pt")
    plan = plan_from_scores(scores, teacher.config, shape, depth_metric=p.depth_metric)
    student = slice_model(teacher, plan)
    student.requires_grad_(True)
    student.train()
    record = {"event": "prune", "calibration_tokens": scores.num_tokens, "teacher_params": count_parameters(teacher),
              "student_params": count_parameters(student)}
    record.update({f"teacher_{k}": getattr(teacher.config, k) for k in TARGET_FIELDS})
    record.update({f"student_{k}": getattr(student.config, k) for k in TARGET_FIELDS})
    if plan.layers is not None:
        record["kept_layers"] = list(plan.layers)
    metrics.log(record)
    log.info("prune: %s -> %s parameters (%s)", f"{record['teacher_params']:,}", f"{record['student_params']:,}",
             ", ".join(f"{k}={v}" for k, v in shape.items()))
    return student


@register_hook("prune", "pre")
def prune_hook(ctx: HookContext) -> None:
    """Make the student by pruning the teacher to `prune.target`."""
    if ctx.teacher is None:
        raise ValueError("hooks.pre=[prune] needs a teacher (teacher.path)")
    ctx.student = prune_teacher(ctx.cfg, ctx.teacher, ctx.data, ctx.device, ctx.output_dir, ctx.metrics)
