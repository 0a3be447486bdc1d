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

import torch

from sapling.train.checkpoint import LATEST, STATE_FILE, latest_tag, read_state
from sapling.train.engine import ENGINE_FILE


def resolve_tag_dir(checkpoint: str | os.PathLike) -> Path:
    """The `global_step{N}` folder `checkpoint` designates (see the module docstring)."""
    path = Path(os.path.expanduser(str(checkpoint)))
    if (path / STATE_FILE).exists():
        return path
    for root in (path, path / "checkpoints"):
        if (root / LATEST).exists():
            tag = latest_tag(root)
            if tag is not None:
                return tag
    raise FileNotFoundError(f"{path} holds no Sapling training checkpoint (no {STATE_FILE}, no {LATEST} file); "
                            "pass a run's output_dir, its checkpoints/ folder or a global_step folder")


def consolidated_state_dict(tag_dir: Path) -> dict[str, torch.Tensor]:
    """The student's full fp32 weights stored in `tag_dir`."""
    state = read_state(tag_dir)
    if state.get("engine", "local") == "local":
        return torch.load(tag_dir / ENGINE_FILE, map_location="cpu", weights_only=False)["module"]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)


def export_checkpoint(checkpoint: str | os.PathLike, output: str | os.PathLike | None = None) -> Path:
    """Write an HF checkpoint of the student in `checkpoint` to `output` (default: <output_dir>/export/<tag>)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from sapling.distill.features import student_weights
    from sapling.models import save_hf_checkpoint

    tag_dir = resolve_tag_dir(checkpoint)
    hf_dir = tag_dir / "hf"
    if not (hf_dir / "config.json").exists():
        raise FileNotFoundError(f"{hf_dir}/config.json is missing: the checkpoint does not record its model config")
    config = AutoConfig.from_pretrained(hf_dir)
    weights = student_weights(consolidated_state_dict(tag_dir))  # without feature-distillation projections
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(weights, strict=False, assign=True)
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"{tag_dir} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    dtype = getattr(config, "dtype", None) or torch.float32
    model = model.to(dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype)))
    tokenizer = AutoTokenizer.from_pretrained(hf_dir) if (hf_dir / "tokenizer_config.json").exists() else None
    out = Path(output) if output is not None else tag_dir.parent.parent / "export" / tag_dir.name
    return save_hf_checkpoint(model, tokenizer, out)
