"""Pre/post hooks, composed by the recipes: `hooks.pre=[prune]` makes the student from the teacher before the
training loop, `hooks.post=[quantize, eval]` run after it, in the order given.

A hook is a function of a :class:`HookContext`, named in :data:`PRE_HOOKS` / :data:`POST_HOOKS` (the table
`config.validate` checks names against). It owns no training logic: the pruning library (`sapling.prune`)
takes the training loop from here as a `distill_fn` where it needs one (prune -> distill rounds, re-ranking
prune candidates), the quantization library (`sapling.quant`) never trains.
"""

from __future__ import annotations

import datetime
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from sapling.errors import ConfigError, LaunchError, Stopped
from sapling.models import place
from sapling.prune.plan import DistillFn, PruneOutcome, prune_teacher, resumed_student, sub_cfg
from sapling.quant.apply import SUMMARY_COLUMNS, quantize_student, single_process, summary_rows
from sapling.train.loop import fit
from sapling.train.metrics import MetricsLogger

log = logging.getLogger("sapling")


@dataclass
class HookContext:
    cfg: Any
    teacher: torch.nn.Module | None
    student: torch.nn.Module | None  # None until a pre-hook (prune) makes it
    tokenizer: Any
    data: Any
    output_dir: Path
    metrics: Any
    device: torch.device
    result: Any = None
    extras: dict[str, Any] = field(default_factory=dict)


Hook = Callable[[HookContext], None]


def run_hooks(stage: str, names: Any, ctx: HookContext) -> None:
    """The hooks `names` of `stage` ("pre" or "post"), in order."""
    table = PRE_HOOKS if stage == "pre" else POST_HOOKS
    for name in names:
        hook = table.get(name)
        if hook is None:  # validated earlier; kept as a guard for programmatic use
            raise KeyError(f"no {stage}-hook named {name!r}; available: {available(stage)}")
        ctx.metrics.log({"event": "hook", "stage": stage, "name": name})
        hook(ctx)


def training_distill_fn(cfg: Any, *, teacher: torch.nn.Module, tokenizer: Any, data: Any,
                        device: torch.device) -> DistillFn:
    """The training loop as the pruning library's `distill_fn`: distil a student from `teacher` for `steps`
    steps into `output_dir` (resumable, its model saved), or with `output_dir=None` in a throwaway run
    (nothing saved, nothing resumed); returns the final validation {"loss", "ppl"}. A stop signal raises
    `Stopped` (a round resumes from its checkpoint on the rerun; a throwaway run is redone)."""

    def distill(student: torch.nn.Module, *, steps: int, output_dir: Path | None, desc: str) -> dict[str, float]:
        if output_dir is None:
            sub = sub_cfg(cfg, max_steps=steps, save_every=0, eval_every=0, resume=False)
            with tempfile.TemporaryDirectory(prefix="sapling-prune-search-") as tmp:
                quiet = MetricsLogger(tmp)
                try:
                    res = fit(sub, student=student, teacher=teacher, tokenizer=tokenizer, data=data, output_dir=tmp,
                              metrics=quiet, device=device, desc=desc, save_model=False)
                finally:
                    quiet.close()
            where = "the pruning search"
        else:
            sub = sub_cfg(cfg, max_steps=steps)
            round_metrics = MetricsLogger(output_dir)
            try:
                res = fit(sub, student=student, teacher=teacher, tokenizer=tokenizer, data=data,
                          output_dir=output_dir, metrics=round_metrics, device=device, desc=desc)
            finally:
                round_metrics.close()
            where = desc
        if res.stopped:
            raise Stopped(where, res)
        return res.final_val

    return distill


def prune_and_train(cfg: Any, teacher: torch.nn.Module, data: Any, device: torch.device, output_dir: Path,
                    metrics: Any, tokenizer: Any) -> PruneOutcome:
    """`sapling.prune.plan.prune_teacher` with the training loop for its rounds and its candidate re-ranking."""
    return prune_teacher(cfg, teacher, data, device, output_dir, metrics,
                         distill_fn=training_distill_fn(cfg, teacher=teacher, tokenizer=tokenizer, data=data,
                                                        device=device))


def prune_hook(ctx: HookContext) -> None:
    """Make the student by pruning the teacher to `prune.target` (in `prune.rounds` rounds)."""
    if ctx.teacher is None:
        raise ConfigError("teacher.path", None, "hooks.pre=[prune] needs a teacher", "pass teacher.path=<HF checkpoint dir>")
    shape_dir = ctx.extras.get("resume_shape_dir")  # a resumed run: the checkpoint knows the shape
    if shape_dir is not None:
        outcome = resumed_student(ctx.cfg, ctx.teacher, Path(shape_dir), ctx.device)
        ctx.metrics.log({"event": "prune_resumed", "shape": outcome.shape, "from": str(shape_dir)})
    else:
        outcome = prune_and_train(ctx.cfg, ctx.teacher, ctx.data, ctx.device, ctx.output_dir, ctx.metrics,
                                  tokenizer=ctx.tokenizer)
    ctx.student = outcome.student
    ctx.extras["hidden_index"] = outcome.hidden_index  # where feature projections start (fit(hidden_index=))
    if outcome.fit_cfg is not ctx.cfg:
        ctx.extras["fit_cfg"] = outcome.fit_cfg


