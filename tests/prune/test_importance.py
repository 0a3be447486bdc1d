"""Minitron-style importance: shapes, exactness against direct computations, split invariance, depth."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn
from transformers import AutoModelForCausalLM

from sapling.models import tiny_config
from sapling.prune.importance import (
    ImportanceAccumulator,
    ImportanceScores,
    estimate_importance,
    layer_drop_loss,
    skip_layers,
)

FAMILIES = ["llama-tiny", "mistral-tiny", "qwen2-tiny", "qwen3-tiny", "granite-tiny", "gemma2-tiny", "gemma3-tiny",
            "olmo2-tiny", "phi3-tiny", "cohere-tiny", "cohere2-tiny"]
# norms over the hidden width, per family: Llama's two pre-norms, Gemma's sandwich of four, OLMo 2's post-norms
NORM_NAMES = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")
AGGREGATIONS = ["mean_l2", "mean", "variance"]


def make_model(name: str = "llama-tiny", seed: int = 0, **overrides) -> nn.Module:
    torch.manual_seed(seed)
    cfg = tiny_config(name, num_hidden_layers=3, **overrides)
    return AutoModelForCausalLM.from_config(cfg).eval()


def make_batches(n: int = 4, bsz: int = 2, seq: int = 12, vocab: int = 512, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, vocab, (bsz, seq), generator=g)} for _ in range(n)]


def capture(model: nn.Module, batches: list[dict]) -> dict[str, list[Tensor]]:
    """Raw activations, concatenated over batches: down_proj/o_proj inputs, norm outputs, layer in/out."""
    layers = model.model.layers
    seen: dict[str, list[Tensor]] = {}

    def keep(key: str, x: Tensor) -> None:
        seen.setdefault(key, []).append(x.detach().double())

    def layer_hook(i: int):
        def hook(m, args, kwargs, out):  # returns None: a forward hook's return value replaces the output
            keep(f"in{i}", args[0] if args else kwargs["hidden_states"])
            keep(f"out{i}", out[0] if isinstance(out, tuple) else out)
        return hook

    handles = []
    norms = 0
    for i, layer in enumerate(layers):
        handles += [
            layer.mlp.down_proj.register_forward_pre_hook(lambda m, a, i=i: keep(f"mlp{i}", a[0])),
            layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a, i=i: keep(f"attn{i}", a[0])),
            layer.register_forward_hook(layer_hook(i), with_kwargs=True),
        ]
        for name in NORM_NAMES:
            if hasattr(layer, name):
                handles.append(getattr(layer, name).register_forward_hook(lambda m, a, o, k=norms: keep(f"norm{k}", o)))
                norms += 1
    handles.append(model.model.norm.register_forward_hook(lambda m, a, o, k=norms: keep(f"norm{k}", o)))
    try:
        with torch.no_grad():
            for b in batches:
                model(**b, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {k: torch.cat(v) for k, v in seen.items()}


def direct(x: Tensor, aggregation: str) -> Tensor:
    """Score of activations x [S, T, C] over the whole calibration set, written out plainly."""
    if aggregation == "mean_l2":
        return x.abs().mean(dim=1).norm(dim=0)
    if aggregation == "mean":
        return x.abs().mean(dim=(0, 1))
    return x.flatten(0, 1).var(dim=0, unbiased=False)


def assert_close(a: Tensor, b: Tensor) -> None:
    torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-6)


def assert_scores_equal(a: ImportanceScores, b: ImportanceScores) -> None:
    for name in ("mlp", "heads", "kv_groups", "hidden", "block_influence"):
        assert_close(getattr(a, name), getattr(b, name))
    assert a.num_tokens == b.num_tokens


@pytest.mark.parametrize("family", FAMILIES)
def test_shapes_finite_nonnegative(family):
    model = make_model(family)
    cfg = model.config
    scores = estimate_importance(model, make_batches(3), layer_loss=True)
    L = cfg.num_hidden_layers
    assert scores.mlp.shape == (L, cfg.intermediate_size)
    assert scores.heads.shape == (L, cfg.num_attention_heads)
    assert scores.kv_groups.shape == (L, cfg.num_key_value_heads)
    assert scores.hidden.shape == (cfg.hidden_size,)
    assert scores.block_influence.shape == (L,)
    assert scores.layer_loss is not None and scores.layer_loss.shape == (L,)
    assert scores.num_tokens == 3 * 2 * 12
    for t in (scores.mlp, scores.heads, scores.kv_groups, scores.hidden, scores.block_influence):
        assert torch.isfinite(t).all() and (t >= 0).all()
        assert t.abs().sum() > 0
    assert torch.isfinite(scores.layer_loss).all()
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    assert_close(scores.kv_groups, scores.heads.reshape(L, -1, group).sum(-1))


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("family,overrides", [("llama-tiny", {}), ("qwen3-tiny", {"head_dim": 24}), ("gemma2-tiny", {}),
                                             ("olmo2-tiny", {}), ("phi3-tiny", {}), ("cohere-tiny", {})])
def test_matches_direct_computation(family, overrides, aggregation):
    model = make_model(family, **overrides)
    batches = make_batches(3)
    scores = estimate_importance(model, batches, aggregation=aggregation)
    raw = capture(model, batches)
    L, H = model.config.num_hidden_layers, model.config.num_attention_heads
    mlp = torch.stack([direct(raw[f"mlp{i}"], aggregation) for i in range(L)])
    heads = torch.stack([direct(raw[f"attn{i}"].unflatten(-1, (H, -1)).norm(dim=-1), aggregation) for i in range(L)])
    hidden = sum(direct(raw[k], aggregation) for k in raw if k.startswith("norm"))
    assert sum(k.startswith("norm") for k in raw) == {"gemma2-tiny": 4, "cohere-tiny": 1}.get(family, 2) * L + 1
    bi = torch.stack([(1 - torch.cosine_similarity(raw[f"in{i}"], raw[f"out{i}"], dim=-1)).mean() for i in range(L)])
    assert_close(scores.mlp, mlp)
    assert_close(scores.heads, heads)
    assert_close(scores.hidden, hidden)
    assert_close(scores.block_influence, bi)
    assert scores.aggregation == aggregation


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_split_across_ranks_is_exact(aggregation):
    model = make_model("qwen2-tiny")
    batches = make_batches(4)
    whole = estimate_importance(model, batches, aggregation=aggregation)

    rank_a, rank_b = ImportanceAccumulator(model, aggregation), ImportanceAccumulator(model, aggregation)
    for b in batches[:2]:
        rank_a.update(b)
    for b in batches[2:]:
        rank_b.update(b)
    # A simulated all-reduce SUM: collectives pair the tensors by call order, so must `finalize`.
    other = iter([t.clone() for t in rank_b.state().values()])
    assert_scores_equal(rank_a.finalize(reduce=lambda t: t + next(other)), whole)
    assert next(other, None) is None

    # The same through estimate_importance's `reduce`, with an in-place reduce that returns None.
    state_b = iter([t.clone() for t in rank_b.state().values()])
    split = estimate_importance(model, batches[:2], aggregation=aggregation, reduce=lambda t: t.add_(next(state_b)))
    assert_scores_equal(split, whole)

    assert_scores_equal(rank_a.merge(rank_b).finalize(), whole)


def test_max_batches_and_generator_input():
    model = make_model()
    batches = make_batches(4)
    a = estimate_importance(model, iter(batches), max_batches=2, layer_loss=True)
    b = estimate_importance(model, batches[:2], layer_loss=True)
    assert_scores_equal(a, b)
    assert a.num_tokens == 2 * 2 * 12
    assert_close(a.layer_loss, b.layer_loss)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_attention_mask_counts_only_real_tokens(aggregation):
    model = make_model()
    g = torch.Generator().manual_seed(3)
    long, short = torch.randint(0, 512, (1, 12), generator=g), torch.randint(0, 512, (1, 7), generator=g)
    padded = torch.cat([long, torch.cat([short, torch.zeros(1, 5, dtype=torch.long)], dim=1)])
    mask = torch.ones_like(padded)
    mask[1, 7:] = 0
    masked = estimate_importance(model, [{"input_ids": padded, "attention_mask": mask}], aggregation=aggregation)
    separate = estimate_importance(model, [{"input_ids": long}, {"input_ids": short}], aggregation=aggregation)
    assert masked.num_tokens == 19
    assert_scores_equal(masked, separate)


def test_zeroed_neuron_scores_zero_and_ranks_last():
    model = make_model()
    layer, j = 1, 37
    with torch.no_grad():
        model.model.layers[layer].mlp.gate_proj.weight[j].zero_()
        model.model.layers[layer].mlp.up_proj.weight[j].zero_()
    for aggregation in AGGREGATIONS:
        scores = estimate_importance(model, make_batches(2), aggregation=aggregation)
        assert scores.mlp[layer, j] == 0
        assert scores.mlp[layer].argsort(descending=True)[-1] == j
        assert (scores.mlp[layer, torch.arange(scores.mlp.shape[1]) != j] > 0).all()


def test_identity_layer_has_no_influence_and_no_loss():
    model = make_model("mistral-tiny")
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.layers[1].mlp.down_proj.weight.zero_()
    batches = make_batches(2)
    scores = estimate_importance(model, batches, layer_loss=True)
    assert scores.block_influence[1] < 1e-6
    assert scores.block_influence[1] < scores.block_influence[[0, 2]].min()
    assert abs(scores.layer_loss[1]) < 1e-5
    drop = layer_drop_loss(model, batches)
    assert drop.shape == (3,)
    assert abs(drop[1]) < 1e-5
    assert drop[[0, 2]].abs().min() > 1e-4


ALTERNATING = ["sliding_attention", "full_attention", "sliding_attention"]


@pytest.mark.parametrize("family,overrides", [
    ("qwen3-tiny", {}),
    ("gemma2-tiny", {"layer_types": ALTERNATING}),  # dropped layers must not shift the sliding/global pattern
    ("cohere2-tiny", {"layer_types": ALTERNATING}),
])
def test_layer_drop_loss_matches_a_model_built_without_the_layers(family, overrides):
    model = make_model(family, **overrides)
    types = list(model.config.layer_types)
    batches = make_batches(2)
    layers = list(model.model.layers)

    def hf_loss(m: nn.Module) -> float:
        with torch.no_grad():
            return sum(float(m(**b, labels=b["input_ids"], use_cache=False).loss) for b in batches) / len(batches)

    def without(drop: list[int]) -> nn.Module:
        m = copy.deepcopy(model)
        m.model.layers = nn.ModuleList([m.model.layers[i] for i in range(3) if i not in drop])
        m.config.num_hidden_layers = 3 - len(drop)
        m.config.layer_types = [types[i] for i in range(3) if i not in drop]
        return m

    full = hf_loss(model)
    for block in (1, 2):
        got = layer_drop_loss(model, batches, block=block)
        want = torch.tensor([hf_loss(without(list(range(i, i + block)))) - full for i in range(3 - block + 1)])
        assert got.shape == (3 - block + 1,)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert list(model.model.layers) == layers
    assert model.config.layer_types == types
    with pytest.raises(ValueError, match="block"):
        layer_drop_loss(model, batches, block=4)


def test_skip_layers_keeps_layer_types_aligned():
    model = make_model("qwen2-tiny", use_sliding_window=True, sliding_window=4,
                       layer_types=["full_attention", "sliding_attention", "full_attention"])
    original = list(model.config.layer_types)
    with skip_layers(model, [0]) as kept:
        assert kept == [1, 2]
        assert model.config.layer_types == ["sliding_attention", "full_attention"]
        assert len(model.model.layers) == 2
    assert model.config.layer_types == original
    assert len(model.model.layers) == 3
    assert torch.isfinite(layer_drop_loss(model, make_batches(1))).all()


def test_hooks_removed_and_mode_restored_even_on_error():
    model = make_model()
    model.train()
    estimate_importance(model, make_batches(1), layer_loss=True)
    assert model.training
    with pytest.raises(IndexError):
        estimate_importance(model, [{"input_ids": torch.full((1, 4), 10_000)}])
    assert model.training
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


def test_invalid_inputs():
    model = make_model()
    with pytest.raises(ValueError, match="aggregation"):
        estimate_importance(model, make_batches(1), aggregation="max")
    with pytest.raises(ValueError, match="no calibration tokens"):
        estimate_importance(model, [])


@pytest.mark.parametrize("with_layer_loss", [False, True])
def test_save_load_round_trip(tmp_path, with_layer_loss):
    model = make_model()
    scores = estimate_importance(model, make_batches(2), aggregation="variance", layer_loss=with_layer_loss)
    path = scores.save(tmp_path / "sub" / "scores.pt")
    assert [p.name for p in path.parent.iterdir()] == ["scores.pt"]
    loaded = ImportanceScores.load(path)
    assert_scores_equal(loaded, scores)
    assert loaded.aggregation == "variance"
    if with_layer_loss:
        assert_close(loaded.layer_loss, scores.layer_loss)
    else:
        assert loaded.layer_loss is None
    again = ImportanceScores.from_state_dict(scores.state_dict())
    assert_scores_equal(again, scores)
