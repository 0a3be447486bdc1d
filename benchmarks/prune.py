"""Pruning benchmark on the demo teacher: which importance to prune by, and one-shot vs iterative pruning.

    python benchmarks/prune.py [--steps 150] [--rounds-steps 300] [--random-seeds 0 1 2] [--quick]
                               [--out benchmarks/results/prune_cpu.md]

The teacher is the demo's (`conf/experiment/demo.yaml`: a 4-layer Llama trained on this Python's standard
library sources); it is taken from the pipeline's cache (`$SAPLING_CACHE/demo`) or trained once and cached
there exactly as `sapling pipeline experiment=demo` would. Every run is `sapling distill experiment=demo
hooks.pre=[prune] teacher.path=<cached teacher> ...` through the Python API (`sapling.recipes.distill.run_distill`),
so the benchmark measures what users run. Validation loss is the mean next-token NLL (nats/token) over the
whole held-out split (`trainer.eval_tokens=null`); the loss right after pruning is the one the
prune hook logs (its `prune` event in metrics.jsonl), the loss after distillation the trainer's final one.

Table 1, importance: the same target shape (the issue's example, 50% of the MLP neurons, 25% of the hidden
channels and 25% of the layers removed) reached with activation importance (Minitron), weight magnitude and
random scores (several seeds: mean, min and max); validation loss right after pruning and after `--steps`
distillation steps, and the distilled student's KL(teacher || student) on the validation split (how faithfully
it reproduces the teacher: validation loss saturates at the teacher's own once students catch up). Table 2, one-shot vs `prune.rounds=2` to a ~25%-of-teacher-parameters shape with
activation importance, both with `--rounds-steps` distillation steps in total.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_assets import (  # noqa: E402  (benchmarks/ is not a package)
    TARGET_KEYS,
    DemoAssets,
    Reference,
    add_demo_arguments,
    compose_cfg,
    distill_overrides,
    events,
    quick_defaults,
    reference,
    start_benchmark,
)
from machine import cpu_model, git_commit  # noqa: E402

from sapling.kernels import fused_linear_kd_loss
from sapling.models import decoder_and_head, final_hidden
from sapling.recipes.distill import run_distill

# Table 1: the example shape (of the demo teacher: 4 layers, hidden 256, MLP 768, 8 heads / 4 KV).
IMPORTANCE_TARGET = {"num_hidden_layers": 3, "hidden_size": 192, "intermediate_size": 384}
# Table 2: ~25% of the teacher's parameters (942,880 of 3,672,320 = 25.7% with the demo's vocabulary).
QUARTER_TARGET = {"num_hidden_layers": 2, "hidden_size": 160, "intermediate_size": 384}


# ---------------------------------------------------------------------------------------------------- teacher KL


@torch.no_grad()
def val_kl_to_teacher(student: torch.nn.Module, ref: Reference) -> float:
    """Mean KL(p_teacher || p_student) (nats/token) over the validation blocks: how closely the student
    reproduces the teacher, which validation loss alone does not show once students reach the teacher's loss."""
    student.eval()
    _, s_head = decoder_and_head(student)
    _, t_head = decoder_and_head(ref.teacher)
    total, count = 0.0, 0
    for start in range(0, len(ref.val), ref.micro_batch_size):
        ids = torch.stack([ref.val[i] for i in range(start, min(len(ref.val), start + ref.micro_batch_size))])
        ids = ids.to(ref.device)
        h_s, h_t = final_hidden(student, ids), final_hidden(ref.teacher, ids)
        total += float(fused_linear_kd_loss(h_s, s_head.weight, h_t, t_head.weight, divergence="forward_kl",
                                            student_bias=s_head.bias, teacher_bias=t_head.bias,
                                            num_valid_tokens=1))
        count += h_s.shape[0]
    return total / max(1, count)


# ---------------------------------------------------------------------------------------------------- runs