def eval_hook(ctx: HookContext) -> None:
    """Perplexity of the trained student (and the teacher) on the validation split -> report.md."""
    from sapling.eval.perplexity import PERPLEXITY_COLUMNS, perplexity_rows
    from sapling.eval.report import write_report

    rows = perplexity_rows([("teacher", ctx.teacher), ("student", ctx.student)], ctx.data.val, ctx.cfg.eval,
                           ctx.device, ctx.metrics, event="eval_hook", progress=ctx.cfg.trainer.progress)
    write_report(ctx.output_dir / "report.md", "Sapling evaluation (validation split)",
                 [("Perplexity", PERPLEXITY_COLUMNS, rows)])


def _long_barrier() -> Any:
    """A gloo group whose collectives wait (almost) indefinitely: the ranks idle while rank 0 quantizes."""
    import torch.distributed as dist

    return dist.new_group(backend="gloo", timeout=datetime.timedelta(days=7))


def quantize_hook(ctx: HookContext) -> None:
    """Quantize the trained student (`output_dir/model`) into `quant.output` (default `model-<scheme>`)."""
    import torch.distributed as dist

    from sapling.dist import rank_world

    cfg = ctx.cfg
    rank, world = rank_world()
    model_dir = ctx.result.model_dir if ctx.result is not None else None
    out_dir = Path(cfg.quant.output) if cfg.quant.output else Path(cfg.output_dir) / f"model-{cfg.quant.scheme}"
    group = _long_barrier() if world > 1 else None
    error = None
    if rank == 0:
        try:
            if model_dir is None:
                raise ConfigError("hooks.post", "quantize", "needs the trained student's checkpoint (output_dir/model)",
                                  "run it after a training command that saves its model")
            with single_process():
                summary = _quantize_saved(cfg, Path(model_dir), ctx, out_dir)
            ctx.extras["quantize"] = summary
            from sapling.eval.report import write_report

            write_report(Path(cfg.output_dir) / "quantize_report.md", "Sapling quantization", [
                ("Validation perplexity and size", SUMMARY_COLUMNS, summary_rows(summary)),
                ("Export", f"- compressed-tensors pack-quantized checkpoint: {summary['model_dir']}\n"
                           f"- load: `AutoModelForCausalLM.from_pretrained(\"{summary['model_dir']}\")` "
                           "(transformers), or serve it with vLLM / SGLang"),
            ])
        except BaseException as e:  # the other ranks must learn of it instead of waiting forever
            error = f"{type(e).__name__}: {e}"
            if world == 1:
                raise
            status = [error]
            dist.broadcast_object_list(status, src=0, group=group)
            raise
    if world > 1:
        status = [error]
        dist.broadcast_object_list(status, src=0, group=group)
        if status[0] is not None:
            raise LaunchError(f"rank {rank}: quantization on rank 0 failed ({status[0][:200]}); the cause is rank 0's "
                              "own error above")


def _quantize_saved(cfg: DictConfig, model_dir: Path, ctx: HookContext, out_dir: Path) -> dict[str, Any]:
    """Rank 0: the saved student (consolidated weights) on this rank's device, quantized and exported."""
    from transformers import AutoModelForCausalLM

    device = ctx.device
    student = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    student = place(student, "cpu" if cfg.quant.offload else device)
    teacher = None
    if cfg.quant.guided:
        teacher = _plain_teacher(cfg, ctx, device)
    return quantize_student(cfg, student, teacher=teacher, data=ctx.data, tokenizer=ctx.tokenizer, device=device,
                            out_dir=out_dir, metrics=ctx.metrics)


def _plain_teacher(cfg: DictConfig, ctx: HookContext, device: torch.device) -> torch.nn.Module:
    """The teacher as an ordinary module on this process: the one in memory, or loaded from teacher.*."""
    from sapling.models import build_model, source_config

    teacher = ctx.teacher
    if teacher is not None and not any(hasattr(p, "ds_id") for p in teacher.parameters()):
        return teacher
    if cfg.teacher.path is None and cfg.teacher.tiny is None:
        raise ConfigError("quant.guided", True, "needs the teacher", "pass teacher.path=<teacher checkpoint>, or drop quant.guided")
    plain = OmegaConf.merge(cfg.teacher, {"cache": None})
    return build_model(plain, source_config(plain), device, seed=cfg.seed)


PRE_HOOKS: dict[str, Hook] = {"prune": prune_hook}
POST_HOOKS: dict[str, Hook] = {"quantize": quantize_hook, "eval": eval_hook}


def available(stage: str) -> list[str]:
    """The hook names `hooks.<stage>` accepts ("pre" or "post")."""
    return sorted(PRE_HOOKS if stage == "pre" else POST_HOOKS)
