"""Sapling's GPTQ (plain and distillation-guided) vs llm-compressor's, on SmolLM2-135M-Instruct's real weights.

    python benchmarks/peers/quant.py [--models teacher student] [--samples 64] [--val-tokens 16384]
                                     [--peers-python .venv-peers/bin/python] [--out benchmarks/results/peers_quant_cpu.md]
                                     [--rows ROW ...] [--spread 1,4] [--add-only | --spread-only]
                                     [--render-only]

Run with Sapling's virtualenv; llm-compressor runs in the peers' (benchmarks/peers/README.md). Models: the
teacher itself, and a student (the teacher pruned by `sapling prune` to 20 layers / MLP 576 and distilled for
`--kd-steps` steps) for which guided GPTQ has a teacher to follow. Calibration: the `--samples` training
sequences `sapling quantize` draws (written to a tensor file and fed to llm-compressor unshuffled, so both
see the same tokens). Rows, each in a fresh process:

- Sapling: `sapling quantize quant.method=gptq` w4a16 (g64) and w8a16 (per channel), and with
  `quant.guided=true` (the student only: the teacher against itself has no KD loss);
- llm-compressor: `oneshot` + `GPTQModifier`, W4A16 at group size 64 and W8A16 per channel (quant_worker.py);
- the w4 rows again with MSE-searched group scales: Sapling's `quant.observer=mse`, llm-compressor's `mse`
  weight observer (its own search: shrink down to 0.8 of the range on a 100-step grid, error norm 2.4).

Every export (and each 16-bit model) is scored by one evaluator: mean next-token NLL over the first
`--val-tokens` held-out tokens, as the peers' transformers + compressed-tensors load it (float32 compute).
Each export is also loaded by Sapling's own environment (its transformers and compressed-tensors pins): the
"cross-load" column is its loss there minus the peers' loss (0 = the other stack reads it identically). The
two exports' `quantization_config` fields are compared, and every difference is listed. Quantize time:
calibration + quantization + export, not loading or evaluation, as each tool reports it.

`--spread 1,4` quantizes w4 with both tools again at those calibration batch sizes (the main rows: Sapling 8,
llm-compressor 1): the same sequences summed in another order, so the table shows how far GPTQ's result moves on
float rounding alone, beside the gap between the tools. `--spread-only` adds that to an existing results file;
`--add-only --rows ROW ...` adds the rows it lacks (both keep the file's header and rows, and say what was added).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer_common import (  # noqa: E402
    REPO,
    header,
    peers_python,
    ratio,
    remeasured_note,
    rewrite_results,
    run_measured,
    tail,
    versions,
    write_results,
)

STUDENT_SHAPE = {"num_hidden_layers": 20, "intermediate_size": 576}
ROWS = [  # (key, tool, scheme, guided, observer)
    ("sapling_w4", "sapling", "w4a16", False, "minmax"),
    ("sapling_guided_w4", "sapling", "w4a16", True, "minmax"),
    ("llmc_w4", "llmc", "w4a16", False, "minmax"),
    ("sapling_w4_mse", "sapling", "w4a16", False, "mse"),
    ("sapling_guided_w4_mse", "sapling", "w4a16", True, "mse"),
    ("llmc_w4_mse", "llmc", "w4a16", False, "mse"),
    ("sapling_w8", "sapling", "w8a16", False, "minmax"),
    ("llmc_w8", "llmc", "w8a16", False, "minmax"),
]
ROW_KEYS = [r[0] for r in ROWS]
LABELS = {"sapling": "Sapling GPTQ", "llmc": "llm-compressor GPTQ"}
OBSERVER_LABELS = {"minmax": "", "mse": ", mse scales"}
OBSERVER_SUFFIX = {"minmax": "", "mse": "_mse"}


def setup(args: argparse.Namespace):
    from real_model import Setup

    return Setup(argparse.Namespace(cache_dir=args.cache_dir, corpus_bytes=args.corpus_bytes, work=args.work,
                                    calibration_samples=32, val_tokens=args.val_tokens))


def distilled_student(s, args: argparse.Namespace) -> Path:
    """The teacher pruned to STUDENT_SHAPE and distilled for --kd-steps (made once in the work dir)."""
    if args.student:
        return Path(args.student)
    from demo_assets import compose_cfg

    from sapling.recipes.distill import run_distill

    out = s.work / "student_kd"
    if not (out / "model" / "config.json").exists():
        print(f"pruning the teacher to {STUDENT_SHAPE} and distilling {args.kd_steps} steps into {out} ...", flush=True)
        run_distill(compose_cfg(*s.overrides("distill", out), "trainer.overwrite=true", "hooks.pre=[prune]",
                                "prune.target.params=null", *(f"prune.target.{k}={v}" for k, v in STUDENT_SHAPE.items()),
                                f"trainer.max_steps={args.kd_steps}", "trainer.eval_every=0"))
    return out / "model"


SAPLING_BATCH, LLMC_BATCH = 8, 1  # calibration batch sizes of the main rows (llm-compressor's: oneshot's default)


def quant_overrides(s, model: Path, out: Path, args: argparse.Namespace, scheme: str, guided: bool,
                    batch_size: int = SAPLING_BATCH, observer: str = "minmax") -> list[str]:
    return ["experiment=smollm2", "logger=none", f"output_dir={out}", f"model.path={model}",
            f"teacher.path={s.teacher_dir}", f"data.files=[{s.corpus}]", f"data.tokenizer={s.teacher_dir}",
            "data.seq_len=256", "seed=0", "quant.dtype=float32", f"quant.scheme={scheme}", "quant.group_size=64",
            "quant.method=gptq", f"quant.observer={observer}",
            f"quant.guided={str(guided).lower()}", f"quant.calibration.samples={args.samples}",
            f"quant.calibration.batch_size={batch_size}", "quant.eval=false", "trainer.progress=false"]


def token_files(s, model: Path, args: argparse.Namespace, work: Path) -> tuple[Path, Path]:
    """The calibration sequences `sapling quantize` draws, and the first --val-tokens held-out blocks."""
    from demo_assets import compose_cfg

    from sapling.data.calibration import calibration_batches
    from sapling.models import load_tokenizer
    from sapling.recipes.common import load_data

    cfg = compose_cfg("command=quantize", *quant_overrides(s, model, work / "unused", args, "w4a16", False))
    data = load_data(cfg, load_tokenizer(str(s.teacher_dir)))
    calib = torch.cat([b["input_ids"] for b in calibration_batches(data.train, args.samples, 8, "cpu", seed=cfg.seed)])
    n_val = args.val_tokens // cfg.data.seq_len
    if len(data.val) < n_val:
        raise SystemExit(f"--val-tokens={args.val_tokens}: the held-out split has only {len(data.val)} blocks")
    val = torch.stack([data.val[i] for i in range(n_val)])
    work.mkdir(parents=True, exist_ok=True)
    torch.save(calib, work / "calibration.pt")
    torch.save(val, work / "val.pt")
    return work / "calibration.pt", work / "val.pt"


def evaluate(python: Path | str, model: Path, val: Path, work: Path, name: str, env: str = "peers") -> dict[str, Any]:
    """Loss of `model` on the blocks of `val`, loaded by `python`'s environment (`env` names it in file names)."""
    res = work / f"eval-{name}-{env}.json"
    log = res.with_suffix(".log")
    m = run_measured([str(python), str(Path(__file__).with_name("quant_worker.py")), "eval", "--model", str(model),
                      "--blocks", str(val), "--result", str(res)], log)
    if m["rc"] != 0:
        return {"error": f"exit {m['rc']}: {tail(log, 1)[:300]}"}
    return json.loads(res.read_text())


