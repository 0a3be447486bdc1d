"""Quantization benchmark on the demo student: validation perplexity and size of each quantization recipe.

    python benchmarks/quant.py [--steps 300] [--quick] [--out benchmarks/results/quant_cpu.md]

The demo student is made as `sapling pipeline experiment=demo` makes it: `sapling distill experiment=demo
hooks.pre=[prune]` on the trained demo teacher for --steps steps (fp32 on CPU). Each row then runs what a user
runs (`sapling.recipes.quantize.run_quantize`, i.e. `sapling quantize model.path=<student> ...`) on that same saved
student, with the demo corpus's training split for calibration (quant.calibration.samples sequences of
seq_len 128, seed 0) and its whole held-out validation split for perplexity:

- 16-bit: the student in bf16 (the export dtype), its weight bytes at 2 bytes per parameter;
- RTN w4g128: round-to-nearest int4, groups of 128 input columns, symmetric, bf16 scales;
- GPTQ w4g128: layer-by-layer GPTQ (1% damping, 128-column blocks), act-order with static groups, MSE-searched
  group scales (the default `quant.observer=mse`; once with absmax scales and once without act-order, for
  reference);
- GPTQ + guided: GPTQ with distillation-guided Hessians (KD-loss saliency from the demo teacher,
  quant.guided_groups=4), with the default and with absmax scales;
- QAD + RTN export: `sapling distill ... quant.aware=true hooks.post=[quantize]`, the same pruned start and
  the same --steps as the 16-bit student, trained through the int4 weights, exported with RTN;
- w8: int8 per output channel, GPTQ.

Perplexity of every quantized row is measured on the exported compressed-tensors checkpoint loaded by
`transformers.AutoModelForCausalLM.from_pretrained` (weights decompressed), i.e. the model a server loads;
the 16-bit row on the student cast to bf16. Size = bytes of the checkpoint's *.safetensors files (the
lm_head and embeddings stay bf16 in every export, as serving expects). Goals: GPTQ's perplexity increase
over 16-bit <= 50% of RTN's; guided <= GPTQ.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_assets import (  # noqa: E402  (benchmarks/ is not a package)
    add_demo_arguments,
    compose_cfg,
    demo_overrides,
    distill_overrides,
    events,
    quick_defaults,
    start_benchmark,
)
from machine import cpu_model, git_commit  # noqa: E402

from sapling.recipes.distill import run_distill  # noqa: E402
from sapling.recipes.quantize import run_quantize  # noqa: E402

DEMO_TARGET = {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2}
ROWS = [  # (name, quant overrides; every key the demo preset sets is given, so rows differ only as named)
    ("RTN w4g128", ["quant.method=rtn", "quant.guided=false"]),
    ("GPTQ w4g128 (act-order)", ["quant.method=gptq", "quant.act_order=true", "quant.guided=false"]),
    ("GPTQ w4g128 (absmax scales)", ["quant.method=gptq", "quant.act_order=true", "quant.guided=false",
                                     "quant.observer=minmax"]),
    ("GPTQ w4g128 (no act-order)", ["quant.method=gptq", "quant.act_order=false", "quant.guided=false"]),
    ("GPTQ w4g128 + guided", ["quant.method=gptq", "quant.act_order=true", "quant.guided=true"]),
    ("GPTQ w4g128 + guided (absmax scales)", ["quant.method=gptq", "quant.act_order=true", "quant.guided=true",
                                              "quant.observer=minmax"]),
    ("w8 per-channel GPTQ", ["quant.scheme=w8a16", "quant.method=gptq", "quant.guided=false"]),
]


def quantize_row(assets: Any, student_dir: Path, out: Path, extra: list[str], calib: int) -> dict[str, Any]:
    overrides = [*demo_overrides(assets, "quantize", out), f"model.path={student_dir}", "eval.batches=null",
                 f"quant.calibration.samples={calib}", *extra]
    t0 = time.perf_counter()
    summary = run_quantize(compose_cfg(*overrides))
    summary["wall_s"] = time.perf_counter() - t0
    return summary


def fmt_row(name: str, val: dict[str, float], size: int, base: dict[str, float] | None, base_size: int,
            wall: float | None) -> list[str]:
    inc = "-" if base is None else f"{(val['ppl'] / base['ppl'] - 1) * 100:+.2f}%"
    return [name, f"{val['loss']:.4f}", f"{val['ppl']:.2f}", inc, f"{size / 1e6:.3f}", f"{size / base_size:.3f}",
            "-" if wall is None else f"{wall:.1f}"]


def run(args: argparse.Namespace) -> int:
    t_start = time.perf_counter()
    work, assets, extra = start_benchmark(args, "quant")
    # 1. the demo student: pruned + distilled, saved in fp32
    kd_out = work / "distill"
    run_distill(compose_cfg(*distill_overrides(assets, kd_out, args.steps, DEMO_TARGET, *extra)))
    student_dir = kd_out / "model"
    kd_val = [e for e in events(kd_out) if e.get("event") == "done"][-1]
    print(f"demo student: {student_dir} (val loss {kd_val['val_loss']:.4f})", flush=True)

    # 2. post-training rows on the same student
    results: dict[str, dict[str, Any]] = {}
    for name, quant in ROWS:
        slug = name.split(" (")[0].replace(" ", "_").replace("+", "plus").lower() + (
            "_noact" if "no act" in name else "")
        results[name] = quantize_row(assets, student_dir, work / slug, quant, args.calibration)
        r = results[name]
        print(f"{name}: ppl {r['val_16bit']['ppl']:.2f} -> {r['val_quantized']['ppl']:.2f}, "
              f"{r['bytes'] / 1e6:.3f} MB, {r['wall_s']:.1f} s", flush=True)

    # 3. quantization-aware distillation from the same pruned start, same steps, exported with RTN
    qad_out = work / "qad"
    t0 = time.perf_counter()
    run_distill(compose_cfg(*distill_overrides(assets, qad_out, args.steps, DEMO_TARGET, *extra),
                            "quant.aware=true", "quant.guided=false", "hooks.post=[quantize]",
                            "eval.batches=null"))
    qad = [e for e in events(qad_out) if e.get("event") == "quantize"][-1]
    qad["wall_s"] = time.perf_counter() - t0

    base = results["RTN w4g128"]["val_16bit"]
    base_size = results["RTN w4g128"]["bytes_16bit"]
    table = [fmt_row("16-bit (bf16)", base, base_size, None, base_size, None)]
    for name, r in results.items():
        table.append(fmt_row(name, r["val_quantized"], r["bytes"], base, base_size, r["quantize_s"]))
    table.append(fmt_row(f"QAD ({args.steps} steps) + RTN w4g128 export", qad["val_quantized"], qad["bytes"], base,
                         base_size, None))

    def increase(val: dict[str, float]) -> float:
        return val["ppl"] / base["ppl"] - 1

    rtn_inc = increase(results["RTN w4g128"]["val_quantized"])
    gptq_inc = increase(results["GPTQ w4g128 (act-order)"]["val_quantized"])
    guided_inc = increase(results["GPTQ w4g128 + guided"]["val_quantized"])
    absmax_inc = increase(results["GPTQ w4g128 (absmax scales)"]["val_quantized"])
    guided_absmax_inc = increase(results["GPTQ w4g128 + guided (absmax scales)"]["val_quantized"])
    goals = [
        ("GPTQ's perplexity increase <= 50% of RTN's", f"{gptq_inc * 100:+.2f}% vs {rtn_inc * 100:+.2f}% "
         f"(ratio {gptq_inc / rtn_inc:.2f})" if rtn_inc > 0 else "RTN did not increase perplexity",
         rtn_inc > 0 and gptq_inc <= 0.5 * rtn_inc),
        ("guided <= GPTQ", f"{guided_inc * 100:+.2f}% vs {gptq_inc * 100:+.2f}%", guided_inc <= gptq_inc),
        ("guided <= GPTQ, both with absmax scales", f"{guided_absmax_inc * 100:+.2f}% vs {absmax_inc * 100:+.2f}%",
         guided_absmax_inc <= absmax_inc),
    ]
    cols = ["recipe", "val loss", "val perplexity", "vs 16-bit", "weights on disk (MB)", "size vs 16-bit",
            "quantize time (s)"]
    lines = [
        "# Quantization of the demo student",
        "",
        f"- command: `python benchmarks/quant.py {' '.join(args.argv)}`".rstrip() + "",
        f"- machine: {cpu_model()} ({platform.machine()}), torch {torch.__version__}, {torch.get_num_threads()} "
        f"threads; commit {git_commit()}; {datetime.date.today()}",
        f"- teacher: {assets.teacher_note}",
        f"- student: demo shape (hidden 128, MLP 384, 2 layers, 4 heads / 2 KV), pruned + distilled {args.steps} "
        f"steps (fp32 val loss {kd_val['val_loss']:.4f}); calibration {args.calibration} training sequences of 128 "
        f"tokens; validation: the whole held-out split ({base.get('tokens', 0):,} tokens)",
        "- quantized perplexities are measured on the exported checkpoints as transformers loads them; sizes are "
        "the exports' *.safetensors bytes, the 16-bit row's is 2 bytes x parameters",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "|".join("---" for _ in cols) + "|",
        *("| " + " | ".join(r) + " |" for r in table),
        "",
        "## Goals",
        "",
        *(f"- {g}: {v} — **{'met' if ok else 'missed'}**" for g, v, ok in goals),
        "",
        f"Total wall time {time.perf_counter() - t_start:.0f} s.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        out.with_suffix(".json").write_text(json.dumps({"rows": results, "qad": qad, "goals": goals}, indent=1,
                                                       default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300, help="distillation steps of the demo student (and of QAD)")
    p.add_argument("--calibration", type=int, default=128, help="quant.calibration.samples")
    p.add_argument("--quick", action="store_true", help="smoke run: a 20-step teacher, 10-step students")
    p.add_argument("--out", default=None, help="write the markdown (+ .json beside it) here")
    add_demo_arguments(p)
    args = p.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    if args.quick:
        args.steps, args.calibration = 10, 16
        quick_defaults(args)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
