"""The GPU acceptance run's CPU-checkable parts: the script passes shellcheck and parses its arguments, and the
report writer (benchmarks/gpu_report.py) turns synthetic step outputs into the results files, failing the steps
whose output shows a failure their exit code hides. The run itself needs a GPU (`--dry-run` checks its inputs)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_acceptance.sh"
REPORT = REPO / "benchmarks" / "gpu_report.py"


def _report(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPORT), *args], capture_output=True, text=True, timeout=120)


def test_script_passes_shellcheck_and_rejects_unknown_arguments():
    tool = Path(sys.executable).with_name("shellcheck")
    found = str(tool) if tool.exists() else shutil.which("shellcheck")
    if found is None:
        pytest.fail("shellcheck is missing: install the dev extra (pip install -e '.[dev]')")
    res = subprocess.run([found, str(SCRIPT)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    res = subprocess.run(["bash", str(SCRIPT), "--bogus"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "unknown argument --bogus" in res.stderr
    res = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "--dry-run" in res.stdout


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_reports_from_synthetic_step_outputs(tmp_path):
    env = tmp_path / "env.json"
    env.write_text(json.dumps({"cuda_available": True, "device": "NVIDIA H200", "torch": "2.11.0", "torch_cuda": "13.0",
                               "python": "3.12.3", "attn": "sdpa", "imports": {"triton": {"ok": True, "version": "3.6"},
                               "flash_attn": {"ok": False, "error": "ModuleNotFoundError"}}}))
    # distill: the first window holds the warm-up and is left out of the steady state
    run = tmp_path / "distill"
    train = [{"event": "train", "step": 10 * i, "tokens": 163840 * i, "loss": 2.0 / i, "kd": 2.0 / i, "ce": 3.0,
              "tokens_per_s": tps, "tflops_per_device": 100.0, "mfu_step": mfu, "mfu_student": mfu / 2,
              "peak_mem_gib": 40.0} for i, (tps, mfu) in enumerate([(1e4, 0.01), (2e5, 0.2), (3e5, 0.3), (4e5, 0.4)], 1)]
    prune = {"event": "prune", "teacher_params": 134515008, "student_params": 81400000, "val_loss": 4.1,
             "calibration_tokens": 131072, "teacher_num_hidden_layers": 30, "student_num_hidden_layers": 20}
    _write_jsonl(run / "metrics.jsonl", [prune, *train, {"event": "eval", "step": 40, "tokens": 655360,
                                                         "val_loss": 1.5, "val_ppl": 4.48}])
    (run / "model").mkdir()
    (run / "model" / "config.json").write_text("{}")
    out = tmp_path / "distill_gpu.md"
    res = _report("distill", "--run", str(run), "--out", str(out), "--wall", "95", "--env", str(env), "--attn", "sdpa",
                  "--command", "python -m sapling distill ...")
    assert res.returncode == 0, res.stderr
    text = out.read_text()
    assert "| 300,000 | 100.0 | 30.0% | 15.0% | 40.0 |" in text  # medians of windows 2-4
    assert "NVIDIA H200" in text and "81,400,000" in text and "perplexity 4.48" in text
    # a run without training records fails the step even when the command exited 0
    _write_jsonl(tmp_path / "empty" / "metrics.jsonl", [prune])
    res = _report("distill", "--run", str(tmp_path / "empty"), "--out", str(out), "--wall", "1", "--env", str(env),
                  "--attn", "sdpa", "--command", "x")
    assert res.returncode == 1 and "no training records" in out.read_text()

    quant = tmp_path / "quant"
    _write_jsonl(quant / "metrics.jsonl", [
        {"event": "quantize_layer", "layer": 0, "wall_s": 0.5},
        {"event": "quantize", "scheme": "w4a16", "dtype": "bfloat16", "format": "w4g64", "method": "gptq",
         "quantized_linears": 140, "skipped": 0, "bytes_16bit": 162.8e6, "bytes": 60.1e6, "quantize_s": 12.5,
         "val_16bit": {"loss": 1.5, "ppl": 4.4817}, "val_quantized": {"loss": 1.52, "ppl": 4.5722}}])
    res = _report("quant", "--run", str(quant), "--out", str(tmp_path / "quant_gpu.md"), "--wall", "40", "--env",
                  str(env), "--command", "python -m sapling quantize ...")
    assert res.returncode == 0, res.stderr
    assert "| +2.02% |" in (tmp_path / "quant_gpu.md").read_text()

    # the kernel benchmark exits 0 when a row failed: its JSON decides; a skipped Liger row is fine, Triton must run
    kd = tmp_path / "kd.json"
    ok = {"times": [0.06, 0.05], "max_rel_err": 1e-3, "mem": {"peak_bytes": 2**30}}
    kd.write_text(json.dumps({"results": {"8192": {"ours_triton": ok, "liger": {"error": "skipped: not installed"}}}}))
    assert _report("kd", "--json", str(kd)).returncode == 0
    kd.write_text(json.dumps({"results": {"8192": {"ours_triton": {"error": "skipped: Triton chunk kernel not "
                                                                            "importable"}}}}))
    assert _report("kd", "--json", str(kd)).returncode == 1

    junit = tmp_path / "junit.xml"
    junit.write_text('<testsuites><testsuite><testcase classname="tests.gpu.test_gpu_paths" name="test_a" time="1.5"/>'
                     '<testcase classname="tests.gpu.test_gpu_paths" name="test_b" time="2"><failure message="boom">'
                     "trace</failure></testcase></testsuite></testsuites>")
    res = _report("tests", "--junit", str(junit), "--out", str(tmp_path / "tests_gpu.md"))
    assert res.returncode == 1 and "1 passed, 1 failed" in res.stdout
    assert "| `test_gpu_paths::test_b` | failed | 2.0 | boom |" in (tmp_path / "tests_gpu.md").read_text()

    steps = tmp_path / "steps.tsv"
    steps.write_text("env\tpassed\t5\tNVIDIA H200\ntests\tfailed (exit 1)\t80\t1 passed, 1 failed\n")
    res = _report("summary", "--steps", str(steps), "--env", str(env), "--out", str(tmp_path / "summary.md"))
    assert res.returncode == 0, res.stderr
    summary = (tmp_path / "summary.md").read_text()
    assert "**FAILED: tests**" in summary and "| tests | failed (exit 1) | 80 | 1 passed, 1 failed |" in summary
