"""Start-up noise of third-party libraries, silenced at its source before a command runs.

- DeepSpeed picks its accelerator when it is first imported (transformers and accelerate import it too,
  e.g. in `save_pretrained`) and, finding no GPU, warns "Setting accelerator to CPU. If you have GPU or other
  accelerator, we were unable to detect it." Sapling runs on CUDA or on the CPU (`trainer.device`), so
  without CUDA the CPU is the right accelerator: say so with `DS_ACCELERATOR=cpu`, unless the user set it.

Nothing here hides a warning about the user's own run.
"""

from __future__ import annotations

import os


def choose_deepspeed_accelerator() -> None:
    """`DS_ACCELERATOR=cpu` when no CUDA device is visible and the user has not chosen (before deepspeed loads)."""
    if "DS_ACCELERATOR" in os.environ:
        return
    import torch

    if not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