def export_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.glob("*.safetensors"))


def quant_config(d: Path) -> dict[str, Any]:
    return json.loads((d / "config.json").read_text()).get("quantization_config", {})


def flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def config_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    fa, fb = flat(a), flat(b)
    return [f"`{k}`: Sapling {fa.get(k, '(absent)')!r}, llm-compressor {fb.get(k, '(absent)')!r}"
            for k in sorted(set(fa) | set(fb)) if fa.get(k, "(absent)") != fb.get(k, "(absent)")]


def quantize_row(args, s, py: Path, work: Path, model: Path, key: str, tool: str, scheme: str, guided: bool,
                 calib: Path, val: Path, batch_size: int, observer: str = "minmax") -> dict[str, Any]:
    """One export in a fresh process (`sapling quantize` or llm-compressor's worker), its time, size, and its loss
    in both environments."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = work / f"{key}-{stamp}"
    log = work / f"{key}-{stamp}.log"
    if tool == "sapling":
        cmd = [str(Path(sys.executable).with_name("sapling")), "quantize",
               *quant_overrides(s, model, out, args, scheme, guided, batch_size, observer)]
        export = out / "model"
    else:
        export = out
        cmd = [str(py), str(Path(__file__).with_name("quant_worker.py")), "llmc", "--model", str(model),
               "--calibration", str(calib), "--scheme", scheme, "--group-size", "64", "--batch-size", str(batch_size),
               "--observer", observer, "--out", str(out), "--result", str(work / f"{key}-{stamp}.json")]
    m = run_measured(cmd, log)
    if m["rc"] != 0:
        print(f"  failed (see {log}):\n{tail(log)}", flush=True)
        return {"error": f"exit {m['rc']}: {tail(log, 1)[:300]}", "log": str(log)}
    if tool == "sapling":
        recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
        quantize_s = [r for r in recs if r.get("event") == "quantize"][-1]["quantize_s"]
    else:
        quantize_s = json.loads((work / f"{key}-{stamp}.json").read_text())["quantize_s"]
    row = {"tool": tool, "scheme": scheme, "guided": guided, "observer": observer, "export": str(export), "quantize_s": quantize_s,
           "batch_size": batch_size, "process_wall_s": m["wall_s"], "peak_rss": m["hwm"],
           "bytes": export_bytes(export), "eval": evaluate(py, export, val, work, key),
           "cross": evaluate(sys.executable, export, val, work, key, "sapling"),
           "quantization_config": quant_config(export)}
    print(f"  loss {row['eval'].get('loss', float('nan')):.4f} (Sapling's env: "
          f"{row['cross'].get('loss', float('nan')):.4f}), {quantize_s:.1f} s", flush=True)
    return row


def run_model(args, s, py: Path, name: str, model: Path, calib: Path, val: Path) -> dict[str, Any]:
    work = s.work / name
    res: dict[str, Any] = {"model": str(model), "16bit": evaluate(py, model, val, work, "16bit"), "rows": {}}
    print(f"{name}: 16-bit loss {res['16bit'].get('loss', float('nan')):.4f}", flush=True)
    run_rows(args, s, py, name, model, res, calib, val)
    return res


def run_rows(args, s, py: Path, name: str, model: Path, res: dict[str, Any], calib: Path, val: Path) -> None:
    """The --rows that `res` lacks (the teacher has no guided rows), each added to res["rows"]."""
    work = s.work / name
    for key, tool, scheme, guided, observer in ROWS:
        if key not in args.rows or key in res["rows"] or (guided and name == "teacher"):
            continue
        print(f"{name}: {key} ...", flush=True)
        res["rows"][key] = quantize_row(args, s, py, work, model, key, tool, scheme, guided, calib, val,
                                        SAPLING_BATCH if tool == "sapling" else LLMC_BATCH, observer)


def run_spread(args, s, py: Path, name: str, model: Path, res: dict[str, Any], calib: Path, val: Path) -> None:
    """GPTQ w4 by both tools again at each of --spread's calibration batch sizes (the same sequences, summed in
    another order): how far the result moves on float rounding alone, beside the gap between the tools."""
    work = s.work / name
    spread = res.setdefault("spread", {})
    for tool, main_batch in (("sapling", SAPLING_BATCH), ("llmc", LLMC_BATCH)):
        losses = spread.setdefault(tool, {})
        main = res["rows"].get(f"{tool}_w4", {})
        if "loss" in main.get("eval", {}):
            losses[str(main_batch)] = main["eval"]["loss"]
        for b in args.spread:
            if str(b) in losses:
                continue
            print(f"{name}: {tool}_w4, calibration batch size {b} ...", flush=True)
            row = quantize_row(args, s, py, work, model, f"{tool}_w4_b{b}", tool, "w4a16", False, calib, val, b)
            if "loss" in row.get("eval", {}):
                losses[str(b)] = row["eval"]["loss"]


def widest_spread(spread: dict[str, dict[str, float]]) -> float:
    """The largest range of one tool's losses over the calibration batch sizes."""
    return max((max(v.values()) - min(v.values()) for v in spread.values() if v), default=0.0)


