"""Structured slicing: cut an HF causal LM down to kept layers, hidden channels, MLP neurons and heads.

The result is a smaller model of the same class whose config describes it exactly, so `save_pretrained`
+ `AutoModelForCausalLM.from_pretrained` load it as is. Supported: the Llama, Mistral, Qwen2, Qwen3 and
Granite families (pre-norm decoder, RMSNorm, RoPE, GQA attention, gated MLP; Granite's multipliers are config
scalars), Gemma 2 and Gemma 3 text (sandwich norms, `1 + weight` RMSNorm, scaled embeddings, per-layer
sliding/global attention), OLMo 2 (post-norms only; q/k norms over the whole projection, sliced by head),
Phi-3 (fused `qkv_proj` and `gate_up_proj`: their q/k/v and gate/up blocks are sliced alike) and Cohere /
Cohere 2 (one LayerNorm feeding attention and MLP in parallel; Cohere's per-head q/k norms sliced by head),
and the mixture-of-experts families Qwen3-MoE, Mixtral and OLMoE: experts are kept per layer (router rows and
expert tensors alike; the softmax over the kept router logits renormalises the routing, and
`num_experts_per_tok` is capped at the experts kept) and each kept expert's FFN neurons are kept by its own
index, besides the dense axes.

Gemma scales its embeddings by `sqrt(hidden_size)` (a buffer recomputed from the config on load): when hidden
channels are cut, the kept embedding columns are multiplied by `sqrt(H_teacher / H_student)` so the residual
stream starts as the teacher's restricted to the kept channels, and, the lm_head being that same (tied)
matrix, the final norm's `1 + weight` is divided by the same factor, so the logits are not rescaled either.

Shapes stay uniform across layers (one global config), head_dim and RoPE are never changed, and
`head_dim` is written into the config explicitly (hidden_size / num_attention_heads no longer gives it).
Index order is kept as given (any order is exact, as long as it is applied consistently), except that
query heads are regrouped by their new KV group so HF's GQA mapping (query head j reads KV head
j // (H_q / H_kv)) still pairs each kept query head with its own KV head.

A ZeRO-3 partitioned teacher is read one decoder layer (or one embedding / norm / head) at a time, each
gathered only while it is sliced; the student is an ordinary, unpartitioned model either way.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers import PretrainedConfig, PreTrainedModel

from sapling.dist import gathered
from sapling.errors import ModelSourceError
from sapling.models.families import is_moe, moe_layout_problem, moe_width_field
from sapling.prune.distributed import gather_units, is_zero3_partitioned

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "granite", "gemma2", "gemma3_text", "olmo2", "phi3",
                         "cohere", "cohere2", "qwen3_moe", "mixtral", "olmoe")
# Families whose RMSNorm multiplies by (1 + weight) and whose embeddings are scaled by sqrt(hidden_size).
GEMMA_TYPES = ("gemma2", "gemma3_text")
# Config fields holding one entry per decoder layer; subset with the kept layers.
PER_LAYER_CONFIG_LISTS = ("layer_types",)

IndexLike = torch.Tensor | Sequence[int]


@dataclass
class KeepPlan:
    """The structures to keep. `None` keeps everything of that kind.

    `layers` are teacher layer indices in increasing order. Indices may be tensors or lists of ints.
    Per-layer lists (`mlp`, `kv_heads`, `heads`) have one entry per KEPT layer, with the same count in
    every layer. `heads` are query head indices of the teacher; every kept query head's KV group must be
    kept, with the same number of query heads in each kept group. With `kv_heads` given and `heads`
    None, all query heads of the kept KV groups are kept.

    Mixture-of-experts models: `experts` are the kept experts per kept layer (same count everywhere) and
    `expert_mlp` the kept FFN neurons of each of them (per kept layer a [kept experts, neurons] index tensor,
    rows in the order of `experts`); `mlp` does not apply (their MLP is the experts).
    """

    layers: list[int] | None = None
    hidden: torch.Tensor | None = None
    mlp: list[torch.Tensor] | None = None
    kv_heads: list[torch.Tensor] | None = None
    heads: list[torch.Tensor] | None = None
    experts: list[torch.Tensor] | None = None
    expert_mlp: list[torch.Tensor] | None = None


@dataclass
class _Resolved:
    """A validated plan with every index explicit; `heads` already grouped by new KV group."""

    layers: list[int]
    hidden: torch.Tensor
    mlp: list[torch.Tensor]
    kv_heads: list[torch.Tensor]
    heads: list[torch.Tensor]
    head_dim: int
    experts: list[torch.Tensor] | None = None  # MoE only
    expert_mlp: list[torch.Tensor] | None = None  # MoE only: [kept experts, kept neurons] per kept layer


def _as_index(value: IndexLike, what: str, size: int) -> torch.Tensor:
    """A 1-D int64 CPU tensor of distinct indices in [0, size), non-empty, or a ValueError naming `what`."""
    if isinstance(value, torch.Tensor):
        idx = value.detach().cpu()
    else:
        value = list(value)
        idx = torch.as_tensor(value) if value else torch.empty(0, dtype=torch.long)
    if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
        raise ValueError(f"{what}: indices must be integers, got dtype {idx.dtype}")
    idx = idx.to(torch.long)
    if idx.dim() != 1:
        raise ValueError(f"{what}: expected a 1-D list of indices, got shape {tuple(idx.shape)}")
    if idx.numel() == 0:
        raise ValueError(f"{what}: nothing kept (empty index set); keep at least one")
    bad = idx[(idx < 0) | (idx >= size)]
    if bad.numel():
        raise ValueError(f"{what}: indices {bad.tolist()} out of range [0, {size})")
    uniq, counts = torch.unique(idx, return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"{what}: duplicated indices {uniq[counts > 1].tolist()}")
    return idx


def _per_layer(values: Sequence[IndexLike] | None, what: str, size: int, layers: list[int],
               default: torch.Tensor) -> list[torch.Tensor]:
    """One validated index tensor per kept layer, all of the same length."""
    if values is None:
        return [default.clone() for _ in layers]
    values = list(values)  # a list of index lists, or a 2-D tensor (one row per kept layer)
    if len(values) != len(layers):
        raise ValueError(f"plan.{what}: needs one index list per kept layer ({len(layers)}), got {len(values)}")
    out = [_as_index(v, f"plan.{what}[{i}] (teacher layer {layer})", size)
           for i, (v, layer) in enumerate(zip(values, layers))]
    if len({len(v) for v in out}) > 1:
        raise ValueError(f"plan.{what}: every layer must keep the same number, got counts "
                         f"{[len(v) for v in out]} (shapes are uniform across layers)")
    return out


def _group_heads(heads: torch.Tensor, kv: torch.Tensor, per_group: int, n_kv: int, where: str) -> torch.Tensor:
    """Kept query heads ordered by their new KV group (stable), checked for dropped/unequal groups."""
    position = torch.full((n_kv,), -1, dtype=torch.long)
    position[kv] = torch.arange(len(kv))
    new_group = position[heads // per_group]
    orphans = heads[new_group < 0]
    if orphans.numel():
        groups = sorted(set((orphans // per_group).tolist()))
        raise ValueError(f"{where}: query heads {orphans.tolist()} belong to KV groups {groups}, which are "
                         f"dropped; keep those KV heads or drop these query heads")
    counts = torch.bincount(new_group, minlength=len(kv))
    if len(set(counts.tolist())) > 1:
        per_kv = dict(zip(kv.tolist(), counts.tolist()))
        raise ValueError(f"{where}: every kept KV group must keep the same number of query heads, got "
                         f"{per_kv} (KV head: query heads kept)")
    return heads[torch.sort(new_group, stable=True).indices]


def _resolve(config: PretrainedConfig, plan: KeepPlan) -> _Resolved:
    """Check `plan` against `config` and make every index explicit."""
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelSourceError(f"slicing supports model types {', '.join(SUPPORTED_MODEL_TYPES)}; got "
                               f"{config.model_type!r}; fix: prune a model of those types")
    if getattr(config, "is_heterogeneous", False):
        raise ModelSourceError("slicing needs a homogeneous config (same shape in every layer); this one has "
                               "per_layer_config overrides; fix: prune a model whose layers all have one shape")
    n_layers, hidden = config.num_hidden_layers, config.hidden_size
    n_heads = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    head_dim = getattr(config, "head_dim", None) or hidden // n_heads
    if n_heads % n_kv:
        raise ModelSourceError(f"teacher config: num_attention_heads={n_heads} not divisible by num_key_value_heads="
                               f"{n_kv}; fix: check the teacher's config.json")
    per_group = n_heads // n_kv

    if plan.layers is None:
        layers = list(range(n_layers))
    else:
        layers = _as_index(plan.layers, "plan.layers", n_layers).tolist()
        if layers != sorted(layers):
            raise ValueError(f"plan.layers: must be in increasing order (layer order is not changed), got {layers}")
    keep_hidden = (torch.arange(hidden) if plan.hidden is None
                   else _as_index(plan.hidden, "plan.hidden", hidden))
    experts = expert_mlp = None
    if is_moe(config):
        problem = moe_layout_problem(config)
        if problem:
            raise ModelSourceError(f"slicing: {problem}; fix: prune an MoE model whose every layer has experts")
        if plan.mlp is not None:
            raise ValueError("plan.mlp: an MoE model's MLP is its experts: give plan.expert_mlp instead")
        experts, expert_mlp = _resolve_experts(config, plan, layers)
        mlp = []
    else:
        if plan.experts is not None or plan.expert_mlp is not None:
            raise ValueError(f"plan.experts: {config.model_type} is not a mixture-of-experts model")
        mlp = _per_layer(plan.mlp, "mlp", config.intermediate_size, layers, torch.arange(config.intermediate_size))
    kv_heads = _per_layer(plan.kv_heads, "kv_heads", n_kv, layers, torch.arange(n_kv))
    if plan.heads is None:  # all query heads of each kept KV group
        heads = [(kv[:, None] * per_group + torch.arange(per_group)).flatten() for kv in kv_heads]
    else:
        heads = _per_layer(plan.heads, "heads", n_heads, layers, torch.arange(n_heads))
    heads = [_group_heads(h, kv, per_group, n_kv, f"plan.heads[{i}] (teacher layer {layer})")
             for i, (h, kv, layer) in enumerate(zip(heads, kv_heads, layers))]
    return _Resolved(layers, keep_hidden, mlp, kv_heads, heads, head_dim, experts, expert_mlp)


def _resolve_experts(config: PretrainedConfig, plan: KeepPlan,
                     layers: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Kept experts per kept layer, and each one's kept neurons ([kept experts, neurons] per layer)."""
    n_experts, width = config.num_experts, getattr(config, moe_width_field(config))
    experts = _per_layer(plan.experts, "experts", n_experts, layers, torch.arange(n_experts))
    if plan.expert_mlp is None:
        return experts, [torch.arange(width).expand(len(e), width).clone() for e in experts]
    values = list(plan.expert_mlp)
    if len(values) != len(layers):
        raise ValueError(f"plan.expert_mlp: needs one [experts, neurons] index per kept layer ({len(layers)}), got "
                         f"{len(values)}")
    out = []
    for i, (rows, kept, layer) in enumerate(zip(values, experts, layers)):
        rows = list(rows)
        if len(rows) != len(kept):
            raise ValueError(f"plan.expert_mlp[{i}] (teacher layer {layer}): one neuron index per kept expert "
                             f"({len(kept)}), got {len(rows)}")
        idx = [_as_index(r, f"plan.expert_mlp[{i}][{j}] (teacher layer {layer})", width) for j, r in enumerate(rows)]
        if len({len(x) for x in idx}) > 1:
            raise ValueError(f"plan.expert_mlp[{i}]: every expert must keep the same number of neurons (shapes are "
                             f"uniform), got {[len(x) for x in idx]}")
        out.append(torch.stack(idx))
    if len({x.shape[1] for x in out}) > 1:
        raise ValueError(f"plan.expert_mlp: every layer must keep the same number of expert neurons, got "
                         f"{[x.shape[1] for x in out]}")
    return experts, out


