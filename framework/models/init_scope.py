"""The scope a model is built in: transformers sees exactly its own engine's DeepSpeed config.

Under ZeRO-3 `from_pretrained`/`from_config` then run inside `deepspeed.zero.Init` and load weights straight
into partitions, and one model's settings (the teacher's, the student's) never leak into the other's load.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class _HfZeroScope:
    """What transformers asks of a DeepSpeed config while it builds a model (see `model_init_scope`)."""

    def __init__(self, config: dict) -> None:
        self.config = config

    def is_zero3(self) -> bool:
        return int(self.config.get("zero_optimization", {}).get("stage", 0)) == 3


@contextlib.contextmanager
def model_init_scope(ds_config: dict | None) -> Iterator[bool]:
    """Build a model with transformers seeing `ds_config` (ZeRO-3: partitioned at construction) and nothing
    else; no DeepSpeed config is visible before or after. Yields whether the model will be partitioned."""
    from transformers.integrations import deepspeed as hf_ds

    partitioned = ds_config is not None and _HfZeroScope(ds_config).is_zero3()
    scope = _HfZeroScope(ds_config) if partitioned else None  # kept alive: transformers holds a weakref
    if scope is not None:
        hf_ds.set_hf_deepspeed_config(scope)
    else:
        hf_ds.unset_hf_deepspeed_config()
    try:
        yield partitioned
    finally:
        hf_ds.unset_hf_deepspeed_config()
        del scope
