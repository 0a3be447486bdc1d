"""From importance scores and a target shape to the structures to keep (a KeepPlan).

Shapes stay uniform across layers (serving engines build every layer from the global config):
each kept layer keeps the same number of MLP neurons, KV groups and query heads per group, chosen
per layer by that layer's own scores. Depth keeps the most important layers in their original order.
"""

from __future__ import annotations

from typing import Any

import torch

from sapling.errors import ConfigError
from sapling.models.shapes import check_shape
from sapling.prune.importance import ImportanceScores
from sapling.prune.slicing import KeepPlan, pruned_config

TARGET_FIELDS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                 "num_key_value_heads")


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, in ascending index order (ties broken by lower index)."""
    order = torch.argsort(scores.double(), descending=True, stable=True)
    return torch.sort(order[:k]).values


def resolve_target(teacher_cfg: Any, target: dict[str, Any]) -> dict[str, int]:
    """The full student shape: requested fields, the rest from the teacher; validated (ConfigError)."""
    heads, kv = teacher_cfg.num_attention_heads, teacher_cfg.num_key_value_heads or teacher_cfg.num_attention_heads
    given = {k: v for k, v in target.items() if v is not None and k in TARGET_FIELDS}
    out = {k: int(given.get(k, getattr(teacher_cfg, k))) for k in TARGET_FIELDS if k != "num_attention_heads"}
    if "num_key_value_heads" not in given:
        out["num_key_value_heads"] = kv
    # Query heads follow the kept KV groups unless given: all query heads of every kept group.
    out["num_attention_heads"] = int(given.get("num_attention_heads", out["num_key_value_heads"] * (heads // kv)))
    for key, val in out.items():
        teacher_val = heads if key == "num_attention_heads" else getattr(teacher_cfg, key)
        if key == "num_key_value_heads":
            teacher_val = kv
        if val <= 0:
            raise ConfigError(f"prune.target.{key}", val, "must be > 0", f"choose 1..{teacher_val}")
        if val > teacher_val:
            raise ConfigError(f"prune.target.{key}", val, f"larger than the teacher's {teacher_val}",
                              f"choose a value <= {teacher_val} (pruning only removes structures)")
    t_heads, t_kv = out["num_attention_heads"], out["num_key_value_heads"]
    if t_heads % t_kv:
        raise ConfigError("prune.target.num_attention_heads", t_heads, f"not divisible by num_key_value_heads={t_kv}",
                          f"choose a multiple of {t_kv}")
    if t_heads // t_kv > heads // kv:
        raise ConfigError("prune.target.num_attention_heads", t_heads,
                          f"needs {t_heads // t_kv} query heads per KV group, the teacher has {heads // kv}",
                          f"choose <= {t_kv * (heads // kv)} or keep more KV groups")
    return out


def target_config(teacher_cfg: Any, shape: dict[str, int]) -> Any:
    """The HF config the pruner will give a student of `shape` (from `resolve_target`), without any weights
    or scores: the same slicing config code, on a plan that keeps the first structures of each kind."""
    heads, kv = teacher_cfg.num_attention_heads, teacher_cfg.num_key_value_heads or teacher_cfg.num_attention_heads
    group, layers = heads // kv, list(range(shape["num_hidden_layers"]))
    t_kv, per_group = shape["num_key_value_heads"], shape["num_attention_heads"] // shape["num_key_value_heads"]
    kv_heads = torch.arange(t_kv)
    kept_heads = (kv_heads[:, None] * group + torch.arange(per_group)).flatten()
    plan = KeepPlan(layers=layers, hidden=torch.arange(shape["hidden_size"]),
                    mlp=[torch.arange(shape["intermediate_size"])] * len(layers),
                    kv_heads=[kv_heads] * len(layers), heads=[kept_heads] * len(layers))
    return pruned_config(teacher_cfg, plan)


def plan_from_scores(scores: ImportanceScores, teacher_cfg: Any, shape: dict[str, int],
                     depth_metric: str = "block_influence") -> KeepPlan:
    """Keep the highest-scoring structures of each kind so the result has exactly `shape`."""
    n_layers = teacher_cfg.num_hidden_layers
    heads, kv = teacher_cfg.num_attention_heads, teacher_cfg.num_key_value_heads or teacher_cfg.num_attention_heads
    group = heads // kv
    if depth_metric == "layer_loss" and scores.layer_loss is not None:
        depth_scores = scores.layer_loss
    else:
        depth_scores = scores.block_influence
    layers = _top(depth_scores, shape["num_hidden_layers"]).tolist()
    plan = KeepPlan(layers=None if len(layers) == n_layers else layers)
    if shape["hidden_size"] < teacher_cfg.hidden_size:
        plan.hidden = _top(scores.hidden, shape["hidden_size"])
    if shape["intermediate_size"] < teacher_cfg.intermediate_size:
        plan.mlp = [_top(scores.mlp[i], shape["intermediate_size"]) for i in layers]
    t_kv, t_heads = shape["num_key_value_heads"], shape["num_attention_heads"]
    if t_kv < kv or t_heads < heads:
        per_group = t_heads // t_kv
        plan.kv_heads, plan.heads = [], []
        for i in layers:
            groups = _top(scores.kv_groups[i], t_kv)
            plan.kv_heads.append(groups)
            kept = [g * group + _top(scores.heads[i, g * group:(g + 1) * group], per_group) for g in groups.tolist()]
            plan.heads.append(torch.cat(kept))
    return plan


def check_prune_shape(teacher_cfg: Any, target: dict[str, Any], *, seq_len: int | None = None) -> dict[str, int]:
    """The full student shape of an explicit `prune.target` (see prune.select.resolve_target), its HF config
    built as the pruner will build it and checked by `check_shape` before the teacher's weights load."""
    shape = resolve_target(teacher_cfg, target)
    given = {k: v for k, v in target.items() if v is not None and k != "params"}

    def vary(name: str, value: int) -> Any:
        return target_config(teacher_cfg, resolve_target(teacher_cfg, {**given, name: value}))

    try:
        student_cfg = target_config(teacher_cfg, shape)
    except ValueError as err:  # a teacher the slicer cannot cut (model type, per-layer shapes)
        raise ConfigError("prune.target", given or None, f"cannot prune this teacher: {err}",
                          "prune a Llama, Mistral, Qwen2 or Qwen3 checkpoint with the same shape in every layer") from err
    check_shape("prune.target", student_cfg, teacher=teacher_cfg, seq_len=seq_len, given=given, vary=vary)
    return shape