def spread_note(spread: dict[str, dict[str, float]], gap: float) -> str:
    """Whether the tools' w4 gap is larger than what one tool's result moves by on float rounding alone."""
    widest = widest_spread(spread)
    return (f"; the gap ({gap:+.4f} nats) is {'inside' if abs(gap) <= widest else 'outside'} one tool's run-to-run "
            f"spread ({widest:.4f} nats, below)")


def spread_lines(results: dict[str, Any]) -> list[str]:
    """The spread section: each tool's w4 loss at every calibration batch size measured, and the range."""
    lines = []
    for name, res in results.items():
        spread = res.get("spread")
        if not spread:
            continue
        sizes = sorted({int(b) for losses in spread.values() for b in losses})
        if not lines:
            lines += ["", "## Run-to-run spread: GPTQ w4 at other calibration batch sizes", "",
                      "The same calibration sequences in batches of another size: the sums behind each Hessian and "
                      "the layers' outputs are rounded in another order, and GPTQ's rounding decisions follow. "
                      "The main rows use batch size "
                      f"{SAPLING_BATCH} (Sapling's default) and {LLMC_BATCH} (llm-compressor's `oneshot` default).", "",
                      "| model | tool | " + " | ".join(f"batch {b}" for b in sizes) + " | range |",
                      "|---|---|" + "---|" * (len(sizes) + 1)]
        for tool, losses in spread.items():
            vals = [losses.get(str(b)) for b in sizes]
            got = [v for v in vals if v is not None]
            lines.append(f"| {name} | {LABELS[tool]} | " + " | ".join("-" if v is None else f"{v:.4f}" for v in vals)
                         + (f" | {max(got) - min(got):.4f} |" if got else " | - |"))
        every = [v for losses in spread.values() for v in losses.values()]
        sap = spread.get("sapling", {}).values()
        peer = spread.get("llmc", {}).values()
        if sap and peer:
            mean_gap = sum(sap) / len(sap) - sum(peer) / len(peer)
            lines.append("")
            lines.append(f"- {name}: the two tools' w4 losses span {min(every):.4f}-{max(every):.4f}; mean over the "
                         f"batch sizes, Sapling {sum(sap) / len(sap):.4f} vs llm-compressor {sum(peer) / len(peer):.4f} "
                         f"({mean_gap:+.4f}); the widest spread of one tool is {widest_spread(spread):.4f}")
    return lines


