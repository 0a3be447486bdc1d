"""Model shapes: the one place every teacher, student and model shape is checked, on its HF config, before
any weights load (so a run never trains for hours and then fails to save). A prune target's shape is checked
here too, by `sapling.prune.select.check_prune_shape`."""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf

from sapling.errors import ConfigError
from sapling.models.families import is_moe, logit_transform

SHAPE_FIELDS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size")
# Which field a user-given value is blamed on first when the shape as a whole is refused.
_BLAME_ORDER = ("num_key_value_heads", "num_attention_heads", "head_dim", "hidden_size", "intermediate_size",
                "num_hidden_layers", "vocab_size", "max_position_embeddings")
_COUNTS = ("num_hidden_layers", "num_attention_heads", "num_key_value_heads")  # small: every valid value is listed
_SCAN = 256  # widths: how far from the given value the nearest valid ones are searched


def _hf_problem(model_cfg: Any) -> str | None:
    """What transformers' own config class says of `model_cfg`: the checks `save_pretrained` and loading run."""
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:  # pragma: no cover - older huggingface_hub: no strict dataclasses
        StrictDataclassError = ValueError  # noqa: N806
    try:
        rebuilt = type(model_cfg).from_dict(model_cfg.to_dict())
        if callable(getattr(rebuilt, "validate", None)):
            rebuilt.validate()
    except (ValueError, TypeError, AttributeError, StrictDataclassError) as err:
        cause = err.__cause__ or err
        text = " ".join(str(cause).split()) or type(cause).__name__
        return f"transformers' {type(model_cfg).__name__} refuses this shape ({text[:200]})"
    return None


def shape_problem(model_cfg: Any, teacher: Any = None) -> tuple[str, str, str] | None:
    """The first rule `model_cfg` breaks, as (field or "", problem, fix), or None. `teacher`: the config a
    prune target is cut from (nothing may grow)."""
    for name in SHAPE_FIELDS:
        val = getattr(model_cfg, name, None)
        if val is not None and (isinstance(val, bool) or not isinstance(val, int) or val <= 0):
            return name, "must be > 0" if isinstance(val, int) else "must be a positive integer", "a positive integer"
    heads = getattr(model_cfg, "num_attention_heads", None)
    kv = getattr(model_cfg, "num_key_value_heads", None) or heads
    hidden = getattr(model_cfg, "hidden_size", None)
    if heads and kv and heads % kv:
        return ("num_attention_heads", f"not divisible by num_key_value_heads={kv}",
                f"a multiple of num_key_value_heads={kv}")
    if heads and hidden and getattr(model_cfg, "head_dim", None) is None and hidden % heads:
        return ("hidden_size", f"not divisible by num_attention_heads={heads}",
                f"a multiple of num_attention_heads={heads} (or give head_dim explicitly)")
    head_dim = getattr(model_cfg, "head_dim", None) or (hidden // heads if hidden and heads else None)
    if getattr(model_cfg, "model_type", None) == "olmoe" and heads and hidden and head_dim * heads != hidden:
        # its q/k norms are sized from hidden_size (q: hidden_size, k: hidden_size // heads * kv heads)
        return ("hidden_size", f"OLMoE needs hidden_size = num_attention_heads x head_dim ({heads} x {head_dim})",
                f"{heads * head_dim}, or prune query heads and hidden channels together")
    if is_moe(model_cfg):
        experts, top_k = getattr(model_cfg, "num_experts", None), getattr(model_cfg, "num_experts_per_tok", None)
        if not isinstance(experts, int) or experts <= 0:
            return "num_experts", "must be a positive integer", "a positive integer"
        if isinstance(top_k, int) and top_k > experts:
            return ("num_experts", f"fewer than num_experts_per_tok={top_k} (each token is routed to that many)",
                    f"a value >= {top_k}, or lower num_experts_per_tok")
    if teacher is not None:
        for name in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                     "num_key_value_heads", "num_experts", "moe_intermediate_size"):
            val, limit = getattr(model_cfg, name, None), getattr(teacher, name, None)
            if val is not None and limit is not None and val > limit:
                return (name, f"larger than the teacher's {limit} (pruning only removes structures)",
                        f"a value <= {limit}")
    problem = _hf_problem(model_cfg)
    return ("", problem, "") if problem else None