def _config_for(config: PretrainedConfig, r: _Resolved) -> PretrainedConfig:
    cfg = copy.deepcopy(config)
    n_old = config.num_hidden_layers
    cfg.num_hidden_layers = len(r.layers)
    cfg.hidden_size = len(r.hidden)
    if r.experts is not None:
        cfg.num_experts = len(r.experts[0])
        setattr(cfg, moe_width_field(config), int(r.expert_mlp[0].shape[1]))
        cfg.num_experts_per_tok = min(int(config.num_experts_per_tok), cfg.num_experts)
    else:
        cfg.intermediate_size = len(r.mlp[0])
    cfg.num_attention_heads = len(r.heads[0])
    cfg.num_key_value_heads = len(r.kv_heads[0])
    cfg.head_dim = r.head_dim
    for name in PER_LAYER_CONFIG_LISTS:
        values = getattr(config, name, None)
        if isinstance(values, (list, tuple)) and len(values) == n_old:
            setattr(cfg, name, [values[i] for i in r.layers])
    # Qwen2/3: layers with index >= max_window_layers use sliding windows; count kept layers below it.
    mwl = getattr(config, "max_window_layers", None)
    if isinstance(mwl, int) and mwl < n_old:
        cfg.max_window_layers = sum(i < mwl for i in r.layers)
    return cfg


