"""Importance baselines: weight magnitude (checked against a plain re-computation) and seeded random scores."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from transformers import AutoModelForCausalLM

from sapling.models import tiny_config
from sapling.prune.baselines import magnitude_importance, random_importance
from sapling.prune.importance import ImportanceScores, head_dim
from sapling.prune.select import plan_from_scores, resolve_target
from sapling.prune.slicing import slice_model

FAMILIES = ["llama-tiny", "mistral-tiny", "qwen2-tiny", "qwen3-tiny"]


def make_model(name: str = "llama-tiny", seed: int = 0, **overrides) -> nn.Module:
    torch.manual_seed(seed)
    cfg = tiny_config(name, num_hidden_layers=3, **overrides)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    # Trained models have non-unit norm gains and biases; make them visible to the tests.
    with torch.no_grad():
        for name_, p in model.named_parameters():
            if "norm" in name_:
                p.uniform_(0.5, 1.5)
            elif name_.endswith("bias"):
                p.normal_(0.0, 0.1)
    return model


def assert_shapes(s: ImportanceScores, cfg, aggregation: str) -> None:
    n, kv = cfg.num_hidden_layers, cfg.num_key_value_heads
    assert s.mlp.shape == (n, cfg.intermediate_size)
    assert s.heads.shape == (n, cfg.num_attention_heads)
    assert s.kv_groups.shape == (n, kv)
    assert s.hidden.shape == (cfg.hidden_size,)
    assert s.block_influence.shape == (n,)
    assert s.layer_loss is None and s.num_tokens == 0 and s.aggregation == aggregation
    for t in (s.mlp, s.heads, s.kv_groups, s.hidden, s.block_influence):
        assert t.dtype == torch.float32 and t.device.type == "cpu"
        assert torch.isfinite(t).all() and (t >= 0).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_shapes_for_every_family(family):
    model = make_model(family)
    assert_shapes(magnitude_importance(model), model.config, "magnitude")
    assert_shapes(random_importance(model, seed=3), model.config, "random")


def test_random_is_deterministic_per_seed_and_ignores_the_weights():
    a, b = make_model(seed=0), make_model(seed=1)
    s0, s0_again, s0_other_model = random_importance(a, seed=0), random_importance(a, seed=0), random_importance(b, 0)
    s1 = random_importance(a, seed=1)
    for key in ("mlp", "heads", "kv_groups", "hidden", "block_influence"):
        assert torch.equal(getattr(s0, key), getattr(s0_again, key))
        assert torch.equal(getattr(s0, key), getattr(s0_other_model, key))
        assert not torch.equal(getattr(s0, key), getattr(s1, key))


def _direct(model: nn.Module) -> dict[str, Tensor]:
    """Magnitude scores written out plainly: concatenate each structure's effective weights, take the norm."""
    cfg = model.config
    nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, head_dim(cfg)
    group = nh // nkv
    m = model.model

    def with_bias(lin: nn.Linear, w: Tensor) -> Tensor:  # [out, in] -> [out, in (+1)]
        return w if lin.bias is None else torch.cat([w, lin.bias.detach().double()[:, None]], dim=1)

    mlp, heads, kv_groups, depth = [], [], [], []
    hidden_parts = [m.embed_tokens.weight.detach().double()]  # rows of the stack are per-structure vectors
    for layer in m.layers:
        a, f = layer.self_attn, layer.mlp
        g_in = layer.input_layernorm.weight.detach().double()
        g_post = layer.post_attention_layernorm.weight.detach().double()
        q, k, v = (with_bias(p, p.weight.detach().double() * g_in) for p in (a.q_proj, a.k_proj, a.v_proj))
        o = a.o_proj.weight.detach().double()
        gate, up = (p.weight.detach().double() * g_post for p in (f.gate_proj, f.up_proj))
        down = f.down_proj.weight.detach().double()
        mlp.append(torch.stack([torch.cat([gate[i], up[i], down[:, i]]).norm() for i in range(gate.shape[0])]))

        def head_vec(h: int, q=q, o=o) -> Tensor:
            return torch.cat([q[h * hd:(h + 1) * hd].flatten(), o[:, h * hd:(h + 1) * hd].flatten()])

        heads.append(torch.stack([head_vec(h).norm() for h in range(nh)]))
        kv_groups.append(torch.stack([torch.cat([k[g * hd:(g + 1) * hd].flatten(), v[g * hd:(g + 1) * hd].flatten(),
                                                 *(head_vec(h) for h in range(g * group, (g + 1) * group))]).norm()
                                      for g in range(nkv)]))
        depth.append(torch.cat([q.flatten(), k.flatten(), v.flatten(), o.flatten(), gate.flatten(), up.flatten(),
                                down.flatten()]).norm())
        hidden_parts += [x.weight.detach().double() * g_in for x in (a.q_proj, a.k_proj, a.v_proj)]
        hidden_parts += [x.weight.detach().double() * g_post for x in (f.gate_proj, f.up_proj)]
        hidden_parts += [o.t(), down.t()]
    hidden_parts.append(model.get_output_embeddings().weight.detach().double() * m.norm.weight.detach().double())
    hidden = torch.cat(hidden_parts, dim=0).norm(dim=0)
    return {"mlp": torch.stack(mlp), "heads": torch.stack(heads), "kv_groups": torch.stack(kv_groups),
            "hidden": hidden, "block_influence": torch.stack(depth)}


