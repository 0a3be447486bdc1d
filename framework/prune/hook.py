"""Pruning as a pre-hook (`hooks.pre=[prune]`) and as the body of `sapling prune`.

Calibration batches come from the training split in a fixed order; importance scores are saved to
`output_dir/prune_scores.pt` so pruning the same teacher to another size can reuse them
(`prune.scores=...`) without a new calibration pass. The target is explicit HF fields or a parameter
budget (`prune.target.params`, searched over candidate shapes, see `search.py`); `prune.rounds=R`
reaches it in R prune -> distill rounds.
"""

from __future__ import annotations

import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from sapling.errors import ConfigError, DataError, Stopped
from sapling.models import count_parameters
from sapling.prune.distributed import rank_and_world_size
from sapling.prune.importance import ImportanceScores, distributed_importance
from sapling.prune.select import TARGET_FIELDS, plan_from_scores, resolve_target
from sapling.prune.slicing import slice_model
from sapling.train.hooks import HookContext, register_hook
from sapling.train.loop import fit
from sapling.train.metrics import MetricsLogger

log = logging.getLogger("sapling")


def calibration_batches(blocks: Any, samples: int, batch_size: int, device: torch.device, seed: int = 0,
                        rank: int = 0, world_size: int = 1):
    """Up to `samples` training blocks, drawn in a seeded order, as {"input_ids": [B, L]} batches.

    With `world_size` > 1, this rank's share only: a contiguous slice of the same global order, the
    shares disjoint and covering it, their sizes differing by at most one (a share may be empty).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    order = np.random.default_rng(seed).permutation(len(blocks))[: min(samples, len(blocks))]
    order = np.array_split(order, world_size)[rank]
    for start in range(0, len(order), batch_size):
        ids = torch.stack([blocks[int(i)] for i in order[start:start + batch_size]]).to(device)
        yield {"input_ids": ids}


@dataclass
class PruneOutcome:
    """The pruned student and the training config left for the main run (rounds spend part of its steps)."""

    student: torch.nn.Module
    fit_cfg: Any
    shape: dict[str, int]
    search_rows: list[dict] | None = None


def importance_for(cfg: Any, model: torch.nn.Module, data: Any, device: torch.device) -> ImportanceScores:
    """Importance of `model`'s structures by `prune.importance` (activation scores use calibration data)."""
    p = cfg.prune
    if p.importance == "magnitude":
        from sapling.prune.baselines import magnitude_importance

        return magnitude_importance(model)
    if p.importance == "random":
        from sapling.prune.baselines import random_importance

        return random_importance(model, seed=cfg.seed)
    # every rank calibrates on its share of the sample; the sums are all-reduced (same scores on all ranks)
    return distributed_importance(model, data.train, samples=p.calibration.samples,
                                  batch_size=p.calibration.batch_size, device=device, seed=cfg.seed,
                                  aggregation=p.calibration.aggregation, layer_loss=p.depth_metric == "layer_loss",
                                  progress=cfg.trainer.progress)


def _save_scores(scores: ImportanceScores, path: Path) -> None:
    """Rank 0 writes (every rank holds the same all-reduced scores)."""
    if rank_and_world_size()[0] == 0:
        scores.save(path)


def heldout_batches(blocks: Any, cfg: Any, device: torch.device) -> list[dict[str, torch.Tensor]]:
    """`prune.search.eval_batches` batches of training blocks the calibration sample did not use."""
    p = cfg.prune
    order = np.random.default_rng(cfg.seed).permutation(len(blocks))
    rest = order[min(p.calibration.samples, len(blocks)):]
    want = p.search.eval_batches * p.calibration.batch_size
    if len(rest) == 0:
        raise DataError(f"no training blocks left after the {p.calibration.samples} calibration samples to rank "
                        "prune candidates on; fix: lower prune.calibration.samples or add data")
    rest = rest[:want]
    bs = p.calibration.batch_size
    return [{"input_ids": torch.stack([blocks[int(i)] for i in rest[j:j + bs]]).to(device)}
            for j in range(0, len(rest), bs)]