def pruned_config(config: PretrainedConfig, plan: KeepPlan) -> PretrainedConfig:
    """The HF config of the model `plan` cuts out of a model with `config` (a copy; `config` is unchanged)."""
    return _config_for(config, _resolve(config, plan))


def _head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Row (or column) indices of whole heads in a [heads * head_dim, ...] projection."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


# Per parameter: what each tensor dimension is indexed by (None: kept whole).
_LAYER_RULES: dict[str, tuple[str | None, ...]] = {
    "self_attn.q_proj.weight": ("q", "hidden"),
    "self_attn.q_proj.bias": ("q",),
    "self_attn.k_proj.weight": ("kv", "hidden"),
    "self_attn.k_proj.bias": ("kv",),
    "self_attn.v_proj.weight": ("kv", "hidden"),
    "self_attn.v_proj.bias": ("kv",),
    "self_attn.qkv_proj.weight": ("qkv", "hidden"),  # Phi-3: [q; k; v] rows in one projection
    "self_attn.qkv_proj.bias": ("qkv",),
    "self_attn.o_proj.weight": ("hidden", "q"),
    "self_attn.o_proj.bias": ("hidden",),
    "self_attn.q_norm.weight": (None,),
    "self_attn.k_norm.weight": (None,),
    "mlp.gate_proj.weight": ("mlp", "hidden"),
    "mlp.gate_proj.bias": ("mlp",),
    "mlp.gate_up_proj.weight": ("gate_up", "hidden"),  # Phi-3: [gate; up] rows in one projection
    "mlp.gate_up_proj.bias": ("gate_up",),
    "mlp.up_proj.weight": ("mlp", "hidden"),
    "mlp.up_proj.bias": ("mlp",),
    "mlp.down_proj.weight": ("hidden", "mlp"),
    "mlp.down_proj.bias": ("hidden",),
    "input_layernorm.weight": ("hidden",),
    "post_attention_layernorm.weight": ("hidden",),
    "pre_feedforward_layernorm.weight": ("hidden",),  # Gemma 2/3 sandwich norms
    "post_feedforward_layernorm.weight": ("hidden",),
    "mlp.gate.weight": ("experts", "hidden"),  # MoE router: one row per expert
    "mlp.experts.gate_up_proj": ("experts", "egate_up", "hidden"),  # [E, 2I, H]: each expert its own neurons
    "mlp.experts.down_proj": ("experts", "hidden", "emlp"),  # [E, H, I]
}
# Per family: rules that differ from _LAYER_RULES (OLMo 2 normalises q and k over the whole projection).
_FAMILY_LAYER_RULES: dict[str, dict[str, tuple[str | None, ...]]] = {
    "olmo2": {"self_attn.q_norm.weight": ("q",), "self_attn.k_norm.weight": ("kv",)},
    "olmoe": {"self_attn.q_norm.weight": ("q",), "self_attn.k_norm.weight": ("kv",)},
    "cohere": {"self_attn.q_norm.weight": ("q_heads", None), "self_attn.k_norm.weight": ("kv_heads", None)},
}
_TOP_RULES: dict[str, tuple[str | None, ...]] = {
    "embed_tokens.weight": (None, "hidden"),
    "norm.weight": ("hidden",),
}
_HEAD_RULES: dict[str, tuple[str | None, ...]] = {
    "lm_head.weight": (None, "hidden"),
    "lm_head.bias": (None,),
}