def run_case(name: str, overrides: list[str], cfg: DictConfig, ref: Reference) -> dict[str, Any]:
    """One `sapling distill ... hooks.pre=[prune]` run (`cfg` composed from `overrides`); losses read back
    from its metrics.jsonl, KL to the teacher measured on the student it saved."""
    out = Path(cfg.output_dir)
    print(f"[{name}] sapling distill {' '.join(o for o in overrides if not o.startswith(('command=', 'output_dir=')))}",
          flush=True)
    t0 = time.perf_counter()
    result = run_distill(cfg)
    run_events = events(out)
    prunes = [e for e in run_events if e.get("event") == "prune"]
    if not prunes:
        raise RuntimeError(f"{name}: no prune event in {out / 'metrics.jsonl'}")
    last = prunes[-1]
    want = cfg.prune.importance
    used = last.get("importance")
    if used != want if want != "activation" else used in ("magnitude", "random"):  # activation logs its aggregation
        raise RuntimeError(f"{name}: asked for prune.importance={want}, the prune event says {used!r}")
    if last.get("val_loss") is None:
        raise RuntimeError(f"{name}: the prune event has no val_loss (validation loss before training)")
    if result.final_val.get("tokens") != ref.val_tokens:
        raise RuntimeError(f"{name}: validated on {result.final_val.get('tokens')} tokens, the teacher on "
                           f"{ref.val_tokens}: not the same validation split")
    student = AutoModelForCausalLM.from_pretrained(result.model_dir, dtype=torch.float32).to(ref.device)
    row = {
        "name": name, "overrides": overrides, "output_dir": str(out),
        "student_params": last["student_params"], "teacher_params": last["teacher_params"],
        "shape": {k: last.get(f"student_{k}") for k in TARGET_KEYS},
        "prunes": [{k: p.get(k) for k in ("student_params", "val_loss", *(f"student_{f}" for f in TARGET_KEYS))}
                   for p in prunes],
        "after_prune": last["val_loss"],
        "final": result.final_val["loss"], "final_kl": val_kl_to_teacher(student, ref),
        "steps": result.steps, "calibration_samples": cfg.prune.calibration.samples,
        "wall_s": time.perf_counter() - t0,
    }
    print(f"[{name}] params {row['student_params']:,}; val loss after pruning "
          f"{row['after_prune']:.4f}, after distillation {row['final']:.4f} (KL to the teacher {row['final_kl']:.4f}) "
          f"({row['wall_s']:.0f} s)", flush=True)
    return row


# ---------------------------------------------------------------------------------------------------- tables


