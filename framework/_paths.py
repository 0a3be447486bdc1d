"""Keep a source checkout's top-level folders from shadowing installed packages.

`python -m ...` puts the working directory first on `sys.path`. Run from the repository root, the
checkout's `kernels/` folder (installed as `sapling.kernels`) would then be found as the top-level
`kernels` package, which transformers imports for its hub kernels. Dropping the checkout's root from
`sys.path` is safe: Sapling itself is imported through its installed package mapping.
"""

from __future__ import annotations

import sys
from pathlib import Path


def drop_checkout_root() -> None:
    root = Path(__file__).resolve().parent.parent
    if not ((root / "framework").is_dir() and (root / "kernels" / "fused_kd_loss.py").is_file()):
        return  # an installed copy, not a checkout
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != root]
