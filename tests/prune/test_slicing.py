"""Structured slicing of tiny Llama / Mistral / Qwen2 / Qwen3 / Granite / Gemma 2 / Gemma 3 / OLMo 2 / Phi-3 /
Cohere / Cohere 2 models: identity, exactness, reload, errors."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from sapling.models import count_parameters, tiny_config
from sapling.prune.slicing import KeepPlan, pruned_config, slice_model

SIZES: dict[str, Any] = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                             num_attention_heads=4, num_key_value_heads=2)
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("llama-tiny", {}),
    "llama-untied-bias": ("llama-tiny", {"tie_word_embeddings": False, "attention_bias": True, "mlp_bias": True}),
    "mistral": ("mistral-tiny", {}),
    # q/k/v biases; layers 1 and 2 use a sliding window (4 < sequence length), so layer_types matter
    "qwen2-sliding": ("qwen2-tiny", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}),
    "qwen3": ("qwen3-tiny", {"head_dim": 16}),
    "granite": ("granite-tiny", {}),
    # sliding (window 4 < sequence length) and global layers alternate: layer_types must follow kept layers
    "gemma2": ("gemma2-tiny", {"layer_types": ["sliding_attention", "full_attention", "sliding_attention"]}),
    "gemma3": ("gemma3-tiny", {"layer_types": ["full_attention", "sliding_attention", "full_attention"]}),
    "olmo2": ("olmo2-tiny", {}),
    "phi3": ("phi3-tiny", {}),  # fused qkv_proj and gate_up_proj
    "cohere-qk-norm": ("cohere-tiny", {}),  # parallel attention + MLP, per-head q/k LayerNorms
    "cohere2": ("cohere2-tiny", {"layer_types": ["sliding_attention", "full_attention", "sliding_attention"]}),
}
# q/k normalised over the whole projection: dropping a head changes the others' normalisation, so sliced
# heads do not equal zeroed ones (MLP neurons still do)
NO_HEAD_IDENTITY = ("olmo2",)


def make_model(family: str, seed: int = 0, **overrides: Any) -> PreTrainedModel:
    """A tiny model with every parameter random (norm weights near 1, biases non-zero)."""
    name, extra = FAMILIES[family]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(name, **{**SIZES, **extra, **overrides}))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.1 * noise if "norm" in pname else 0.1 * noise)
    return model.eval()


def input_ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, SIZES["vocab_size"], (2, 10), generator=torch.Generator().manual_seed(seed))


def logits(model: PreTrainedModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def q_weight(model: PreTrainedModel, layer: int) -> torch.Tensor:
    """The query projection's weight (Phi-3: the q block of its fused qkv_proj)."""
    attn = model.model.layers[layer].self_attn
    if hasattr(attn, "qkv_proj"):
        cfg = model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return attn.qkv_proj.weight[:cfg.num_attention_heads * head_dim]
    return attn.q_proj.weight


