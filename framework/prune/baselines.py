"""Data-free importance baselines: weight magnitude and random scores, in the shape of `ImportanceScores`.

They stand in for the activation importance of `sapling.prune.importance` (`prune.importance=magnitude|random`)
so the value of calibration data can be measured: same selection and slicing, other scores.

Magnitude works on *effective* weights: an RMSNorm gain `w` followed by a projection `W` is the one linear map
`W diag(w)`, so the columns of every projection that reads a normed stream (q/k/v after `input_layernorm`,
gate/up after `post_attention_layernorm`, the LM head after the final norm) are scaled by that gain first.
Each structure's score is the L2 norm of all effective weights (and biases) that belong to it only:

- MLP neuron i: gate and up row i, down_proj column i;
- query head h: its q_proj rows (+ bias) and o_proj columns;
- KV group g: its k_proj/v_proj rows (+ biases) and all of its query heads;
- hidden channel c: column c of the embeddings, of every reader (gain-scaled) and of the LM head, and row c
  of every writer (o_proj, down_proj);
- depth: the L2 norm of the layer's whole effective attention + MLP weight (the MLP-neuron and KV-group
  scores of that layer partition it). Data-free, so it cannot see how much a layer changes its input
  relative to the residual stream (what block influence measures); it is a weak baseline by design.

The code sums squared norms (gains squared too: `g_in` is the input norm's gain squared) and takes one square
root at the end. Qwen3's per-head
q_norm/k_norm make attention blind to the scale of q/k rows; their norms still count here, as for the others.
Parameters must be materialised (not ZeRO-3 partitions).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sapling.errors import ConfigError
from sapling.models import decoder_layers
from sapling.models.families import is_moe, moe_width_field
from sapling.prune.importance import ImportanceScores, head_dim


def _sq(w: Tensor) -> Tensor:
    """Elementwise square in float32 (weights may be bf16/fp16)."""
    return w.detach().float().pow(2)


def _rows_sq(linear: nn.Linear, gain: Tensor | None = None) -> Tensor:
    """[out] squared L2 norm of each row of the effective weight `W diag(gain)`, bias included."""
    w = _sq(linear.weight)
    rows = (w if gain is None else w * gain).sum(dim=1)
    return rows if linear.bias is None else rows + _sq(linear.bias)


def _cols_sq(linear: nn.Linear) -> Tensor:
    """[in] squared L2 norm of each column of the weight."""
    return _sq(linear.weight).sum(dim=0)


@torch.no_grad()
def magnitude_importance(model: nn.Module) -> ImportanceScores:
    """Weight-norm importance of MLP neurons, heads, KV groups, hidden channels and layers (no data)."""
    cfg = model.config
    if is_moe(cfg):
        raise ConfigError("prune.importance", "magnitude", f"weight-magnitude scores cover dense MLPs, not the "
                          f"experts of a {cfg.model_type} model", "use prune.importance=activation (or random)")
    layers = decoder_layers(model)
    n_heads = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    hd = head_dim(cfg)
    embed = model.model.embed_tokens.weight
    hidden = _sq(embed).sum(dim=0)
    mlp, heads, kv_groups, depth = [], [], [], []
    for layer in layers:
        attn, ffn = layer.self_attn, layer.mlp
        g_in = _sq(layer.input_layernorm.weight)
        g_post = _sq(layer.post_attention_layernorm.weight)

        neurons = _rows_sq(ffn.gate_proj, g_post) + _rows_sq(ffn.up_proj, g_post) + _cols_sq(ffn.down_proj)
        head = (_rows_sq(attn.q_proj, g_in).reshape(n_heads, hd).sum(dim=1)
                + _cols_sq(attn.o_proj).reshape(n_heads, hd).sum(dim=1))
        kv = (_rows_sq(attn.k_proj, g_in) + _rows_sq(attn.v_proj, g_in)).reshape(n_kv, hd).sum(dim=1)
        kv = kv + head.reshape(n_kv, n_heads // n_kv).sum(dim=1)
        mlp.append(neurons.sqrt())
        heads.append(head.sqrt())
        kv_groups.append(kv.sqrt())
        depth.append((neurons.sum() + kv.sum()).sqrt())

        readers = (_cols_sq(attn.q_proj) + _cols_sq(attn.k_proj) + _cols_sq(attn.v_proj)) * g_in
        readers = readers + (_cols_sq(ffn.gate_proj) + _cols_sq(ffn.up_proj)) * g_post
        writers = _rows_sq(attn.o_proj) + _rows_sq(ffn.down_proj)
        hidden = hidden + readers + writers
    head_w = model.get_output_embeddings().weight  # the embeddings again when tied: it both writes and reads
    hidden = hidden + _sq(head_w).sum(dim=0) * _sq(model.model.norm.weight)
    return ImportanceScores(
        mlp=torch.stack(mlp).cpu(),
        heads=torch.stack(heads).cpu(),
        kv_groups=torch.stack(kv_groups).cpu(),
        hidden=hidden.sqrt().cpu(),
        block_influence=torch.stack(depth).cpu(),
        layer_loss=None,
        num_tokens=0,
        aggregation="magnitude",
    )


def random_importance(model: nn.Module, seed: int = 0) -> ImportanceScores:
    """Uniform random scores (a seeded generator, independent of the weights): the floor any importance
    estimate has to beat."""
    cfg = model.config
    n_layers = len(decoder_layers(model))
    n_heads = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    moe = is_moe(cfg)
    intermediate = 0 if moe else decoder_layers(model)[0].mlp.down_proj.in_features
    g = torch.Generator().manual_seed(seed)
    return ImportanceScores(
        mlp=torch.rand(n_layers, intermediate, generator=g),
        heads=torch.rand(n_layers, n_heads, generator=g),
        kv_groups=torch.rand(n_layers, n_kv, generator=g),
        hidden=torch.rand(cfg.hidden_size, generator=g),
        block_influence=torch.rand(n_layers, generator=g),
        layer_loss=None,
        num_tokens=0,
        aggregation="random",
        experts=torch.rand(n_layers, cfg.num_experts, generator=g) if moe else None,
        expert_mlp=torch.rand(n_layers, cfg.num_experts, getattr(cfg, moe_width_field(cfg)), generator=g) if moe else None,
    )