def _f(x: float | None, spec: str = ".4f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _ratio(x: float | None, base: float | None) -> str:
    return "-" if x is None or not base else f"{x / base:.3f}"


def _mean(xs: list[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


def _spread(xs: list[float | None]) -> str:
    xs = [x for x in xs if x is not None]
    return f" (min {min(xs):.4f}, max {max(xs):.4f}, n={len(xs)})" if len(xs) > 1 else ""


def _metrics(steps: int, total: str = "") -> list[tuple[str, str]]:
    return [("after_prune", "val loss after pruning"), ("final", f"val loss after {steps} KD steps{total}"),
            ("final_kl", f"val KL(teacher || student) after {steps} KD steps{total}")]


def _table(first_col: str, rows: list[tuple[str, str, dict[str, list[float]]]], base: dict[str, list[float]],
           metrics: list[tuple[str, str]], baseline: str) -> str:
    """One row per (label, params, {metric: values}); each metric's mean beside the baseline's and the ratio."""
    cols = [first_col, "student params"]
    for _, title in metrics:
        cols += [title, baseline, "ratio"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for label, params, values in rows:
        cells = [label, params]
        for key, _ in metrics:
            v, b = _mean(values[key]), _mean(base[key])
            cells += [_f(v) + _spread(values[key]), _f(b), _ratio(v, b)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _values(runs: list[dict]) -> dict[str, list[float]]:
    return {key: [r[key] for r in runs] for key in ("after_prune", "final", "final_kl")}


def importance_table(rows: dict[str, list[dict]], steps: int) -> str:
    """Rows activation / magnitude / random (mean over seeds); each figure beside random's and the ratio."""
    body = [(kind if len(runs) == 1 else f"{kind} (mean of seeds {', '.join(str(r['seed']) for r in runs)})",
             f"{runs[0]['student_params']:,}", _values(runs)) for kind, runs in rows.items()]
    return _table("importance", body, _values(rows["random"]), _metrics(steps), "random")


def rounds_table(rows: list[dict], teacher_params: int, steps: int) -> str:
    """Rows one-shot / rounds=2 at equal total distillation steps; each figure beside one-shot's and the ratio."""
    body = [(r["name"], f"{r['student_params']:,} ({100 * r['student_params'] / teacher_params:.1f}%)", _values([r]))
            for r in rows]
    metrics = _metrics(steps, " in total")
    metrics[0] = ("after_prune", "val loss after the last prune")
    return _table("pruning", body, _values(rows[:1]), metrics, "one-shot")


def verdicts(imp: dict[str, list[dict]], rounds: list[dict] | None, steps: int) -> list[str]:
    out = []
    act, mag, rnd = (imp[k] for k in ("activation", "magnitude", "random"))
    for col, label in (("after_prune", "val loss right after pruning"), ("final", "val loss after distillation"),
                       ("final_kl", "val KL to the teacher after distillation")):
        a, m, r = (_mean([x[col] for x in runs]) for runs in (act, mag, rnd))
        r_min = min(x[col] for x in rnd)
        out.append(f"- {label}: activation {a:.4f} vs random {r:.4f} (mean; best seed {r_min:.4f}): activation is "
                   f"{abs(r - a):.4f} {'below' if a < r else 'above'} random's mean and "
                   f"{'beats' if a < r_min else 'does NOT beat'} every random seed; vs magnitude {m:.4f}: activation "
                   f"is {abs(m - a):.4f} {'lower' if a < m else 'higher'}")
    if rounds:
        one, two = rounds
        for col, label in (("final", "val loss"), ("final_kl", "val KL to the teacher")):
            out.append(f"- one-shot vs prune.rounds=2 at {steps} total KD steps, {label}: {one[col]:.4f} vs "
                       f"{two[col]:.4f} ({'rounds=2' if two[col] < one[col] else 'one-shot'} lower by "
                       f"{abs(one[col] - two[col]):.4f})")
        for i, p in enumerate(two["prunes"][:-1], start=1):
            shape = {k: p[f"student_{k}"] for k in TARGET_KEYS}
            out.append(f"- prune.rounds=2, round {i}: {shape}, {p['student_params']:,} parameters, val loss "
                       f"{p['val_loss']:.4f} right after that prune")
    return out


def header(args: argparse.Namespace, assets: DemoAssets, ref: Reference, calibration: int,
           wall_s: float) -> str:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return "\n".join([
        "# Pruning benchmark: importance baselines, one-shot vs iterative",
        "",
        f"- command: `{' '.join(shlex.quote(a) for a in ['python', *sys.argv])}`",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}; git commit {git_commit()}",
        f"- machine: {cpu_model()}; os.cpu_count {os.cpu_count()}; torch threads {torch.get_num_threads()}; "
        f"torch {torch.__version__}; python {platform.python_version()}; load average at the end {load}; "
        f"wall time {wall_s / 60:.1f} min",
        f"- teacher: demo (conf/experiment/demo.yaml), {ref.params:,} parameters, validation loss "
        f"{ref.val_loss:.4f}; {assets.teacher_note}",
        f"- every run: `sapling distill experiment=demo hooks.pre=[prune] teacher.path=<teacher>` (demo settings: "
        f"forward KL, T=1, lr 3e-3, 16 x 128-token sequences per step, calibration {calibration} sequences, "
        "mean_l2, block_influence), data.seed and trainer.seed 0 in every run; validation loss = mean NLL over the whole held-out split "
        f"({ref.val_tokens:,} tokens), nats/token, lower is better; val KL(teacher || student) = mean forward KL "
        "of the distilled student (its saved checkpoint) from the teacher over the same tokens: how faithfully "
        "it reproduces the teacher; ratio = figure / baseline figure",
        f"- table 1 target: {IMPORTANCE_TARGET} (the issue's example: -50% MLP, -25% hidden, -25% layers; heads "
        f"kept); {args.steps} distillation steps; random = `prune.importance=random seed=s` for s in "
        f"{args.random_seeds} (the scores' seed only: data and trainer seeds stay 0)",
        f"- table 2 target: {QUARTER_TARGET} (~25% of the teacher's parameters), activation importance, "
        f"{args.rounds_steps} distillation steps in total for both (rounds=2: prune.round_steps=null, "
        "i.e. the hook's default split)",
    ]) + "\n"


# ---------------------------------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> int:
    t_start = time.perf_counter()
    work, assets, extra = start_benchmark(args, "prune")

    # Every config is composed before any run, so config files edited meanwhile cannot mix into the benchmark.
    cases: list[tuple[str, str, int, list[str], DictConfig]] = []  # (table, name, seed or rounds, overrides, cfg)
    for kind in ("activation", "magnitude", "random"):
        for seed in args.random_seeds if kind == "random" else [0]:
            ov = distill_overrides(assets, work / f"importance-{kind}-{seed}", args.steps, IMPORTANCE_TARGET,
                                   f"prune.importance={kind}", f"seed={seed}", *extra)
            cases.append((kind, kind if kind != "random" else f"random (seed {seed})", seed, ov, compose_cfg(*ov)))
    if not args.no_rounds:
        for r in (1, 2):
            ov = distill_overrides(assets, work / f"rounds-{r}", args.rounds_steps, QUARTER_TARGET,
                                   "prune.importance=activation", f"prune.rounds={r}", *extra)
            cases.append(("rounds", "one-shot" if r == 1 else "prune.rounds=2", r, ov, compose_cfg(*ov)))

    ref = reference(cases[0][-1])
    print(f"teacher: {ref.params:,} params, val loss {ref.val_loss:.4f} ({assets.teacher_note})",
          flush=True)

    imp: dict[str, list[dict]] = {}
    rounds: list[dict] | None = None if args.no_rounds else []
    for table, name, n, ov, cfg in cases:
        row = run_case(name, ov, cfg, ref)
        if table == "rounds":
            rounds.append(row)
        else:
            imp.setdefault(table, []).append({**row, "seed": n})
    table1 = importance_table(imp, args.steps)
    print("\n" + table1 + "\n", flush=True)
    table2 = "(skipped: --no-rounds)"
    if rounds:
        table2 = rounds_table(rounds, ref.params, args.rounds_steps)
        print("\n" + table2 + "\n", flush=True)

    summary = verdicts(imp, rounds, args.rounds_steps)
    print("\n".join(summary), flush=True)
    text = "\n".join([
        header(args, assets, ref, imp["activation"][0]["calibration_samples"], time.perf_counter() - t_start),
        "## Importance: activation vs magnitude vs random (same target shape)", "", table1, "",
        "## One-shot vs prune.rounds=2 (same target, equal total distillation steps)", "", table2, "",
        "## Summary", "", *summary, "",
    ])
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        payload = {"argv": sys.argv,
                   "teacher": {"params": ref.params, "val_loss": ref.val_loss, "val_tokens": ref.val_tokens,
                               "dir": str(assets.teacher_dir), "note": assets.teacher_note},
                   "corpus": str(assets.corpus), "tokenizer_dir": str(assets.tokenizer_dir),
                   "importance_target": IMPORTANCE_TARGET, "quarter_target": QUARTER_TARGET,
                   "steps": args.steps, "rounds_steps": args.rounds_steps, "importance": imp, "rounds": rounds}
        out.with_suffix(".json").write_text(json.dumps(payload, indent=1, default=str) + "\n")
        print(f"wrote {out} and {out.with_suffix('.json')}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=150, help="distillation steps after pruning (table 1)")
    p.add_argument("--rounds-steps", type=int, default=300, help="total distillation steps (table 2)")
    p.add_argument("--random-seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--no-rounds", action="store_true", help="skip table 2")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: a 20-step teacher (cached apart from the demo's), few steps, one random seed")
    p.add_argument("--out", default=None, help="write the markdown (+ .json beside it) here")
    add_demo_arguments(p)
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.rounds_steps, args.random_seeds = 4, 8, args.random_seeds[:1]
        quick_defaults(args)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