def render(args, results: dict[str, Any], peer_versions: dict[str, str]) -> str:
    lines = [header("Quantization: Sapling's GPTQ vs llm-compressor's (CPU)", sys.argv, peer_versions, [
        "- SmolLM2-135M-Instruct (teacher) and a student ("
        + (f"`--student` {args.student}" if args.student else
           f"pruned to {STUDENT_SHAPE}, distilled {args.kd_steps} steps")
        + f"); calibration: the same {args.samples} training sequences of 256 tokens for both tools; loss: "
        f"mean next-token NLL over the first {args.val_tokens:,} held-out tokens (the peers' transformers + "
        "compressed-tensors load every export; float32 compute); size: the export's *.safetensors bytes.",
        "- w4 = int4 symmetric, groups of 64 along the input; w8 = int8 symmetric per output channel; lm_head "
        "(tied to the embeddings) left 16-bit by both; GPTQ with static activation order, block 128, "
        "dampening 0.01 in both; scales and the tensors left unquantized in float32 in both (the converted "
        "checkpoint's dtype, which llm-compressor keeps; Sapling's `quant.dtype=float32`).", ""])]
    cols = ["model", "recipe", "loss (16-bit)", "loss", "perplexity increase", "vs llm-compressor (increase)",
            "size (MiB)", "quantize (s)", "time vs llm-compressor", "cross-load: loss in Sapling's env - loss here"]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    goals, diffs = [], []
    for name, res in results.items():
        base = res["16bit"].get("loss")
        rows = res["rows"]

        def inc(r: dict[str, Any], base: float | None = base) -> float | None:
            return math.exp(r["eval"]["loss"] - base) - 1 if "loss" in r.get("eval", {}) and base else None

        for key, tool, scheme, guided, observer in ROWS:
            r = rows.get(key)
            if r is None:
                continue
            label = f"{LABELS[tool]}{' guided' if guided else ''} {scheme.split('a')[0]}{OBSERVER_LABELS[observer]}"
            if "error" in r:
                lines.append(f"| {name} | {label} | failed: {r['error']} |" + " |" * (len(cols) - 3))
                continue
            peer = rows.get(f"llmc_{scheme.split('a')[0]}{OBSERVER_SUFFIX[observer]}", {})
            i, ip = inc(r), inc(peer) if "eval" in peer else None
            cross = r["cross"].get("loss")
            lines.append("| " + " | ".join([
                name, label, f"{base:.4f}", f"{r['eval']['loss']:.4f}", f"{100 * i:+.2f}%",
                ratio(i, ip) if tool == "sapling" else "1.00x", f"{r['bytes'] / 2**20:.1f}", f"{r['quantize_s']:.1f}",
                ratio(r["quantize_s"], peer.get("quantize_s")) if tool == "sapling" else "1.00x",
                f"{cross - r['eval']['loss']:+.2e}" if cross is not None else r["cross"].get("error", "-")]) + " |")
        for bits, observer in (("w4", "minmax"), ("w4", "mse"), ("w8", "minmax")):
            suffix = OBSERVER_SUFFIX[observer]
            sap, peer = rows.get(f"sapling_{bits}{suffix}", {}), rows.get(f"llmc_{bits}{suffix}", {})
            if "eval" in sap and "eval" in peer:
                lo, lp = sap["eval"]["loss"], peer["eval"]["loss"]
                t = sap["quantize_s"] / peer["quantize_s"]
                what = f"{name} {bits}{OBSERVER_LABELS[observer]}"
                goals.append(f"- {what}: Sapling's perplexity {math.exp(lo):.3f} vs llm-compressor's "
                             f"{math.exp(lp):.3f} (goal <=: {'met' if lo <= lp else 'missed'}) at {t:.2f}x its time "
                             f"(goal <= 1.0x: {'met' if t <= 1.0 else 'missed'})"
                             + (spread_note(res["spread"], lo - lp) if not suffix and bits == "w4"
                                and res.get("spread") else ""))
                diffs.append(f"- {what}:")
                diffs += [f"  - {d}" for d in config_differences(sap["quantization_config"],
                                                                  peer["quantization_config"])] or ["  - none"]
        for observer, suffix in OBSERVER_SUFFIX.items():
            g = rows.get(f"sapling_guided_w4{suffix}", {})
            plain = [rows[k]["eval"]["loss"] for k in (f"sapling_w4{suffix}", f"llmc_w4{suffix}")
                     if "eval" in rows.get(k, {})]
            if "eval" in g and plain:
                goals.append(f"- {name}: guided GPTQ w4{OBSERVER_LABELS[observer]} loss {g['eval']['loss']:.4f} vs "
                             f"the better plain GPTQ {min(plain):.4f} (goal: below both: "
                             f"{'met' if g['eval']['loss'] < min(plain) else 'missed'})")
    lines += ["", "## Goals", "", *goals, *spread_lines(results), "",
              "## quantization_config: Sapling's export vs llm-compressor's", "", *diffs, ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["teacher", "student"], choices=["teacher", "student"])
    p.add_argument("--samples", type=int, default=64, help="calibration sequences (256 tokens)")
    p.add_argument("--val-tokens", type=int, default=16384)
    p.add_argument("--kd-steps", type=int, default=40, help="distillation steps of the student")
    p.add_argument("--student", default=None, help="a distilled student checkpoint to use instead")
    p.add_argument("--peers-python", default=None)
    p.add_argument("--corpus-bytes", type=int, default=1_500_000)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--work", default="/tmp/sapling-peers/quant")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "peers_quant_cpu.md"))
    p.add_argument("--spread", type=batch_sizes, default=[], metavar="B,B,...",
                   help="also quantize w4 with both tools at these calibration batch sizes (run-to-run spread)")
    p.add_argument("--spread-only", action="store_true",
                   help="keep --out's rows and header; measure only --spread for --models, add it to the file")
    p.add_argument("--rows", nargs="+", default=ROW_KEYS, choices=ROW_KEYS, metavar="ROW",
                   help=f"the rows to measure (default: all of {', '.join(ROW_KEYS)})")
    p.add_argument("--add-only", action="store_true",
                   help="keep --out's rows and header; measure only the --rows (and --spread) it lacks for --models")
    p.add_argument("--render-only", action="store_true", help="rewrite --out from its .json, measuring nothing")
    args = p.parse_args(argv)
    if args.spread_only and not args.spread:
        p.error("--spread-only needs --spread B,B,...")
    if args.render_only:
        return add_only(args, None, None, json.loads(Path(args.out).with_suffix(".json").read_text())["versions"])
    py = peers_python(args.peers_python)
    peer_versions = versions(py)
    s = setup(args)
    if args.spread_only or args.add_only:
        return add_only(args, s, py, peer_versions)
    models = {"teacher": s.teacher_dir}
    if "student" in args.models:
        models["student"] = distilled_student(s, args)
    results = {}
    for name in args.models:
        calib, val = token_files(s, models[name], args, s.work / name)
        results[name] = run_model(args, s, py, name, models[name], calib, val)
        if args.spread:
            run_spread(args, s, py, name, models[name], results[name], calib, val)
        text = render(args, results, peer_versions)
        write_results(args.out, text, peer_versions, results)
    print(text)
    return 0


def batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive batch sizes, e.g. 1,4")
    return sizes


SPREAD_NOTE = "- spread measured"
ROWS_NOTE = "- rows added"


def add_only(args, s, py: Path | None, peer_versions: dict[str, str]) -> int:
    """--spread-only / --add-only: the rows in --out's .json and the file's header stand (their command, date,
    commit); the spread runs (and with --add-only the --rows the file lacks) are added for each of --models the file
    has, a header line says which and when, and the file is rendered again. --render-only: only the latter."""
    out = Path(args.out)
    record = json.loads(out.with_suffix(".json").read_text())
    results = record["results"]
    flag = "--add-only" if args.add_only else "--spread-only"
    missing = [n for n in ([] if args.render_only else args.models) if n not in results]
    if missing:
        raise SystemExit(f"{flag}: {out.with_suffix('.json')} has no {missing[0]} rows (run without {flag})")
    note = None if args.render_only else remeasured_note(ROWS_NOTE if args.add_only else SPREAD_NOTE)
    args.student = args.student or results.get("student", {}).get("model")

    def save() -> None:
        rewrite_results(out, "| model | recipe", render(args, results, peer_versions), peer_versions, results,
                        record["argv"], note)

    for name in [] if args.render_only else args.models:
        model = Path(results[name]["model"])
        calib, val = token_files(s, model, args, s.work / name)
        if args.add_only:
            run_rows(args, s, py, name, model, results[name], calib, val)
            save()
        if args.spread:
            run_spread(args, s, py, name, model, results[name], calib, val)
            save()
    if args.render_only:
        save()
    print(out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
