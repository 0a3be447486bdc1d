"""`sapling export checkpoint=<dir> [output=<dir>]`: an HF model from a training checkpoint (DeepSpeed ZeRO
or not). No Hydra: two paths, no config tree."""

from __future__ import annotations

from pathlib import Path

from sapling.errors import ConfigError
from sapling.train.export import export_checkpoint


def run_export(args: list[str]) -> Path:
    """The `key=value` arguments of `sapling export` checked, then the checkpoint exported; the model's dir."""
    keys = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or key not in ("checkpoint", "output"):
            raise ConfigError(key, value or None, "export takes no such argument", "pass checkpoint=<dir> [output=<dir>]")
        keys[key] = value
    if "checkpoint" not in keys:
        raise ConfigError("checkpoint", None, "export needs a checkpoint",
                          "pass checkpoint=<output_dir, its checkpoints/ folder or a global_step folder>")
    return export_checkpoint(keys["checkpoint"], keys.get("output"))