def slice_student(model: torch.nn.Module, scores: ImportanceScores, shape: dict[str, int],
                  depth_metric: str) -> torch.nn.Module:
    """`model` sliced to `shape` keeping the highest-scoring structures; trainable, in train mode."""
    student = slice_model(model, plan_from_scores(scores, model.config, shape, depth_metric=depth_metric))
    student.requires_grad_(True)
    student.train()
    return student


def round_shapes(start: dict[str, int], final: dict[str, int], rounds: int, multiple: int) -> list[dict[str, int]]:
    """`rounds` shapes going from `start` to `final` (the last is `final`), each field moved linearly.

    Widths are rounded up to `multiple` (never below the final value); query heads per KV group move
    linearly too, so every intermediate shape keeps heads divisible by KV heads.
    """
    out = []
    g0 = start["num_attention_heads"] // start["num_key_value_heads"]
    g1 = final["num_attention_heads"] // final["num_key_value_heads"]
    for r in range(1, rounds + 1):
        if r == rounds:
            out.append(dict(final))
            continue
        f = r / rounds
        shape = {}
        for key in ("num_hidden_layers", "num_key_value_heads"):
            shape[key] = max(final[key], round(_lerp(start[key], final[key], f)))
        for key in ("hidden_size", "intermediate_size"):
            v = math.ceil(_lerp(start[key], final[key], f) / multiple) * multiple
            shape[key] = min(start[key], max(final[key], v))
        shape["num_attention_heads"] = shape["num_key_value_heads"] * max(g1, round(_lerp(g0, g1, f)))
        out.append(shape)
    return out


def _lerp(a: float, b: float, f: float) -> float:
    return a + (b - a) * f


def _sub_cfg(cfg: Any, **trainer: Any) -> Any:
    """A copy of `cfg` with some trainer keys replaced."""
    sub = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    for key, value in trainer.items():
        OmegaConf.update(sub, f"trainer.{key}", value, merge=False)
    return sub


def _log_prune(metrics: Any, teacher: torch.nn.Module, student: torch.nn.Module, scores: ImportanceScores,
               val: dict[str, float], **extra: Any) -> dict[str, Any]:
    record = {"event": "prune", **extra, "calibration_tokens": scores.num_tokens,
              "importance": scores.aggregation, "teacher_params": count_parameters(teacher),
              "student_params": count_parameters(student), "val_loss": val["loss"], "val_ppl": val["ppl"]}
    record.update({f"teacher_{k}": getattr(teacher.config, k) for k in TARGET_FIELDS})
    record.update({f"student_{k}": getattr(student.config, k) for k in TARGET_FIELDS})
    metrics.log(record)
    log.info("prune: %s -> %s parameters (%s); val loss before training %.4f",
             f"{record['teacher_params']:,}", f"{record['student_params']:,}",
             ", ".join(f"{k}={getattr(student.config, k)}" for k in TARGET_FIELDS), val["loss"])
    return record


