"""torchrun entry: several worker scripts' `main(result.json)`, one after another, in the same 2 ranks.

argv: out_dir worker.py ... Each worker still initialises (idempotently) the process group, builds its own
models from its own seeds and writes `out_dir/<worker stem>.json`; sharing the launch only saves starting
2 ranks and importing DeepSpeed once per worker. Any worker's error on any rank ends the whole launch.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path


def main(out_dir: str, *workers: str) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    for path in map(Path, workers):
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.main(str(Path(out_dir) / f"{path.stem}.json"))


if __name__ == "__main__":
    main(*sys.argv[1:])