def _teacher_state(model: PreTrainedModel) -> Iterator[tuple[str, torch.Tensor, tuple]]:
    """(name, tensor, identity) for every entry of the teacher's state dict; equal identities mark one tensor
    reachable under several names (tied embeddings).

    A ZeRO-3 partitioned teacher is read one gather unit at a time: each unit's parameters are gathered
    while its entries are consumed and partitioned again before the next unit (every rank must iterate).
    """
    if not is_zero3_partitioned(model):
        for name, t in model.state_dict().items():
            ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
            yield name, t, ident
        return
    expected = set(model.state_dict(keep_vars=True))
    seen: set[str] = set()
    for prefix, unit in gather_units(model):
        with gathered(unit.parameters()):
            for name, t in unit.state_dict(prefix=prefix, keep_vars=True).items():
                seen.add(name)
                # Gathered storage is freed and reused between units: identify parameters by their ZeRO id.
                ident = ("ds_id", t.ds_id) if hasattr(t, "ds_id") else ("buffer", name)
                yield name, t.detach(), ident
    if seen != expected:
        raise RuntimeError(f"slicing: the gather units of {type(model).__name__} miss {sorted(expected - seen)}")


def _sliced_state(model: PreTrainedModel, r: _Resolved,
                  device: torch.device | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The student's state dict (fresh tensors, on `device` or else the teacher's) and a map student name ->
    teacher name."""
    base = model.base_model_prefix
    new_index = {old: new for new, old in enumerate(r.layers)}
    hidden_rows = {"hidden": r.hidden}
    cfg = model.config
    q_size = cfg.num_attention_heads * r.head_dim
    kv_size = (getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads) * r.head_dim
    layer_index = []
    for i, (q, kv) in enumerate(zip(r.heads, r.kv_heads)):
        q_rows, kv_rows = _head_rows(q, r.head_dim), _head_rows(kv, r.head_dim)
        index = {"q": q_rows, "kv": kv_rows, "q_heads": q, "kv_heads": kv, **hidden_rows,
                 "qkv": torch.cat([q_rows, q_size + kv_rows, q_size + kv_size + kv_rows])}
        if r.experts is None:
            mlp = r.mlp[i]
            index.update(mlp=mlp, gate_up=torch.cat([mlp, cfg.intermediate_size + mlp]))
        else:  # 2-D: row j holds the kept neurons of the j-th kept expert
            width, emlp = getattr(cfg, moe_width_field(cfg)), r.expert_mlp[i]
            index.update(experts=r.experts[i], emlp=emlp, egate_up=torch.cat([emlp, width + emlp], dim=1))
        layer_index.append(index)
    state: dict[str, torch.Tensor] = {}
    names: dict[str, str] = {}
    done: dict[tuple, torch.Tensor] = {}  # tied tensors (embeddings / lm_head) are sliced once
    layer_prefix = f"{base}.layers."
    layer_rules = {**_LAYER_RULES, **_FAMILY_LAYER_RULES.get(model.config.model_type, {})}
    for name, tensor, ident in _teacher_state(model):
        if name.startswith(layer_prefix):
            idx_str, _, rest = name[len(layer_prefix):].partition(".")
            old = int(idx_str)
            if old not in new_index:
                continue
            new = new_index[old]
            rule, index = layer_rules.get(rest), layer_index[new]
            new_name = f"{layer_prefix}{new}.{rest}"
        else:
            rest = name[len(base) + 1:] if name.startswith(f"{base}.") else None
            rule = _TOP_RULES.get(rest) if rest is not None else _HEAD_RULES.get(name)
            index, new_name = hidden_rows, name
        if rule is None or len(rule) != tensor.dim():
            raise ValueError(f"slicing: don't know how to slice {name} (shape {tuple(tensor.shape)}) of "
                             f"{type(model).__name__}")
        key = (ident, rule, new_name if name.startswith(layer_prefix) else "")
        if key not in done:
            out = tensor
            for dim, kind in enumerate(rule):
                if kind is None:
                    continue
                idx = index[kind].to(out.device)
                if idx.dim() == 2:  # per expert (dim 0, already cut to the kept experts): its own neurons
                    out = torch.stack([out[e].index_select(dim - 1, idx[e]) for e in range(out.shape[0])])
                else:
                    out = out.index_select(dim, idx)
            if device is not None:
                out = out.to(device)
            done[key] = out.clone() if out is tensor else out
        state[new_name] = done[key]
        names[new_name] = name
    if model.config.model_type in GEMMA_TYPES and len(r.hidden) != model.config.hidden_size:
        _rescale_gemma_embeddings(state, base, model.config.hidden_size / len(r.hidden),
                                  tied=bool(getattr(model.config, "tie_word_embeddings", False)))
    return state, names


def _rescale_gemma_embeddings(state: dict[str, torch.Tensor], base: str, ratio: float, *, tied: bool) -> None:
    """Gemma multiplies its embeddings by sqrt(hidden_size): keep the teacher's scale on the kept channels
    (embeddings x sqrt(ratio)) and, with a tied lm_head (the same matrix), keep the logits' scale by dividing
    the final norm's (1 + weight) by it."""
    c = ratio**0.5
    embed = state[f"{base}.embed_tokens.weight"]
    scaled = (embed.float() * c).to(embed.dtype)
    for name, t in list(state.items()):
        if t is embed:  # the embeddings, and the tied lm_head
            state[name] = scaled
    if tied:
        norm = state[f"{base}.norm.weight"]
        state[f"{base}.norm.weight"] = ((1.0 + norm.float()) / c - 1.0).to(norm.dtype)