@pytest.mark.parametrize(("family", "overrides"), [
    ("llama-tiny", {}),
    ("llama-tiny", {"tie_word_embeddings": False}),
    ("qwen2-tiny", {"num_attention_heads": 8, "num_key_value_heads": 2}),  # q/k/v biases, 4 heads per group
    ("qwen3-tiny", {}),  # head_dim set explicitly
])
def test_magnitude_matches_direct_computation(family, overrides):
    model = make_model(family, **overrides)
    got, want = magnitude_importance(model), _direct(model)
    for key, ref in want.items():
        torch.testing.assert_close(getattr(got, key).double(), ref, rtol=1e-5, atol=1e-6, msg=key)


def test_magnitude_ranks_scaled_up_structures_first():
    model = make_model("llama-tiny", num_attention_heads=8, num_key_value_heads=2)
    hd = head_dim(model.config)
    layer = model.model.layers[1]
    neuron, head, channel = 37, 5, 11  # head 5 is in KV group 1 (4 query heads per group)
    with torch.no_grad():
        layer.mlp.down_proj.weight[:, neuron] *= 4.0
        layer.self_attn.o_proj.weight[:, head * hd:(head + 1) * hd] *= 4.0
        model.model.embed_tokens.weight[:, channel] *= 6.0
    s = magnitude_importance(model)
    assert int(s.mlp[1].argmax()) == neuron
    assert int(s.heads[1].argmax()) == head
    assert int(s.kv_groups[1].argmax()) == 1
    assert int(s.hidden.argmax()) == channel
    assert int(s.block_influence.argmax()) == 1
    # Other layers are untouched: their top neuron is not forced to be the scaled one.
    assert not torch.equal(s.mlp[0], s.mlp[1])


def test_magnitude_folds_norm_gains_into_the_readers():
    model = make_model("llama-tiny")
    before = magnitude_importance(model)
    with torch.no_grad():
        model.model.layers[0].post_attention_layernorm.weight.mul_(0.0)
    after = magnitude_importance(model)
    # With a zero gain only down_proj's column is left of each neuron of layer 0; layer 1 is unchanged.
    down = model.model.layers[0].mlp.down_proj.weight.detach().norm(dim=0)
    torch.testing.assert_close(after.mlp[0], down)
    assert (after.mlp[0] < before.mlp[0]).all()
    torch.testing.assert_close(after.mlp[1], before.mlp[1])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["magnitude", "random"])
def test_baseline_scores_prune_a_working_student(family, kind):
    model = make_model(family)
    scores = magnitude_importance(model) if kind == "magnitude" else random_importance(model, seed=1)
    shape = resolve_target(model.config, {"num_hidden_layers": 2, "hidden_size": 48, "intermediate_size": 64,
                                          "num_key_value_heads": 1})
    student = slice_model(model, plan_from_scores(scores, model.config, shape))
    assert {k: getattr(student.config, k) for k in shape} == shape
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        logits = student(input_ids=ids).logits
    assert logits.shape == (2, 9, model.config.vocab_size) and torch.isfinite(logits).all()


def test_magnitude_of_a_bf16_model_matches_float32():
    model = make_model("qwen2-tiny")
    ref = magnitude_importance(model)
    got = magnitude_importance(model.to(torch.bfloat16))
    assert got.mlp.dtype == torch.float32
    torch.testing.assert_close(got.mlp, ref.mlp, rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(got.hidden, ref.hidden, rtol=2e-2, atol=1e-3)


@pytest.mark.parametrize("kind", ["magnitude", "random"])
def test_prune_importance_key_selects_the_baseline(kind):
    from omegaconf import OmegaConf

    from sapling.prune.plan import importance_for

    model = make_model("llama-tiny")
    cfg = OmegaConf.create({"seed": 5, "prune": {"importance": kind}})
    scores = importance_for(cfg, model, data=None, device=torch.device("cpu"))  # no calibration data needed
    want = magnitude_importance(model) if kind == "magnitude" else random_importance(model, seed=5)
    assert scores.aggregation == kind
    assert torch.equal(scores.mlp, want.mlp) and torch.equal(scores.hidden, want.hidden)
