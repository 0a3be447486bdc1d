"""Pre/post hooks: small objects that run before or after the training loop and own no training logic.

A hook is registered under a name with the stage it runs at; `hooks.pre=[...]` / `hooks.post=[...]`
choose them. Each receives a :class:`HookContext` and may replace its `student` (a pre-hook that
prunes the teacher into the student does exactly that).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


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


@dataclass(frozen=True)
class Hook:
    name: str
    stage: str  # "pre" | "post"
    fn: Callable[[HookContext], None]

    def __call__(self, ctx: HookContext) -> None:
        self.fn(ctx)


HOOKS: dict[tuple[str, str], Hook] = {}


def register_hook(name: str, stage: str) -> Callable[[Callable[[HookContext], None]], Callable[[HookContext], None]]:
    def deco(fn: Callable[[HookContext], None]) -> Callable[[HookContext], None]:
        HOOKS[(stage, name)] = Hook(name, stage, fn)
        return fn

    return deco


def _load_builtin_hooks() -> None:
    """Hooks that live beside the code they drive register themselves on import."""
    import sapling.prune.hook  # noqa: F401
    import sapling.quant.hook  # noqa: F401


def available(stage: str) -> list[str]:
    _load_builtin_hooks()
    return sorted(name for (s, name) in HOOKS if s == stage)


def run_hooks(stage: str, names: Any, ctx: HookContext) -> None:
    _load_builtin_hooks()
    for name in names:
        hook = HOOKS.get((stage, name))
        if hook is None:  # validated earlier; kept as a guard for programmatic use
            raise KeyError(f"no {stage}-hook named {name!r}; available: {available(stage)}")
        ctx.metrics.log({"event": "hook", "stage": stage, "name": name})
        hook(ctx)


@register_hook("eval", "post")
def eval_hook(ctx: HookContext) -> None:
    """Perplexity of the trained student (and the teacher) on the validation split -> report.md."""
    from sapling.eval.perplexity import PERPLEXITY_COLUMNS, perplexity_rows
    from sapling.eval.report import write_report

    rows = perplexity_rows([("teacher", ctx.teacher), ("student", ctx.student)], ctx.data.val, ctx.cfg.eval,
                           ctx.device, ctx.metrics, event="eval_hook", progress=ctx.cfg.trainer.progress)
    write_report(ctx.output_dir / "report.md", "Sapling evaluation (validation split)",
                 [("Perplexity", PERPLEXITY_COLUMNS, rows)])
