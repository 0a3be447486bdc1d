"""From importance scores and a target shape to the structures to keep (a KeepPlan).

Shapes stay uniform across layers (serving engines build every layer from the global config):
each kept layer keeps the same number of MLP neurons, KV groups and query heads per group, chosen
per layer by that layer's own scores. Depth keeps the most important layers in their original order.
Mixture-of-experts layers keep the same number of experts (by their expert scores) and the same number of
FFN neurons in every kept expert (by that expert's own neuron scores).
"""

from __future__ import annotations

from typing import Any

import torch

from sapling.errors import ConfigError
from sapling.models.families import is_moe, moe_width_field
from sapling.models.shapes import check_shape
from sapling.prune.importance import ImportanceScores
from sapling.prune.slicing import KeepPlan, pruned_config

TARGET_FIELDS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                 "num_key_value_heads")
# Every field a target shape may set (the MoE ones apply to MoE teachers only).
ALL_TARGET_FIELDS = (*TARGET_FIELDS, "num_experts", "moe_intermediate_size")


def target_fields(config: Any) -> tuple[str, ...]:
    """The shape fields of `config`: TARGET_FIELDS, plus `num_experts` (and Qwen3-MoE's expert width
    `moe_intermediate_size`; Mixtral's and OLMoE's is `intermediate_size`) for a mixture-of-experts model."""
    if not is_moe(config):
        return TARGET_FIELDS
    width = moe_width_field(config)
    return TARGET_FIELDS + ("num_experts",) + ((width,) if width not in TARGET_FIELDS else ())


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, in ascending index order (ties broken by lower index)."""
    order = torch.argsort(scores.double(), descending=True, stable=True)
    return torch.sort(order[:k]).values


def resolve_target(teacher_cfg: Any, target: dict[str, Any]) -> dict[str, int]:
    """The full student shape: requested fields, the rest from the teacher; validated (ConfigError)."""
    heads, kv = teacher_cfg.num_attention_heads, teacher_cfg.num_key_value_heads or teacher_cfg.num_attention_heads
    fields = target_fields(teacher_cfg)
    unused = {"intermediate_size"} if is_moe(teacher_cfg) and moe_width_field(teacher_cfg) != "intermediate_size" else set()
    for key in ALL_TARGET_FIELDS:
        if target.get(key) is not None and (key not in fields or key in unused):
            fix = ("prune.target.moe_intermediate_size (its experts' width: its layers have no dense MLP)"
                   if key == "intermediate_size" else f"one of prune.target.{{{', '.join(fields)}}}")
            raise ConfigError(f"prune.target.{key}", target[key], f"a {teacher_cfg.model_type} teacher has no such "
                              "structure to prune", f"use {fix}")
    given = {k: v for k, v in target.items() if v is not None and k in fields}
    out = {k: int(given.get(k, getattr(teacher_cfg, k))) for k in fields if k != "num_attention_heads"}
    if "num_key_value_heads" not in given:
        out["num_key_value_heads"] = kv
    # Query heads follow the kept KV groups unless given: all query heads of every kept group.
    out["num_attention_heads"] = int(given.get("num_attention_heads", out["num_key_value_heads"] * (heads // kv)))
    out = {k: out[k] for k in fields}  # in field order
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
                    kv_heads=[kv_heads] * len(layers), heads=[kept_heads] * len(layers))
    if is_moe(teacher_cfg):
        experts, width = shape["num_experts"], shape[moe_width_field(teacher_cfg)]
        plan.experts = [torch.arange(experts)] * len(layers)
        plan.expert_mlp = [torch.arange(width).expand(experts, width)] * len(layers)
    else:
        plan.mlp = [torch.arange(shape["intermediate_size"])] * len(layers)
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
    if is_moe(teacher_cfg):
        _plan_experts(plan, scores, teacher_cfg, shape, layers)
    elif shape["intermediate_size"] < teacher_cfg.intermediate_size:
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


def _plan_experts(plan: KeepPlan, scores: ImportanceScores, teacher_cfg: Any, shape: dict[str, int],
                  layers: list[int]) -> None:
    """The kept experts of each kept layer and each kept expert's kept neurons (MoE teachers)."""
    field = moe_width_field(teacher_cfg)
    n_experts, width = shape["num_experts"], shape[field]
    if n_experts == teacher_cfg.num_experts and width == getattr(teacher_cfg, field):
        return
    if scores.experts is None or scores.expert_mlp is None:
        raise ValueError("these importance scores have no expert scores (computed for a dense model?): prune this "
                         "MoE teacher with scores of its own")
    plan.experts = [_top(scores.experts[i], n_experts) for i in layers]
    plan.expert_mlp = [torch.stack([_top(scores.expert_mlp[i, e], width) for e in kept.tolist()])
                       for i, kept in zip(layers, plan.experts)]


def check_prune_shape(teacher_cfg: Any, target: dict[str, Any], *, seq_len: int | None = None) -> dict[str, int]:
    """The full student shape of an explicit `prune.target` (see prune.select.resolve_target), its HF config
    built as the pruner will build it and checked by `check_shape` before the teacher's weights load."""
    shape = resolve_target(teacher_cfg, target)
    given = {k: v for k, v in target.items() if v is not None and k not in ("params", "active_params")}

    def vary(name: str, value: int) -> Any:
        return target_config(teacher_cfg, resolve_target(teacher_cfg, {**given, name: value}))

    try:
        student_cfg = target_config(teacher_cfg, shape)
    except ValueError as err:  # a teacher the slicer cannot cut (model type, per-layer shapes)
        raise ConfigError("prune.target", given or None, f"cannot prune this teacher: {err}",
                          "prune a Llama, Mistral, Qwen2 or Qwen3 checkpoint with the same shape in every layer") from err
    check_shape("prune.target", student_cfg, teacher=teacher_cfg, seq_len=seq_len, given=given, vary=vary)
    return shape