def _valid_values(field_name: str, value: Any, vary: Any, teacher: Any, limit: int | None) -> str | None:
    """The fix for `field_name`: the values that make the shape valid with everything else as given."""
    def ok(v: int) -> bool:
        try:
            return shape_problem(vary(field_name, v), teacher) is None
        except (ConfigError, ValueError, TypeError):
            return False

    if field_name in _COUNTS:
        top = limit or max(2 * value if isinstance(value, int) and value > 0 else 0, 64)
        good = [v for v in range(1, min(top, 512) + 1) if ok(v)]
        if not good:
            return None
        shown = ", ".join(map(str, good[:16])) + (f", ... ({len(good)} in all)" if len(good) > 16 else "")
        return f"valid values: {shown}"
    if not isinstance(value, int):
        return None
    top = limit or value + _SCAN
    below = next((v for v in range(value - 1, max(0, value - _SCAN), -1) if ok(v)), None)
    above = next((v for v in range(value + 1, min(top, value + _SCAN) + 1) if ok(v)), None)
    near = [str(v) for v in (below, above) if v is not None]
    return f"nearest valid values: {' or '.join(near)}" if near else None


def check_shape(key: str, model_cfg: Any, *, teacher: Any = None, seq_len: int | None = None,
                given: dict[str, Any] | None = None, vary: Any = None) -> None:
    """Every rule an HF config must meet before weights load; ConfigError naming `key.<field>` and the fix.

    `key`: where the shape comes from (`student.config`, `model.config`, `teacher.config`, `prune.target`).
    Sapling's rules (positive sizes, heads divisible by KV heads, head_dim derivable, a prune target no
    larger than `teacher`), then transformers' own validation of the config class (what `save_pretrained`
    would refuse after training), then `data.seq_len` against `max_position_embeddings` (positions are
    never extended). `given`: the fields the user set, so the error names one of those; `vary(field, v)`: the
    config with that field set to v, used to list the values that would work.
    """
    logit_transform(model_cfg, key)  # a family whose logits Sapling has not checked: refused here
    problem = shape_problem(model_cfg, teacher)
    if problem is not None:
        name, text, want = problem
        given = given or {}
        blame, fix = name, (f"set {key}.{name} to {want}" if name else f"choose another {key} shape")
        if vary is not None:
            suspects = [name] if name in given else []
            suspects += [f for f in _BLAME_ORDER if f in given and f not in suspects]
            for f in suspects:
                limit = getattr(teacher, f, None) if teacher is not None else None
                if f == "num_key_value_heads" and teacher is not None:
                    limit = limit or getattr(teacher, "num_attention_heads", None)
                found = _valid_values(f, given[f], vary, teacher, limit)
                if found:
                    blame, fix = f, f"{found} (other {key} fields as given)"
                    break
        value = given.get(blame, getattr(model_cfg, blame, None)) if blame else (given or None)
        raise ConfigError(f"{key}.{blame}" if blame else key, value, text, fix)
    limit = getattr(model_cfg, "max_position_embeddings", None)
    if seq_len is not None and isinstance(limit, int) and seq_len > limit:
        whose = {"prune": "pruned student", "teacher": "teacher", "student": "student"}.get(key.split(".")[0], "model")
        raise ConfigError("data.seq_len", seq_len, f"longer than the {whose}'s max_position_embeddings ({limit}): "
                          "it has no positions beyond that", f"set data.seq_len={limit} or less")


def check_source_shape(key: str, src: Any, model_cfg: Any, *, base: Any = None, seq_len: int | None = None) -> None:
    """`check_shape` for a model source's config (`<role>.config` overrides applied to `path`, `tiny` or `base`)."""
    from sapling.models.hf import source_config

    given = {k: v for k, v in OmegaConf.to_container(src.config).items() if v is not None} if src.config else {}

    def vary(name: str, value: int) -> Any:
        return source_config(OmegaConf.merge(src, {"config": {name: value}}), base=base)

    check_shape(key, model_cfg, seq_len=seq_len, given=given, vary=vary)


def check_vocab(teacher_cfg: Any, student_cfg: Any, tokenizer_size: int | None = None,
                key: str = "student.config.vocab_size") -> int | None:
    """The vocabulary the KD loss compares the two models' distributions over: None when both have the same
    rows (all of them), else the tokenizer's real size when the two differ only in padded rows (e.g. 151,936 vs
    152,064): the rows past it get no probability. Refused when the tokenizer does not fit both."""
    vt, vs = teacher_cfg.vocab_size, student_cfg.vocab_size
    if vt == vs:
        return None
    if tokenizer_size is None:
        raise ConfigError(key, vs, f"student vocab {vs} != teacher vocab {vt} (the KD loss "
                          "compares distributions over one vocabulary)",
                          f"use a student with the teacher's tokenizer (vocab_size={vt})")
    if tokenizer_size > min(vt, vs):
        raise ConfigError(key, vs, f"student vocab {vs} != teacher vocab {vt} and the "
                          f"tokenizer's {tokenizer_size} tokens do not fit both (the KD loss aligns the two on the "
                          "tokenizer's tokens)", f"use a student with the teacher's tokenizer (vocab_size >= "
                          f"{tokenizer_size})")
    return int(tokenizer_size)
