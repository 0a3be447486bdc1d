"""What the peer comparisons share: the peers' interpreter, their versions, a subprocess runner that samples
the child's memory, and the results files' header."""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE.parent))  # benchmarks/: real_model, machine, demo_assets
from machine import cpu_model, git_commit  # noqa: E402

SETUP = ("python3 -m venv .venv-peers && .venv-peers/bin/pip install -r benchmarks/peers/requirements.txt && "
         ".venv-peers/bin/pip install --no-deps -e .")
PEER_PACKAGES = ("torch", "transformers", "trl", "llmcompressor", "compressed-tensors", "liger-kernel", "accelerate")


def peers_python(path: str | None) -> Path:
    """The peers' interpreter (`--peers-python`, default .venv-peers/bin/python); one line naming the set-up
    command when it is missing."""
    py = Path(path) if path else REPO / ".venv-peers" / "bin" / "python"
    if not py.exists():
        raise SystemExit(f"--peers-python={py}: no such interpreter; fix: run the peers' set-up from the repository "
                         f"root: {SETUP}")
    return py


def versions(python: Path | str, packages: tuple[str, ...] = PEER_PACKAGES) -> dict[str, str]:
    """Installed versions of `packages` in `python`'s environment ("-" where absent)."""
    code = (f"import json, importlib.metadata as m\nout = {{}}\nfor p in {packages!r}:\n"
            "    try: out[p] = m.version(p)\n    except m.PackageNotFoundError: out[p] = '-'\nprint(json.dumps(out))")
    res = subprocess.run([str(python), "-c", code], capture_output=True, text=True, cwd="/")
    return json.loads(res.stdout) if res.returncode == 0 else {p: "?" for p in packages}


def _status(pid: int) -> tuple[int, int] | None:
    """(VmRSS, VmHWM) of `pid` in bytes; None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    vals = {}
    for line in text.splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            key, num, _unit = line.split()
            vals[key[:-1]] = int(num) * 1024
    return (vals.get("VmRSS", 0), vals.get("VmHWM", 0)) if vals else None


def run_measured(cmd: list[str], log: Path, *, env: dict[str, str] | None = None, interval: float = 0.05,
                 timeout: float = 4 * 3600) -> dict[str, Any]:
    """Runs `cmd` (stdout and stderr to `log`), sampling its resident memory every `interval` seconds.
    Returns the exit code, the wall time, the samples [(unix time, RSS bytes)] and the final high-water mark."""
    log.parent.mkdir(parents=True, exist_ok=True)
    samples: list[tuple[float, int]] = []
    hwm = 0
    t0 = time.time()
    with log.open("w") as f:
        f.write("$ " + shlex.join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, cwd=REPO)
        while proc.poll() is None:
            st = _status(proc.pid)
            if st:
                samples.append((time.time(), st[0]))
                hwm = max(hwm, st[1])
            if time.time() - t0 > timeout:
                proc.kill()
            time.sleep(interval)
    return {"rc": proc.returncode, "wall_s": time.time() - t0, "samples": samples, "hwm": hwm}


def train_peak(samples: list[tuple[float, int]], start: float) -> dict[str, float]:
    """RSS when training began (models loaded), the peak RSS after it, and their difference: what the steps
    themselves held (activations, logits, gradients, optimizer state)."""
    before = [rss for t, rss in samples if t <= start]
    after = [rss for t, rss in samples if t > start]
    base = before[-1] if before else (after[0] if after else 0)
    peak = max(after, default=base)
    return {"rss_at_start": base, "peak_rss": peak, "train_peak": peak - base}


def tail(log: Path, lines: int = 5) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


def device_name(device: str = "cpu") -> str:
    if device == "cuda":
        import torch

        return f"GPU ({torch.cuda.get_device_name()})"
    return f"CPU ({cpu_model()}, {platform.machine()}, {os.cpu_count()} threads)"


def header(title: str, argv: list[str], peer_versions: dict[str, str], extra: list[str] | None = None,
           device: str = "cpu") -> str:
    from importlib.metadata import version

    ours = {p: version(p) for p in ("torch", "transformers")}
    lines = [f"# {title}", "",
             f"- command: `python {shlex.join(argv)}` — {datetime.date.today()}, commit {git_commit()}, "
             f"{device_name(device)}",
             f"- peers' virtualenv (`{SETUP}`): " + ", ".join(f"{k} {v}" for k, v in peer_versions.items()),
             f"- Sapling's virtualenv: sapling (this commit), torch {ours['torch']}, transformers {ours['transformers']}"]
    return "\n".join(lines + (extra or [])) + "\n"


def ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or not b else f"{a / b:.2f}x"


def write_results(out: str | Path, text: str, peer_versions: dict[str, str], results: dict[str, Any],
                  argv: list[str] | None = None) -> None:
    """The markdown `text` at `out` and the raw `results` beside it (.json, with the command that measured them:
    `argv`, default this one); rewritten after every part."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"argv": argv or sys.argv, "versions": peer_versions,
                                                    "results": results}, indent=1) + "\n")


def rewrite_results(out: str | Path, mark: str, rendered: str, peer_versions: dict[str, str], results: dict[str, Any],
                    argv: list[str], note: tuple[str, str] | None = None) -> None:
    """Write `rendered` (a whole results file) to `out` from its line starting `mark` on, keeping the header `out`
    already has (the measuring command, date, commit, versions). `note` (prefix, line): a line added to the header,
    replacing an earlier one with that prefix (what was measured again, and when)."""
    old = Path(out).read_text()
    head = old[:old.index(mark)].rstrip("\n").splitlines()
    if note is not None:
        head = [x for x in head if not x.startswith(note[0])] + [note[1]]
    write_results(out, "\n".join(head) + "\n\n\n" + rendered[rendered.index(mark):], peer_versions, results,
                  argv=argv)


def remeasured_note(prefix: str) -> tuple[str, str]:
    """The header line of a partial re-measurement: `prefix`, today's date, the commit and this command."""
    return prefix, f"{prefix}, {time.strftime('%Y-%m-%d')}, commit {git_commit()}: `python {shlex.join(sys.argv)}`"