def snapshot(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def full_plan(cfg: Any) -> KeepPlan:
    """Every structure kept, written out index by index."""
    n = cfg.num_hidden_layers
    return KeepPlan(layers=list(range(n)), hidden=torch.arange(cfg.hidden_size),
                    mlp=[torch.arange(cfg.intermediate_size)] * n,
                    kv_heads=[torch.arange(cfg.num_key_value_heads)] * n,
                    heads=[torch.arange(cfg.num_attention_heads)] * n)


def real_plan() -> KeepPlan:
    """Drop layer 1, keep 48/64 hidden channels, 96/128 neurons, one KV group (of 2) with its query heads."""
    gen = torch.Generator().manual_seed(3)
    return KeepPlan(
        layers=[0, 2],
        hidden=torch.sort(torch.randperm(64, generator=gen)[:48]).values,
        mlp=[torch.sort(torch.randperm(128, generator=gen)[:96]).values for _ in range(2)],
        kv_heads=[torch.tensor([1]), torch.tensor([0])],
        heads=[torch.tensor([3, 2]), torch.tensor([0, 1])],
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_plan_is_exact(family: str) -> None:
    model, ids = make_model(family), input_ids()
    before, ref = snapshot(model), logits(model, ids)
    for plan in (KeepPlan(), full_plan(model.config)):
        student = slice_model(model, plan)
        assert type(student) is type(model) and student is not model
        assert torch.equal(logits(student, ids), ref)
        assert_same_state(snapshot(student), before)
        assert not student.training
        for k, v in student.state_dict().items():  # fresh storage: the teacher is never aliased
            assert v.untyped_storage().data_ptr() != model.state_dict()[k].untyped_storage().data_ptr(), k
    assert_same_state(snapshot(model), before)


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_model_saves_and_reloads(family: str, tmp_path) -> None:
    model, ids = make_model(family), input_ids()
    teacher_cfg = model.config.to_dict()
    plan = real_plan()
    student = slice_model(model, plan)
    cfg = student.config
    assert model.config.to_dict() == teacher_cfg
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (2, 48, 96)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (2, 1, 16)
    assert pruned_config(model.config, plan).to_dict() == cfg.to_dict()
    if getattr(model.config, "layer_types", None) is not None:
        assert cfg.layer_types == [model.config.layer_types[i] for i in (0, 2)]
    if family == "qwen2-sliding":
        assert cfg.layer_types == ["full_attention", "sliding_attention"] and cfg.max_window_layers == 1
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1]
    tied = bool(model.config.tie_word_embeddings)
    assert (student.lm_head.weight is student.model.embed_tokens.weight) == tied
    assert count_parameters(student) == count_parameters(AutoModelForCausalLM.from_config(cfg))
    assert student.model.embed_tokens.weight.shape == (128, 48)
    assert q_weight(student, 0).shape == (32, 48)
    if family == "phi3":  # [q; k; v] = 2 + 1 + 1 heads of 16
        assert student.model.layers[0].self_attn.qkv_proj.weight.shape == (64, 48)
        assert student.model.layers[0].mlp.gate_up_proj.weight.shape == (192, 48)

    out = logits(student, ids)
    student.save_pretrained(tmp_path)
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    reloaded.eval()
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert type(reloaded) is type(model)
    gen = reloaded.generate(ids[:1, :4], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert gen.shape == (1, 10) and torch.equal(gen[:, :4], ids[:1, :4])
    assert torch.equal(logits(reloaded, ids), out)
    assert (reloaded.lm_head.weight is reloaded.model.embed_tokens.weight) == tied
    assert_same_state(snapshot(reloaded), snapshot(student))

    # The KV cache is indexed by layer_idx: a cached step must match the full forward.
    with torch.no_grad():
        past = student(ids[:, :-1], use_cache=True).past_key_values
        step = student(ids[:, -1:], past_key_values=past).logits[:, -1]
    torch.testing.assert_close(step, out[:, -1], atol=1e-5, rtol=1e-5)


def _zero_removed(model: PreTrainedModel, plan: KeepPlan) -> None:
    """Zero (in place) the weights that feed only the MLP neurons / query heads the plan removes."""
    hd = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            drop = torch.ones(model.config.intermediate_size, dtype=torch.bool)
            drop[plan.mlp[i]] = False
            layer.mlp.down_proj.weight[:, drop] = 0
            if hasattr(layer.mlp, "gate_up_proj"):  # Phi-3: [gate; up]
                layer.mlp.gate_up_proj.weight[torch.cat([drop, drop])] = 0
            else:
                layer.mlp.gate_proj.weight[drop] = 0
                layer.mlp.up_proj.weight[drop] = 0
                for proj in (layer.mlp.gate_proj, layer.mlp.up_proj):
                    if proj.bias is not None:
                        proj.bias[drop] = 0
            kept = set(range(model.config.num_attention_heads) if plan.heads is None else plan.heads[i].tolist())
            for h in range(model.config.num_attention_heads):
                if h not in kept:
                    layer.self_attn.o_proj.weight[:, h * hd:(h + 1) * hd] = 0


@pytest.mark.parametrize("heads_mode", ["per_group", "kv_group"])
@pytest.mark.parametrize("family", FAMILIES)
def test_slicing_equals_zeroing(family: str, heads_mode: str) -> None:
    model, ids = make_model(family), input_ids()
    gen = torch.Generator().manual_seed(5)
    mlp = [torch.randperm(128, generator=gen)[:96] for _ in range(3)]  # unsorted on purpose
    if heads_mode == "per_group":  # both KV groups, one query head from each (groups are heads 0-1, 2-3)
        plan = KeepPlan(mlp=mlp, heads=[torch.tensor([3, 0]), torch.tensor([1, 2]), torch.tensor([0, 3])])
    else:  # one KV group with all its query heads (heads inferred)
        plan = KeepPlan(mlp=mlp, kv_heads=[torch.tensor([0]), torch.tensor([1]), torch.tensor([1])])
        plan.heads = [torch.tensor([0, 1]), torch.tensor([2, 3]), torch.tensor([2, 3])]
    if family in NO_HEAD_IDENTITY:
        plan = KeepPlan(mlp=mlp)
    student = slice_model(model, plan)
    if family in NO_HEAD_IDENTITY:
        assert student.config.num_attention_heads == 4
    else:
        assert (student.config.num_attention_heads, student.config.intermediate_size) == (2, 96)
        assert student.config.num_key_value_heads == (2 if heads_mode == "per_group" else 1)
    if heads_mode == "per_group" and family not in NO_HEAD_IDENTITY:  # regrouped: new head j uses KV head j
        assert torch.equal(q_weight(student, 0)[:16], q_weight(model, 0)[:16])
    zeroed = make_model(family)
    _zero_removed(zeroed, plan)
    torch.testing.assert_close(logits(student, ids), logits(zeroed, ids), atol=1e-5, rtol=0)
    # Without zeroing, the removed structures did matter (the check above is not vacuous).
    assert not torch.allclose(logits(model, ids), logits(zeroed, ids), atol=1e-3)


def test_heads_default_to_kept_groups_and_lists_are_accepted() -> None:
    cfg = tiny_config("llama-tiny", **SIZES)
    new = pruned_config(cfg, KeepPlan(layers=[1], hidden=list(range(40)), kv_heads=[[1]]))
    assert (new.num_hidden_layers, new.hidden_size, new.num_attention_heads, new.num_key_value_heads) == (1, 40, 2, 1)
    assert pruned_config(cfg, KeepPlan(mlp=torch.arange(64).repeat(3, 1))).intermediate_size == 64
    assert cfg.num_hidden_layers == 3 and cfg.hidden_size == 64  # the input config is left as it was


def test_mode_dtype_attention_and_grad_flags_carry_over() -> None:
    model = make_model("qwen3", attn_implementation="eager").to(torch.bfloat16).train()
    model.model.embed_tokens.requires_grad_(False)
    student = slice_model(model, real_plan())
    assert student.training and all(m.training for m in student.modules())
    assert student.config._attn_implementation == "eager"
    assert all(p.dtype == torch.bfloat16 for p in student.parameters())
    assert not student.model.embed_tokens.weight.requires_grad
    assert student.model.layers[1].mlp.up_proj.weight.requires_grad
    assert student.model.rotary_emb.inv_freq.device.type == "cpu"
    assert torch.equal(student.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq)


def _plan(**kw: Any) -> KeepPlan:
    return KeepPlan(**kw)


INVALID = [
    (_plan(layers=[0, 3]), r"plan\.layers: indices \[3\] out of range \[0, 3\)"),
    (_plan(layers=[0, 0]), r"plan\.layers: duplicated indices \[0\]"),
    (_plan(layers=[2, 0]), r"plan\.layers: must be in increasing order"),
    (_plan(layers=[]), r"plan\.layers: nothing kept"),
    (_plan(hidden=torch.tensor([-1, 2])), r"plan\.hidden: indices \[-1\] out of range \[0, 64\)"),
    (_plan(hidden=torch.tensor([5, 5, 6])), r"plan\.hidden: duplicated indices \[5\]"),
    (_plan(hidden=torch.tensor([], dtype=torch.long)), r"plan\.hidden: nothing kept"),
    (_plan(hidden=torch.tensor([0.0, 1.0])), r"plan\.hidden: indices must be integers"),
    (_plan(mlp=[torch.arange(8)] * 2), r"plan\.mlp: needs one index list per kept layer \(3\), got 2"),
    (_plan(layers=[0, 1], mlp=[torch.arange(8), torch.arange(9)]), r"plan\.mlp: every layer must keep the same"),
    (_plan(mlp=[torch.arange(8), torch.arange(8), torch.tensor([0, 128])]),
     r"plan\.mlp\[2\] \(teacher layer 2\): indices \[128\] out of range \[0, 128\)"),
    (_plan(mlp=[[], [], []]), r"plan\.mlp\[0\] \(teacher layer 0\): nothing kept"),
    (_plan(kv_heads=[[0], [0, 1], [1]]), r"plan\.kv_heads: every layer must keep the same"),
    (_plan(kv_heads=[[0], [0], [2]]), r"plan\.kv_heads\[2\] \(teacher layer 2\): indices \[2\] out of range"),
    (_plan(kv_heads=[[0], [1], [0]], heads=[[0, 1], [0, 1], [0, 1]]),
     r"plan\.heads\[1\] \(teacher layer 1\): query heads \[0, 1\] belong to KV groups \[0\], which are dropped"),
    (_plan(heads=[[0, 1, 2], [0, 2, 3], [0, 1, 3]]),
     r"plan\.heads\[0\] \(teacher layer 0\): every kept KV group must keep the same number of query heads, "
     r"got \{0: 2, 1: 1\}"),
    (_plan(heads=[[0, 1], [0, 1], [0, 1]]), r"every kept KV group must keep the same number.*\{0: 2, 1: 0\}"),
    (_plan(heads=[[], [], []]), r"plan\.heads\[0\] \(teacher layer 0\): nothing kept"),
    (_plan(heads=[[0, 0], [0, 1], [0, 1]]), r"plan\.heads\[0\] \(teacher layer 0\): duplicated indices \[0\]"),
]


@pytest.mark.parametrize(("plan", "message"), INVALID)
def test_invalid_plans_raise_clear_errors(plan: KeepPlan, message: str) -> None:
    cfg = tiny_config("llama-tiny", **SIZES)
    with pytest.raises(ValueError, match=message):
        pruned_config(cfg, plan)


def test_invalid_plan_rejected_before_any_work() -> None:
    model = make_model("mistral")
    with pytest.raises(ValueError, match=r"plan\.layers: indices \[7\] out of range"):
        slice_model(model, KeepPlan(layers=[7]))


def test_unsupported_architecture() -> None:
    with pytest.raises(ValueError, match=r"slicing supports model types llama, mistral, qwen2, qwen3, granite, gemma2, "
                                         r"gemma3_text, olmo2, phi3, cohere, cohere2, qwen3_moe, mixtral, olmoe; got 'gpt2'"):
        pruned_config(AutoConfig.for_model("gpt2"), KeepPlan())


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_gemma_embedding_scale_follows_the_kept_channels(family: str, tmp_path) -> None:
    """Gemma multiplies embeddings by sqrt(hidden_size): after cutting hidden channels the residual stream
    still starts as the teacher's on the kept ones, also after a reload (which recomputes that factor from the
    config), and the tied lm_head times the final norm's (1 + weight) is the teacher's on those channels."""
    model, ids = make_model(family), input_ids()
    kept = torch.sort(torch.randperm(64, generator=torch.Generator().manual_seed(4))[:40]).values
    student = slice_model(model, KeepPlan(hidden=kept))
    with torch.no_grad():
        want = model.model.embed_tokens(ids)[..., kept]
        torch.testing.assert_close(student.model.embed_tokens(ids), want)
        student.save_pretrained(tmp_path)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
        torch.testing.assert_close(reloaded.model.embed_tokens(ids), want)
        assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
        head = (1 + reloaded.model.norm.weight) * reloaded.lm_head.weight
        torch.testing.assert_close(head, ((1 + model.model.norm.weight) * model.lm_head.weight)[:, kept])
        assert not torch.allclose(reloaded.model.embed_tokens.weight, model.model.embed_tokens.weight[:, kept])
