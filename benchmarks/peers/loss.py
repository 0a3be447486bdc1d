"""Sapling's fused KD loss vs Liger's `LigerFusedLinearJSDLoss` (and naive torch) at the real SmolLM2-135M head
shapes, beside DESIGN's synthetic ones, in one run.

    python benchmarks/peers/loss.py [--shapes design smollm2 smollm2_width] [--repeats 5]
                                    [--peers-python .venv-peers/bin/python] [--out benchmarks/results/peers_loss_cpu.md]

Runs `benchmarks/kd_loss.py` once per shape set with the peers' interpreter (Liger and its torch.compile come
from there; `sapling.kernels` needs only torch and is installed there by the set-up's `--no-deps -e .`), so
ours, Liger and naive share one process per timing, as kd_loss.py always measures them, and merges the
tables. Shape sets: `design` (Hs=512, Ht=1024, V=32,000 on CPU), `smollm2` (Hs=Ht=576, V=49,152: a
depth-pruned student), `smollm2_width` (Hs=432, Ht=576: the width-pruned one of the real-model benchmark).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer_common import REPO, header, peers_python, versions  # noqa: E402

SETS = {"design": "DESIGN's CPU shapes (synthetic)", "smollm2": "SmolLM2-135M head, depth-pruned student",
        "smollm2_width": "SmolLM2-135M head, width-pruned student (Hs=432)"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=list(SETS), choices=list(SETS))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--n", type=int, nargs="+", default=None, help="token counts (default: each set's)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--peers-python", default=None)
    p.add_argument("--out", default=None, help="default benchmarks/results/peers_loss_<device>.md")
    args = p.parse_args(argv)
    py = peers_python(args.peers_python)
    out = Path(args.out or REPO / "benchmarks" / "results" / f"peers_loss_{args.device}.md")
    sections = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.shapes:
            part = Path(tmp) / f"{name}.md"
            cmd = [str(py), str(REPO / "benchmarks" / "kd_loss.py"), "--device", args.device, "--shapes", name,
                   "--repeats", str(args.repeats), "--variants", "naive", "ours_torch", "ours_triton", "liger",
                   "--out", str(part), *(["--n", *map(str, args.n)] if args.n else [])]
            print(f"{name}: {' '.join(cmd)}", flush=True)
            proc = subprocess.run(cmd, cwd=REPO)
            if proc.returncode != 0 or not part.exists():
                sections.append(f"## {SETS[name]}\n\nfailed: kd_loss.py exit {proc.returncode}\n")
                continue
            body = part.read_text().split("\n", 2)[2]  # kd_loss's own header lines, without its title
            sections.append(f"## {SETS[name]} (`--shapes {name}`)\n\n{body}")
    text = header("Fused KD loss: Sapling vs Liger at the real model's shapes", sys.argv, versions(py), [
        "- every section is `benchmarks/kd_loss.py` run by the peers' interpreter (its header lines follow); "
        "'ours' = `sapling.kernels.fused_linear_kd_loss` (torch chunk path on CPU, Triton on CUDA)", ""])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n" + "\n".join(sections))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
