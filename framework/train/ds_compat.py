"""The private DeepSpeed APIs Sapling relies on, each behind one function (tested in tests/train/test_ds_compat.py).

DeepSpeed offers no public call for these three: a ZeRO-3 model's whole 16-bit state dict without writing a
checkpoint, closing a micro-batch's backward when the loop calls the module's parts instead of the engine's
forward, and converting a checkpoint to the universal format from Python instead of its command line.
pyproject.toml pins `deepspeed` to the minor range they were tested with; a DeepSpeed that moves one of them
fails tests/train/test_ds_compat.py loudly, before any run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

# The names used below, on the classes that hold them (the test checks they are still there).
ENGINE_PRIVATE = "_zero3_consolidated_16bit_state_dict"
OPTIMIZER_PRIVATE = "clear_backward_seen_flag"


def zero3_full_state_dict(engine: Any) -> dict[str, torch.Tensor]:
    """The whole model's 16-bit weights on rank 0 (an empty dict elsewhere), gathered one module at a time;
    every rank must call it."""
    return getattr(engine, ENGINE_PRIVATE)()


def end_backward(engine: Any) -> None:
    """Tell the ZeRO optimizer that this micro-batch's backward is over (what the engine's next forward would
    do), so the next backward accumulates into the gradient partitions instead of overwriting them."""
    getattr(engine.optimizer, OPTIMIZER_PRIVATE)()


def universal_args(input_folder: str | Path, output_folder: str | Path) -> argparse.Namespace:
    """The arguments of `ds_to_universal.main`, parsed by its own command-line parser (so an option it adds
    gets its default, and one it renames fails here): one worker each, strict checks, missing state injected."""
    from deepspeed.checkpoint import ds_to_universal

    argv = ["ds_to_universal", "--input_folder", str(input_folder), "--output_folder", str(output_folder),
            "--num_extract_workers", "1", "--num_merge_workers", "1", "--inject_missing_state"]
    saved = sys.argv
    sys.argv = argv
    try:
        return ds_to_universal.parse_arguments()  # prints the arguments: the caller silences stdout
    except SystemExit as exc:  # argparse refused an option: this DeepSpeed renamed or dropped it
        raise RuntimeError(f"deepspeed's ds_to_universal no longer accepts {argv[1:]} (exit {exc.code}); use the "
                           "deepspeed version pyproject.toml pins") from None
    finally:
        sys.argv = saved


def to_universal(input_folder: str | Path, output_folder: str | Path) -> None:
    """DeepSpeed's `ds_to_universal` of one checkpoint tag directory into `output_folder` (it prints progress)."""
    from deepspeed.checkpoint import ds_to_universal

    ds_to_universal.main(universal_args(input_folder, output_folder))