def prune_teacher(cfg: Any, teacher: torch.nn.Module, data: Any, device: torch.device, output_dir: Path,
                  metrics: Any, tokenizer: Any = None) -> PruneOutcome:
    """Importance (or saved scores) -> target shape (explicit, or searched for `prune.target.params`) ->
    slice; with `prune.rounds=R`, R prune -> distill rounds, importance re-estimated on each distilled model.

    Rounds before the last distil for `prune.round_steps` steps each (default `trainer.max_steps // R`) in
    `output_dir/prune_rounds/roundN` (a finished round is reloaded, not redone, when the run restarts); the
    returned `fit_cfg` leaves the rest of `trainer.max_steps` to the main training run.
    """
    from sapling.eval.perplexity import evaluate_lm

    p = cfg.prune
    output_dir = Path(output_dir)

    def val_loss(model: torch.nn.Module) -> dict[str, float]:
        # the validation budget of training, so this loss compares with the training run's val curve
        return evaluate_lm(model, data.val, micro_batch_size=cfg.eval.micro_batch_size,
                           max_batches=cfg.trainer.eval_batches, max_tokens=cfg.trainer.eval_tokens, device=device,
                           progress=cfg.trainer.progress, desc="prune: validation")

    if p.scores is not None:
        scores = ImportanceScores.load(p.scores)
        log.info("prune: importance scores loaded from %s", p.scores)
    else:
        scores = importance_for(cfg, teacher, data, device)
        _save_scores(scores, output_dir / "prune_scores.pt")

    search_rows = None
    if p.target.params is not None:
        from sapling.prune.search import format_table, search_target

        distill = None
        if p.search.distill_top_k > 0:
            if tokenizer is None:
                raise ValueError("prune.search.distill_top_k > 0 needs the tokenizer (internal caller error)")

            def distill(student: torch.nn.Module) -> float:
                sub = _sub_cfg(cfg, max_steps=p.search.distill_steps, save_every=0, eval_every=0, resume=False)
                with tempfile.TemporaryDirectory(prefix="sapling-prune-search-") as tmp:
                    quiet = MetricsLogger(tmp)
                    try:
                        res = fit(sub, student=student, teacher=teacher, tokenizer=tokenizer, data=data,
                                  output_dir=tmp, metrics=quiet, device=device, desc="prune search",
                                  save_model=False)
                    finally:
                        quiet.close()
                if res.stopped:  # a throwaway run: nothing to keep, the rerun searches again
                    raise Stopped("the pruning search", res)
                return res.final_val["loss"]

        shape, search_rows = search_target(
            teacher, scores, int(p.target.params), eval_batches=heldout_batches(data.train, cfg, device),
            multiple=p.search.multiple, tolerance=p.search.tolerance, max_candidates=p.search.max_candidates,
            depth_metric=p.depth_metric, distill=distill, distill_top_k=p.search.distill_top_k, log=log.info,
            progress=cfg.trainer.progress)
        (output_dir / "prune_search.md").write_text(format_table(search_rows) + "\n")
        for row in search_rows:
            metrics.log({"event": "prune_search", **row})
    else:
        shape = resolve_target(teacher.config, OmegaConf.to_container(p.target))

    if p.rounds <= 1:
        student = slice_student(teacher, scores, shape, p.depth_metric)
        _log_prune(metrics, teacher, student, scores, val_loss(student), **_kept_layers(teacher, student, scores,
                                                                                        shape, p.depth_metric))
        return PruneOutcome(student, cfg, shape, search_rows)

    if tokenizer is None:
        raise ValueError("prune.rounds > 1 distils between rounds and needs the tokenizer (internal caller error)")
    from sapling.prune.search import default_multiple

    multiple = p.search.multiple or default_multiple(teacher.config)
    start = {k: getattr(teacher.config, k) for k in TARGET_FIELDS}
    shapes = round_shapes(start, shape, p.rounds, multiple)
    steps = list(p.round_steps) if p.round_steps is not None else [cfg.trainer.max_steps // p.rounds] * (p.rounds - 1)
    model, model_scores = teacher, scores
    for r, (round_shape, round_steps) in enumerate(zip(shapes[:-1], steps), start=1):
        round_dir = output_dir / "prune_rounds" / f"round{r}"
        if r > 1:
            model_scores = importance_for(cfg, model, data, device)
            _save_scores(model_scores, round_dir / "prune_scores.pt")
        done_dir = round_dir / "model"
        if (done_dir / "config.json").is_file():
            from transformers import AutoModelForCausalLM

            log.info("prune round %d/%d: reusing the distilled model in %s", r, p.rounds, done_dir)
            student = AutoModelForCausalLM.from_pretrained(done_dir, torch_dtype=torch.float32).to(device)
            student.requires_grad_(True)
            student.train()
        else:
            student = slice_student(model, model_scores, round_shape, p.depth_metric)
            _log_prune(metrics, model, student, model_scores, val_loss(student), round=r, rounds=p.rounds)
            sub = _sub_cfg(cfg, max_steps=int(round_steps))
            round_metrics = MetricsLogger(round_dir)
            try:
                res = fit(sub, student=student, teacher=teacher, tokenizer=tokenizer, data=data,
                          output_dir=round_dir, metrics=round_metrics, device=device,
                          desc=f"prune round {r}/{p.rounds}")
            finally:
                round_metrics.close()
            if res.stopped:  # checkpointed in round_dir: the rerun resumes this round
                raise Stopped(f"prune round {r}/{p.rounds}", res)
            metrics.log({"event": "prune_round", "round": r, "rounds": p.rounds, "steps": int(round_steps),
                         "val_loss": res.final_val["loss"], "val_ppl": res.final_val["ppl"]})
        model = student
    final_scores = importance_for(cfg, model, data, device)
    _save_scores(final_scores, output_dir / "prune_rounds" / f"round{p.rounds}" / "prune_scores.pt")
    student = slice_student(model, final_scores, shape, p.depth_metric)
    _log_prune(metrics, model, student, final_scores, val_loss(student), round=p.rounds, rounds=p.rounds)
    return PruneOutcome(student, main_run_cfg(cfg), shape, search_rows)


def main_run_cfg(cfg: Any) -> Any:
    """The config of the training run after pruning: with `prune.rounds=R` the rounds before the last spend
    `prune.round_steps` of `trainer.max_steps`, and the main run gets the rest."""
    p = cfg.prune
    if p.rounds <= 1:
        return cfg
    steps = list(p.round_steps) if p.round_steps is not None else [cfg.trainer.max_steps // p.rounds] * (p.rounds - 1)
    return _sub_cfg(cfg, max_steps=cfg.trainer.max_steps - sum(int(x) for x in steps))


def resumed_student(cfg: Any, teacher: torch.nn.Module, shape_dir: Path, device: torch.device) -> PruneOutcome:
    """The pruned student of a run being resumed, without pruning again: its shape from the HF config saved
    with the checkpoint (`shape_dir`), its weights left to the checkpoint (so no calibration pass, no search,
    no slicing: minutes to hours on a large teacher)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(shape_dir)
    config._attn_implementation = teacher.config._attn_implementation
    dtype = next(teacher.parameters()).dtype
    student = AutoModelForCausalLM.from_config(config, dtype=dtype).to(device)
    student.requires_grad_(True)
    student.train()
    shape = {k: getattr(config, k) for k in TARGET_FIELDS}
    log.info("prune: resuming, so the pruned shape comes from %s (%s); calibration skipped, weights from the "
             "checkpoint", shape_dir, ", ".join(f"{k}={v}" for k, v in shape.items()))
    return PruneOutcome(student, main_run_cfg(cfg), shape)


def _kept_layers(teacher: torch.nn.Module, student: torch.nn.Module, scores: ImportanceScores,
                 shape: dict[str, int], depth_metric: str) -> dict[str, Any]:
    if student.config.num_hidden_layers == teacher.config.num_hidden_layers:
        return {}
    plan = plan_from_scores(scores, teacher.config, shape, depth_metric=depth_metric)
    return {"kept_layers": list(plan.layers or [])}


@register_hook("prune", "pre")
def prune_hook(ctx: HookContext) -> None:
    """Make the student by pruning the teacher to `prune.target` (in `prune.rounds` rounds)."""
    if ctx.teacher is None:
        raise ConfigError("teacher.path", None, "hooks.pre=[prune] needs a teacher", "pass teacher.path=<HF checkpoint dir>")
    shape_dir = ctx.extras.get("resume_shape_dir")  # a resumed run: the checkpoint knows the shape
    if shape_dir is not None:
        outcome = resumed_student(ctx.cfg, ctx.teacher, Path(shape_dir), ctx.device)
        ctx.metrics.log({"event": "prune_resumed", "shape": outcome.shape, "from": str(shape_dir)})
    else:
        outcome = prune_teacher(ctx.cfg, ctx.teacher, ctx.data, ctx.device, ctx.output_dir, ctx.metrics,
                                tokenizer=ctx.tokenizer)
    ctx.student = outcome.student
    if outcome.fit_cfg is not ctx.cfg:
        ctx.extras["fit_cfg"] = outcome.fit_cfg