def _teacher_name(name: str, base: str, layers: list[int]) -> str:
    """The teacher's name for a student parameter/buffer (layer indices mapped back)."""
    prefix = f"{base}.layers."
    if not name.startswith(prefix):
        return name
    idx, _, rest = name[len(prefix):].partition(".")
    return f"{prefix}{layers[int(idx)]}.{rest}"


def slice_model(model: PreTrainedModel, plan: KeepPlan, *,
                device: torch.device | str | None = None) -> PreTrainedModel:
    """A new, smaller model of the same class holding the kept structures of `model` (left unchanged).

    Dtype, attention implementation, train/eval mode, requires_grad flags and the generation config are
    carried over; tied embeddings stay tied. The student lives on `device`: by default the teacher's, or
    the CPU for a ZeRO-3 partitioned teacher, which is gathered one layer at a time (every rank must call
    this, and every rank gets the whole, unpartitioned student).
    """
    r = _resolve(model.config, plan)
    config = _config_for(model.config, r)
    if device is None and is_zero3_partitioned(model):
        device = "cpu"
    device = None if device is None else torch.device(device)
    state, names = _sliced_state(model, r, device)
    with torch.device("meta"):
        student = type(model)(config)
    student.load_state_dict(state, strict=True, assign=True)
    base = model.base_model_prefix
    # Non-persistent buffers (RoPE inv_freq) do not depend on the sliced sizes: copy them from the teacher.
    teacher_buffers = dict(model.named_buffers())
    for name, buf in list(student.named_buffers()):
        if buf.device.type != "meta":
            continue
        owner, _, attr = name.rpartition(".")
        module = student.get_submodule(owner)
        src = teacher_buffers.get(_teacher_name(name, base, r.layers))
        if src is not None and attr == "embed_scale" and hasattr(module, "scalar_embed_scale"):
            src = torch.tensor(module.scalar_embed_scale, dtype=src.dtype, device=src.device)  # Gemma: sqrt(H_student)
        if src is None or src.shape != buf.shape:
            raise ValueError(f"slicing: buffer {name} has no counterpart of shape {tuple(buf.shape)} in the teacher")
        buf_copy = src.clone() if device is None else src.to(device, copy=True)
        module._buffers[attr] = buf_copy
    if getattr(config, "tie_word_embeddings", False):
        student.tie_weights()
        if student.get_output_embeddings().weight is not student.get_input_embeddings().weight:
            raise RuntimeError("slicing: lm_head and embed_tokens were not re-tied")
    teacher_params = dict(model.named_parameters(remove_duplicate=False))
    for name, param in student.named_parameters(remove_duplicate=False):
        param.requires_grad_(teacher_params[names.get(name, _teacher_name(name, base, r.layers))].requires_grad)
    if getattr(model, "generation_config", None) is not None:
        student.generation_config = copy.deepcopy(model.generation_config)
    student.train(model.training)
    return student
