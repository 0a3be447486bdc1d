"""The headline benchmark: a pruned + distilled student against the same shape trained from scratch.

    python benchmarks/efficiency.py [--distill-steps 600] [--scratch-steps 2400] [--eval-every 20]
                                    [--scratch-eval-every 100] [--random-kd] [--target k=v,...] [--quick]
                                    [--teacher-steps N] [--teacher-lr LR] [--corpus-bytes N]
                                    [--reuse-scratch earlier_results.json]
                                    [--out benchmarks/results/efficiency_cpu.md]
    python benchmarks/efficiency.py --ratios benchmarks/results/efficiency_cpu.json

From the demo teacher (`conf/experiment/demo.yaml`: a 4-layer Llama trained on this Python's standard
library, taken from the pipeline's cache or trained there once), with the demo's data, seeds and trainer
settings, through the same Python entry points as the commands:

  (a) `sapling distill hooks.pre=[prune]`: the teacher pruned to the demo's student shape (or `--target`'s),
      then distilled;
  (b) `sapling train model.init=random`: the same shape from a random init with cross-entropy, for longer;
  (c) with `--random-kd`: `sapling distill` into a randomly initialised student of that shape.

Every run evaluates on the whole held-out split every few steps; the curves are validation loss against
training tokens and against training FLOPs (model FLOPs, `sapling.train.flops`: the student's forward and
backward, plus, for (a) and (c), the teacher's forward on every token and, for (a), the pruning pass over
the calibration samples; the teacher's own training is not counted for anyone). The headline ratio is how
many tokens (and FLOPs) (b) trained on against how many (a) needed to first reach (b)'s final validation
loss (linear interpolation between evaluations), whatever it turns out to be; the same ratio is also given
for (b)'s losses at 1/8, 1/4, 1/2 and 3/4 of its run (`--ratios` adds that table to an earlier run's results).
`--corpus-bytes` trains on a larger corpus taken from the whole standard library (with its own tokenizer and
teacher), so that the runs see each token about once instead of several times.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_assets import (  # noqa: E402  (benchmarks/ is not a package)
    ALL_VAL,
    TARGET_KEYS,
    add_demo_arguments,
    compose_cfg,
    demo_overrides,
    distill_overrides,
    events,
    quick_defaults,
    reference,
    start_benchmark,
)
from machine import cpu_model, git_commit  # noqa: E402

from sapling.eval.plots import plot_validation_curves
from sapling.models import source_config
from sapling.recipes.distill import run_distill
from sapling.recipes.train import run_train
from sapling.train.flops import forward_flops_per_token

RUNS = {"a": "pruned + distilled", "b": "CE from scratch", "c": "distilled from random init"}


def _without(overrides: list[str], *keys: str) -> list[str]:
    return [o for o in overrides if o.split("=", 1)[0] not in keys]


def run_pruned_kd(assets: Any, work: Path, target: dict, steps: int, every: int, extra: list[str]) -> Path:
    out = work / "a_pruned_kd"
    ov = _without(distill_overrides(assets, out, steps, target, *extra), "trainer.eval_every")
    run_distill(compose_cfg(*ov, f"trainer.eval_every={every}"))
    return out


def run_scratch(assets: Any, work: Path, target: dict, steps: int, every: int) -> Path:
    out = work / "b_scratch"
    ov = [*demo_overrides(assets, "train", out), f"model.path={assets.teacher_dir}", "model.init=random",
          *(f"model.config.{k}={v}" for k, v in target.items()), f"trainer.max_steps={steps}",
          f"trainer.eval_every={every}", ALL_VAL, "trainer.resume=false", "hooks.pre=[]"]
    run_train(compose_cfg(*ov))
    return out


def run_random_kd(assets: Any, work: Path, target: dict, steps: int, every: int) -> Path:
    out = work / "c_random_kd"
    ov = [*demo_overrides(assets, "distill", out), "hooks.pre=[]", "student.init=random",
          *(f"student.config.{k}={v}" for k, v in target.items()), f"trainer.max_steps={steps}",
          f"trainer.eval_every={every}", ALL_VAL, "trainer.resume=false"]
    run_distill(compose_cfg(*ov))
    return out


def curve(out: Path, flops_offset: float = 0.0) -> list[dict[str, float]]:
    """(step, tokens, flops, val_loss) of every evaluation, in order; flops include `flops_offset`."""
    points = {}
    for r in events(out):
        if r.get("event") in ("eval", "done") and "val_loss" in r and "step" in r:
            points[r["step"]] = {"step": r["step"], "tokens": r["tokens"], "flops": r["flops"] + flops_offset,
                                 "val_loss": r["val_loss"]}
    return [points[s] for s in sorted(points)]


def first_reach(points: list[dict[str, float]], level: float) -> dict[str, float] | None:
    """Tokens and FLOPs at which the curve first reaches `level` (linear between evaluations), or None."""
    prev = None
    for p in points:
        if p["val_loss"] <= level:
            if prev is None:
                return {"tokens": p["tokens"], "flops": p["flops"], "step": p["step"]}
            w = (prev["val_loss"] - level) / (prev["val_loss"] - p["val_loss"])
            return {k: prev[k] + w * (p[k] - prev[k]) for k in ("tokens", "flops", "step")}
        prev = p
    return None


ALONG = (0.125, 0.25, 0.5, 0.75, 1.0)  # fractions of (b)'s run at which the token ratio is also reported
ALONG_HEADING = "## The ratio along (b)'s run"


def ratios_along(curves: dict[str, list[dict[str, float]]], fractions: tuple[float, ...] = ALONG) -> str:
    """A markdown section: for (b)'s evaluation nearest each fraction of its run, the loss it had then, the tokens
    and FLOPs (b) first reached that loss at, and how many fewer the other runs needed to first reach it."""
    b = curves["b"]
    others = [k for k in curves if k != "b"]
    head = ["(b) at", "(b) val loss", "(b) first reaches it at (tokens)"]
    for k in others:
        head += [f"({k}) reaches it at (tokens)", f"({k}) token ratio", f"({k}) FLOP ratio"]
    lines = [ALONG_HEADING, "",
             "The headline ratio uses (b)'s final loss; earlier losses of (b) say how the ratio depends on the "
             "budget (b) is given. Ratio: (b)'s tokens (FLOPs) over the run's, both at the first evaluation that "
             "reaches the loss (linear between evaluations).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    seen = set()
    for f in fractions:
        point = min(b, key=lambda q: abs(q["tokens"] - f * b[-1]["tokens"]))
        if point["step"] in seen:
            continue
        seen.add(point["step"])
        level = point["val_loss"]
        rb = first_reach(b, level)
        row = [f"{f:.0%} ({point['tokens']:,} tokens)", f"{level:.4f}", f"{rb['tokens']:,.0f}"]
        for k in others:
            r = first_reach(curves[k], level)
            if r is None:
                row += ["not reached", "-", "-"]
            elif r["tokens"] == 0:
                row += ["0 (right after pruning)", "-", f"{rb['flops'] / r['flops']:.1f}x"]
            else:
                row += [f"{r['tokens']:,.0f}", f"{rb['tokens'] / r['tokens']:.1f}x", f"{rb['flops'] / r['flops']:.1f}x"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def add_ratios_along(json_path: Path) -> str:
    """`--ratios results.json`: the section from a finished run's saved curves, written into the markdown beside
    it (replacing the section if there is one)."""
    payload = json.loads(json_path.read_text())
    section = ratios_along(payload["curves"])
    md_path = json_path.with_suffix(".md")
    md = md_path.read_text() if md_path.exists() else ""
    if ALONG_HEADING in md:
        md = md[: md.index(ALONG_HEADING)].rstrip("\n") + "\n"
    md_path.write_text(md.rstrip("\n") + "\n\n" + section)
    return section


def reused_scratch(path: Path, target: dict[str, int], steps: int, corpus_bytes: int | None) -> dict[str, Any]:
    """`--reuse-scratch results.json`: (b) from an earlier run's saved results, checked to be the same shape and
    length. (b) trains from a random init on the data alone, so a run that changes only the teacher (its lr, say)
    need not repeat it; the results file names where (b) came from."""
    payload = json.loads(Path(path).read_text())
    b = payload.get("curves", {}).get("b")
    if not b:
        raise SystemExit(f"--reuse-scratch {path}: no (b) curve in it")
    if payload.get("target") != target:
        raise SystemExit(f"--reuse-scratch {path}: its students are {payload.get('target')}, this run's {target}")
    if b[-1]["step"] != steps:
        raise SystemExit(f"--reuse-scratch {path}: its (b) ran {b[-1]['step']} steps, --scratch-steps is {steps}")
    words = shlex.split(payload.get("command", ""))
    theirs = words[words.index("--corpus-bytes") + 1] if "--corpus-bytes" in words[:-1] else None
    if theirs != (None if corpus_bytes is None else str(corpus_bytes)):
        raise SystemExit(f"--reuse-scratch {path}: its corpus is --corpus-bytes {theirs}, this run's {corpus_bytes}")
    md = Path(path).with_suffix(".md")
    dated = next((line[2:] for line in md.read_text().splitlines() if line.startswith("- date:")), None) \
        if md.exists() else None
    source = payload.get("b_source") or (f"{Path(path).name}, `{payload['command']}`" + (f" ({dated})" if dated else ""))
    return {**payload, "source": source}


def parse_target(text: str) -> dict[str, int]:
    """`--target hidden_size=176,intermediate_size=512` -> {"hidden_size": 176, "intermediate_size": 512}."""
    target = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep or key.strip() not in TARGET_KEYS or not value.strip().isdigit() or int(value) < 1:
            raise argparse.ArgumentTypeError(f"{item!r}: expected <field>=<positive int>, field one of "
                                             f"{', '.join(TARGET_KEYS)}")
        target[key.strip()] = int(value)
    if not target:
        raise argparse.ArgumentTypeError("empty target")
    return target


def run(args: argparse.Namespace) -> int:
    work, assets, extra = start_benchmark(args, "efficiency")
    demo = compose_cfg(*demo_overrides(assets, "distill", work))
    teacher_cfg = source_config(demo.teacher)
    if args.target:  # the given fields; the rest are the teacher's (e.g. width-only pruning keeps the depth)
        target = {k: args.target.get(k, getattr(teacher_cfg, k)) for k in TARGET_KEYS}
    else:
        target = {k: demo.prune.target[k] for k in TARGET_KEYS if demo.prune.target[k] is not None}
    samples = args.calibration_samples or demo.prune.calibration.samples
    calibration_flops = forward_flops_per_token(teacher_cfg, demo.data.seq_len) * samples * demo.data.seq_len
    print(f"target shape {target}; teacher {assets.teacher_note}", flush=True)
    reused = reused_scratch(args.reuse_scratch, target, args.scratch_steps, args.corpus_bytes) \
        if args.reuse_scratch else None
    # the teacher on the split the students are scored on: the ceiling distillation works toward
    ref = reference(compose_cfg(*demo_overrides(assets, "distill", work / "teacher_eval"), ALL_VAL))
    teacher_val = {"loss": ref.val_loss, "tokens": ref.val_tokens}
    print(f"teacher validation loss {ref.val_loss:.4f} over {ref.val_tokens:,} held-out tokens", flush=True)
    del ref

    t0 = time.perf_counter()
    wall = {}
    dirs = {"a": run_pruned_kd(assets, work, target, args.distill_steps, args.eval_every, extra)}
    wall["a"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    # Pruning keeps the teacher's head_dim; a config override of the width alone would derive it from
    # hidden_size / heads (apply_overrides), so the from-scratch shapes give it explicitly.
    head_dim = getattr(teacher_cfg, "head_dim", None) or teacher_cfg.hidden_size // teacher_cfg.num_attention_heads
    scratch_shape = {**target, "head_dim": head_dim}
    if reused is None:
        dirs["b"] = run_scratch(assets, work, scratch_shape, args.scratch_steps, args.scratch_eval_every)
        wall["b"] = time.perf_counter() - t0
    else:
        wall["b"] = reused.get("wall_s", {}).get("b", float("nan"))
    if args.random_kd:
        t0 = time.perf_counter()
        dirs["c"] = run_random_kd(assets, work, scratch_shape, args.distill_steps, args.eval_every)
        wall["c"] = time.perf_counter() - t0

    curves = {k: curve(d, calibration_flops if k == "a" else 0.0) for k, d in dirs.items()}
    if reused is not None:
        curves = {"a": curves["a"], "b": reused["curves"]["b"], **{k: v for k, v in curves.items() if k != "a"}}
    pruned = next((r for r in events(dirs["a"]) if r["event"] == "prune"), None)
    if pruned is not None:  # (a) starts where pruning left it: 0 tokens, the calibration pass's FLOPs
        curves["a"].insert(0, {"step": 0, "tokens": 0, "flops": calibration_flops, "val_loss": pruned["val_loss"]})
    params = {k: next(r["student_params"] for r in events(d) if r["event"] == "start") for k, d in dirs.items()}
    if reused is not None:
        params["b"] = reused["params"]["b"]
    start_a = next(r for r in events(dirs["a"]) if r["event"] == "start")
    teacher_params = start_a["teacher_params"]
    train_tokens = start_a.get("train_tokens")
    corpus_note = (f"{'the demo corpus' if args.corpus_bytes is None else 'a larger standard-library corpus'} "
                   f"({assets.corpus.name}, {assets.corpus.stat().st_size / 1e6:.1f} MB"
                   + (f", {train_tokens:,} training tokens: (b) makes {curves['b'][-1]['tokens'] / train_tokens:.1f} "
                      "passes over them" if train_tokens else "") + ")")
    assert len(set(params.values())) == 1, f"the students differ in size: {params}"
    prune_loss = pruned["val_loss"] if pruned is not None else None
    b_final = curves["b"][-1]
    reach = {k: first_reach(c, b_final["val_loss"]) for k, c in curves.items() if k != "b"}

    rows = []
    for k, c in curves.items():
        r = reach.get(k)
        rows.append([f"({k}) {RUNS[k]}", f"{c[-1]['step']:,}", f"{c[-1]['tokens']:,}", f"{c[-1]['flops']:.3g}",
                     f"{c[-1]['val_loss']:.4f}", "(its own final)" if k == "b" else
                     ("not reached" if r is None else f"{r['tokens']:,.0f} tokens, {r['flops']:.3g} FLOPs"),
                     f"{wall[k]:.0f}" + (" (earlier run)" if k == "b" and reused else "")])
    ratio_lines = []
    for k, r in reach.items():
        if r is not None and r["tokens"] == 0:
            ratio_lines.append(f"- ({k}) {RUNS[k]}: already below (b)'s final validation loss right after pruning")
        elif r is None:
            ratio_lines.append(f"- ({k}) {RUNS[k]}: did not reach (b)'s final validation loss "
                               f"{b_final['val_loss']:.4f} in {curves[k][-1]['tokens']:,} tokens")
        else:
            ratio_lines.append(
                f"- ({k}) {RUNS[k]} reached (b)'s final validation loss {b_final['val_loss']:.4f} after "
                f"{r['tokens']:,.0f} tokens: **{b_final['tokens'] / r['tokens']:.1f}x fewer tokens** and "
                f"**{b_final['flops'] / r['flops']:.1f}x fewer FLOPs** (teacher forward and pruning pass included) "
                f"than (b)'s {b_final['tokens']:,} tokens / {b_final['flops']:.3g} FLOPs")
    png = Path(args.out).with_suffix(".png") if args.out else work / "efficiency.png"
    plot_validation_curves({f"({k}) {RUNS[k]}": [{"event": "eval", **p} for p in c] for k, c in curves.items()},
                           png, title="student validation loss: pruned + distilled vs trained from scratch")
    command = "python benchmarks/efficiency.py " + shlex.join(sys.argv[1:])
    md = "\n".join([
        "# Pruned + distilled vs trained from scratch (demo teacher)", "",
        f"- compression: teacher / student parameters = {teacher_params / params['a']:.2f}x",
        f"- command: `{command}`",
        f"- date: {datetime.date.today()}; commit {git_commit()}; device: CPU ({cpu_model()}, "
        f"{platform.machine()}), torch threads default",
        f"- teacher: {teacher_params:,} parameters ({assets.teacher_note}); validation loss "
        f"{teacher_val['loss']:.4f} over the whole held-out split ({teacher_val['tokens']:,} tokens); students: "
        f"{params['a']:,} parameters, shape {target}",
        f"- data: {corpus_note}, seq_len {demo.data.seq_len}, {demo.trainer.micro_batch_size} sequences per "
        f"step ({demo.data.seq_len * demo.trainer.micro_batch_size:,} tokens), lr {demo.trainer.lr}; validation "
        "loss over the whole held-out split",
        f"- pruning calibration: {samples} samples, {calibration_flops:.3g} FLOPs (counted in (a)); validation loss "
        f"right after pruning: {prune_loss if prune_loss is None else f'{prune_loss:.4f}'}",
        *([f"- (b) reused, not rerun (it does not use the teacher): {reused['source']}"] if reused else []),
        "", "| run | steps | tokens | FLOPs | final val loss | reaches (b)'s final loss at | wall (s) |",
        "|---|---|---|---|---|---|---|",
        *("| " + " | ".join(r) + " |" for r in rows), "", *ratio_lines, "",
        f"![validation curves]({png.name})", "", ratios_along(curves),
    ])
    print(md, flush=True)
    if args.out:
        out = Path(args.out)
        out.write_text(md)
        payload = {"command": command, "b_source": reused["source"] if reused else None, "target": target,
                   "params": params, "teacher_params": teacher_params, "teacher_val": teacher_val,
                   "calibration_flops": calibration_flops, "curves": curves, "reach": reach, "wall_s": wall,
                   "b_final": b_final}
        out.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")
        print(f"wrote {out}, {out.with_suffix('.json').name} and {png.name}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--distill-steps", type=int, default=600, help="steps of (a) and (c)")
    p.add_argument("--scratch-steps", type=int, default=2400, help="steps of (b)")
    p.add_argument("--eval-every", type=int, default=20, help="validation interval of (a) and (c)")
    p.add_argument("--scratch-eval-every", type=int, default=100, help="validation interval of (b)")
    p.add_argument("--random-kd", action="store_true", help="also run (c)")
    p.add_argument("--target", type=parse_target, default=None,
                   help="the student shape, e.g. hidden_size=176,intermediate_size=512 (fields not given: the "
                        "teacher's; default: the demo's prune.target)")
    p.add_argument("--quick", action="store_true", help="smoke run: a 20-step teacher and a few steps")
    p.add_argument("--out", default=None, help="write the markdown here (+ .json and .png beside it)")
    p.add_argument("--reuse-scratch", type=Path, default=None, metavar="JSON",
                   help="take (b) from an earlier run's results JSON (same --target and --scratch-steps) instead of "
                        "training it again: for reruns that change only the teacher")
    add_demo_arguments(p)
    p.add_argument("--ratios", type=Path, default=None, metavar="JSON",
                   help="no runs: add the ratio-along-(b) section to the markdown beside a saved results JSON")
    args = p.parse_args(argv)
    if args.reuse_scratch and args.out and Path(args.reuse_scratch).resolve() == Path(args.out).with_suffix(".json").resolve():
        p.error(f"--reuse-scratch {args.reuse_scratch} is the results file --out {args.out} would replace: copy it "
                "aside first and pass the copy")
    if args.ratios is not None:
        print(add_ratios_along(args.ratios), end="")
        return 0
    if args.quick:
        args.distill_steps, args.scratch_steps, args.eval_every, args.scratch_eval_every = 6, 12, 2, 4
        quick_defaults(args)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
