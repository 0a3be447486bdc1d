"""`sapling export checkpoint=<dir> [output=<dir>]`: an HF checkpoint of the student from a training checkpoint.

`checkpoint` is a run's `output_dir`, its `checkpoints/` folder (the tag `latest` names is exported) or
one `global_step{N}` folder. DeepSpeed checkpoints are consolidated with DeepSpeed's `zero_to_fp32` (the
fp32 master weights, whatever the ZeRO stage and world size they were written at), in one process and
without a GPU; single-process checkpoints are read directly. The result is written like any other Sapling
model: config.json, *.safetensors and the tokenizer, atomically.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from sapling.errors import CheckpointError
from sapling.io import check_output, write_run
from sapling.train.checkpoint import (
    LATEST,
    STATE_FILE,
    checkpoint_fix,
    damaged_files,
    latest_tag,
    load_checkpoint_file,
    read_state,
)
from sapling.train.engine import ENGINE_FILE


def resolve_tag_dir(checkpoint: str | os.PathLike) -> Path:
    """The `global_step{N}` folder `checkpoint` designates (see the module docstring)."""
    path = Path(os.path.expanduser(str(checkpoint)))
    if (path / STATE_FILE).exists():
        return path
    for root in (path, path / "checkpoints"):
        if (root / LATEST).exists():
            tag = latest_tag(root, purpose="export")
            if tag is not None:
                return tag
    raise CheckpointError(f"{path} holds no Sapling training checkpoint (no {STATE_FILE}, no {LATEST} file); "
                          "fix: pass checkpoint=<a run's output_dir, its checkpoints/ folder or a global_step folder>")


def consolidated_state_dict(tag_dir: Path) -> dict[str, torch.Tensor]:
    """The student's full fp32 weights stored in `tag_dir`."""
    state = read_state(tag_dir, purpose="export")
    if state.get("engine", "local") == "local":
        engine_state = load_checkpoint_file(tag_dir / ENGINE_FILE, "model and optimizer state", purpose="export")
        if not isinstance(engine_state, dict) or "module" not in engine_state:
            raise CheckpointError(f"{tag_dir / ENGINE_FILE} holds no model weights; {checkpoint_fix(tag_dir, 'export')}")
        return engine_state["module"]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:
        return get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    except Exception as err:  # noqa: BLE001  (zero_to_fp32 fails on damaged shards in many ways)
        if isinstance(err, torch.OutOfMemoryError | MemoryError):
            raise
        first = (str(err).strip().splitlines() or [""])[0][:150]
        bad = damaged_files(tag_dir)
        what = (f"{tag_dir / bad[0]} (checkpoint {tag_dir.name}) is truncated or corrupt" if bad else
                f"DeepSpeed's zero_to_fp32 cannot read the ZeRO files of {tag_dir} (truncated or missing shards)")
        raise CheckpointError(f"{what} ({type(err).__name__}: {first}); {checkpoint_fix(tag_dir, 'export')}") from err


def recorded_config(tag_dir: Path) -> Any:
    """The student's HF config a checkpoint recorded in `hf/` (CheckpointError when missing or unreadable)."""
    from transformers import AutoConfig

    hf_dir = tag_dir / "hf"
    if not (hf_dir / "config.json").exists():
        raise CheckpointError(f"{hf_dir}/config.json is missing: checkpoint {tag_dir.name} does not record its model "
                              f"config; {checkpoint_fix(tag_dir, 'export')}")
    try:
        return AutoConfig.from_pretrained(hf_dir)
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"cannot read {hf_dir}/config.json of checkpoint {tag_dir.name} ({type(err).__name__}: "
                              f"{str(err)[:150]}); {checkpoint_fix(tag_dir, 'export')}") from err


def export_checkpoint(checkpoint: str | os.PathLike, output: str | os.PathLike | None = None) -> Path:
    """Write an HF checkpoint of the student in `checkpoint` to `output` (default: <output_dir>/export/<tag>)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sapling.distill.features import student_weights
    from sapling.models import save_hf_checkpoint

    tag_dir = resolve_tag_dir(checkpoint)
    out = Path(os.path.expanduser(str(output))) if output is not None else tag_dir.parent.parent / "export" / tag_dir.name
    # before anything is read: never over the checkpoint, inside a checkpoints folder, or over a user's directory
    check_output("output", out, command="export", inputs=[("checkpoint", tag_dir)])
    hf_dir = tag_dir / "hf"
    config = recorded_config(tag_dir)
    weights = student_weights(consolidated_state_dict(tag_dir))  # without feature-distillation projections
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False, assign=True)
    except RuntimeError as err:  # size mismatches
        raise CheckpointError(f"the weights in {tag_dir} do not fit the config it records ({str(err)[:200]}); "
                              f"{checkpoint_fix(tag_dir, 'export')}") from err
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise CheckpointError(f"{tag_dir} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}; "
                              f"{checkpoint_fix(tag_dir, 'export')}")
    dtype = getattr(config, "dtype", None) or torch.float32
    model = model.to(dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype)))
    tokenizer = AutoTokenizer.from_pretrained(hf_dir) if (hf_dir / "tokenizer_config.json").exists() else None
    save_hf_checkpoint(model, tokenizer, out)
    write_run(out, command="export", checkpoint=str(tag_dir))  # a rerun may replace this export
    return out
