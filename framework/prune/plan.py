"""Pruning a teacher into a student, the library behind `sapling prune` and `hooks.pre=[prune]` (both in
`sapling.recipes`, which pass the training loop in as `distill_fn` where pruning needs training).

Calibration batches come from the training split in a fixed order; importance scores are saved to
`output_dir/prune_scores.pt` so pruning the same teacher to another size can reuse them
(`prune.scores=...`) without a new calibration pass. The target is explicit HF fields or a parameter
budget (`prune.target.params`, searched over candidate shapes, see `search.py`); `prune.rounds=R`
reaches it in R prune -> distill rounds.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from omegaconf import OmegaConf

from sapling.data.calibration import heldout_batches
from sapling.dist import rank_world
from sapling.io import write_text_atomically
from sapling.models import count_parameters, place
from sapling.prune.importance import ImportanceScores, distributed_importance
from sapling.prune.select import plan_from_scores, resolve_target, target_fields
from sapling.prune.slicing import slice_model

log = logging.getLogger("sapling")


class DistillFn(Protocol):
    """Distil `student` (in place) for `steps` optimizer steps; returns its final validation {"loss", "ppl"}.

    `output_dir`: where a prune round checkpoints and saves its model (a rerun reloads a finished round from
    `output_dir/model`); None: a throwaway run (re-ranking prune candidates), nothing kept.
    """

    def __call__(self, student: torch.nn.Module, *, steps: int, output_dir: Path | None,
                 desc: str) -> dict[str, float]: ...


@dataclass
class PruneOutcome:
    """The pruned student and the training config left for the main run (rounds spend part of its steps)."""

    student: torch.nn.Module
    fit_cfg: Any
    shape: dict[str, int]
    search_rows: list[dict] | None = None
    # The teacher hidden channel each student hidden channel was sliced from (None: all of them, in order, or
    # not known): feature-distillation projections start as this channel selection (`fit(hidden_index=)`).
    hidden_index: torch.Tensor | None = None


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
    if rank_world()[0] == 0:
        scores.save(path)


def slice_student(model: torch.nn.Module, scores: ImportanceScores, shape: dict[str, int], depth_metric: str,
                  device: torch.device) -> tuple[torch.nn.Module, torch.Tensor | None]:
    """`model` sliced to `shape` keeping the highest-scoring structures, on `device` (also from a ZeRO-3
    partitioned `model`); trainable, in train mode. Also returns the kept hidden channels (None: all)."""
    plan = plan_from_scores(scores, model.config, shape, depth_metric=depth_metric)
    student = slice_model(model, plan, device=device)
    student.requires_grad_(True)
    student.train()
    return student, plan.hidden


def _through(index: torch.Tensor | None, kept: torch.Tensor | None) -> torch.Tensor | None:
    """The teacher channels of a model sliced (`kept`) from one whose channels were teacher channels `index`."""
    if kept is None:
        return index
    kept = torch.as_tensor(kept, dtype=torch.long).cpu()
    return kept if index is None else index[kept]


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
        for key in final.keys() - shape.keys():  # MoE: experts and their width move linearly too
            shape[key] = max(final[key], round(_lerp(start[key], final[key], f)))
        out.append(shape)
    return out


def _lerp(a: float, b: float, f: float) -> float:
    return a + (b - a) * f


def sub_cfg(cfg: Any, **trainer: Any) -> Any:
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
    fields = target_fields(teacher.config)
    record.update({f"teacher_{k}": getattr(teacher.config, k) for k in fields})
    record.update({f"student_{k}": getattr(student.config, k) for k in fields})
    metrics.log(record)
    log.info("prune: %s -> %s parameters (%s); val loss before training %.4f",
             f"{record['teacher_params']:,}", f"{record['student_params']:,}",
             ", ".join(f"{k}={getattr(student.config, k)}" for k in fields), val["loss"])
    return record


def prune_teacher(cfg: Any, teacher: torch.nn.Module, data: Any, device: torch.device, output_dir: Path,
                  metrics: Any, *, distill_fn: DistillFn | None = None) -> PruneOutcome:
    """Importance (or saved scores) -> target shape (explicit, or searched for `prune.target.params`) ->
    slice; with `prune.rounds=R`, R prune -> distill rounds, importance re-estimated on each distilled model.

    Rounds before the last distil for `prune.round_steps` steps each (default `trainer.max_steps // R`) in
    `output_dir/prune_rounds/roundN` (a finished round is reloaded, not redone, when the run restarts); the
    returned `fit_cfg` leaves the rest of `trainer.max_steps` to the main training run. `distill_fn` trains
    the rounds and the re-ranking of search candidates (`prune.search.distill_top_k`).
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
    kind = "active_params" if p.target.get("active_params") is not None else "params"
    if p.target[kind] is not None:
        from sapling.prune.search import format_table, search_target

        distill = None
        if p.search.distill_top_k > 0:
            if distill_fn is None:
                raise ValueError("prune.search.distill_top_k > 0 needs a distill_fn (internal caller error)")

            def distill(student: torch.nn.Module) -> float:
                return distill_fn(student, steps=p.search.distill_steps, output_dir=None, desc="prune search")["loss"]

        shape, search_rows = search_target(
            teacher, scores, int(p.target[kind]), kind=kind,
            eval_batches=heldout_batches(data.train, p.calibration.samples, p.search.eval_batches,
                                         p.calibration.batch_size, device, seed=cfg.seed),
            multiple=p.search.multiple, tolerance=p.search.tolerance, max_candidates=p.search.max_candidates,
            depth_metric=p.depth_metric, distill=distill, distill_top_k=p.search.distill_top_k, log=log.info,
            progress=cfg.trainer.progress)
        write_text_atomically(output_dir / "prune_search.md", format_table(search_rows) + "\n")
        for row in search_rows:
            metrics.log({"event": "prune_search", **row})
    else:
        shape = resolve_target(teacher.config, OmegaConf.to_container(p.target))

    if p.rounds <= 1:
        student, hidden = slice_student(teacher, scores, shape, p.depth_metric, device)
        _log_prune(metrics, teacher, student, scores, val_loss(student), **_kept_layers(teacher, student, scores,
                                                                                        shape, p.depth_metric))
        return PruneOutcome(student, cfg, shape, search_rows, hidden_index=_through(None, hidden))

    if distill_fn is None:
        raise ValueError("prune.rounds > 1 distils between rounds and needs a distill_fn (internal caller error)")
    from sapling.prune.search import default_multiple

    multiple = p.search.multiple or default_multiple(teacher.config)
    start = {k: getattr(teacher.config, k) for k in target_fields(teacher.config)}
    shapes = round_shapes(start, shape, p.rounds, multiple)
    steps = list(p.round_steps) if p.round_steps is not None else [cfg.trainer.max_steps // p.rounds] * (p.rounds - 1)
    model, model_scores, index = teacher, scores, None  # index: the teacher channels of `model`'s
    for r, (round_shape, round_steps) in enumerate(zip(shapes[:-1], steps), start=1):
        round_dir = output_dir / "prune_rounds" / f"round{r}"
        if r > 1:
            model_scores = importance_for(cfg, model, data, device)
            _save_scores(model_scores, round_dir / "prune_scores.pt")
        done_dir = round_dir / "model"
        if (done_dir / "config.json").is_file():
            from transformers import AutoModelForCausalLM

            log.info("prune round %d/%d: reusing the distilled model in %s", r, p.rounds, done_dir)
            # as a fresh round would be: sliced from the teacher, in its dtype and attention implementation
            student = AutoModelForCausalLM.from_pretrained(
                done_dir, dtype=next(teacher.parameters()).dtype,
                attn_implementation=teacher.config._attn_implementation)
            place(student, device)
            student.requires_grad_(True)
            student.train()
            hidden = plan_from_scores(model_scores, model.config, round_shape, depth_metric=p.depth_metric).hidden
        else:
            student, hidden = slice_student(model, model_scores, round_shape, p.depth_metric, device)
            _log_prune(metrics, model, student, model_scores, val_loss(student), round=r, rounds=p.rounds)
            val = distill_fn(student, steps=int(round_steps), output_dir=round_dir, desc=f"prune round {r}/{p.rounds}")
            metrics.log({"event": "prune_round", "round": r, "rounds": p.rounds, "steps": int(round_steps),
                         "val_loss": val["loss"], "val_ppl": val["ppl"]})
        model, index = student, _through(index, hidden)
    final_scores = importance_for(cfg, model, data, device)
    _save_scores(final_scores, output_dir / "prune_rounds" / f"round{p.rounds}" / "prune_scores.pt")
    student, hidden = slice_student(model, final_scores, shape, p.depth_metric, device)
    _log_prune(metrics, model, student, final_scores, val_loss(student), round=p.rounds, rounds=p.rounds)
    return PruneOutcome(student, main_run_cfg(cfg), shape, search_rows, hidden_index=_through(index, hidden))


def main_run_cfg(cfg: Any) -> Any:
    """The config of the training run after pruning: with `prune.rounds=R` the rounds before the last spend
    `prune.round_steps` of `trainer.max_steps`, and the main run gets the rest."""
    p = cfg.prune
    if p.rounds <= 1:
        return cfg
    steps = list(p.round_steps) if p.round_steps is not None else [cfg.trainer.max_steps // p.rounds] * (p.rounds - 1)
    return sub_cfg(cfg, max_steps=cfg.trainer.max_steps - sum(int(x) for x in steps))


def resumed_student(cfg: Any, teacher: torch.nn.Module, shape_dir: Path, device: torch.device) -> PruneOutcome:
    """The pruned student of a run being resumed, without pruning again: its shape from the HF config saved
    with the checkpoint (`shape_dir`), its weights left to the checkpoint (so no calibration pass, no search,
    no slicing: minutes to hours on a large teacher)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(shape_dir)
    config._attn_implementation = teacher.config._attn_implementation
    dtype = next(teacher.parameters()).dtype
    student = place(AutoModelForCausalLM.from_config(config, dtype=dtype), device)
    student.requires_grad_(True)
    student.train()
    shape = {k: getattr(config, k) for k in target_fields(config)}
    log.info("prune: resuming, so the pruned shape comes from %s (%s); calibration skipped, weights from the "
             "checkpoint", shape_dir, ", ".join(f"{k}={v}" for k, v in shape.items()))
    return PruneOutcome(student, main_run_cfg(cfg), shape)


def _kept_layers(teacher: torch.nn.Module, student: torch.nn.Module, scores: ImportanceScores,
                 shape: dict[str, int], depth_metric: str) -> dict[str, Any]:
    if student.config.num_hidden_layers == teacher.config.num_hidden_layers:
        return {}
    plan = plan_from_scores(scores, teacher.config, shape, depth_metric=depth_metric)
    return {"kept_layers": list(plan.layers or [])}
