"""Layer-by-layer quantization: each layer's Hessians come from the already-quantized layers before it,
offloading changes nothing, RTN is the numerics' RTN, and the distillation-guided saliency is the squared
gradient of the KD loss at each linear's outputs."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig

from sapling.quant import layerwise
from sapling.quant.guided import distillation_saliency
from sapling.quant.layerwise import plan_targets, quantize_model
from sapling.quant.numerics import QuantSpec, dequantize, rtn

SPEC = QuantSpec(4, 32, torch.float32)


def tiny_llama(seed: int = 0, layers: int = 2) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=120, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return AutoModelForCausalLM.from_config(cfg).eval()


def calib(n: int = 3, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 120, (2, 12), generator=g) for _ in range(n)]


def input_hessians(model: torch.nn.Module, names: list[str], batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """mean x x^T of each named linear's inputs over `batches`, in float64."""
    mods = dict(model.named_modules())
    acc = {n: [torch.zeros(mods[n].in_features, mods[n].in_features, dtype=torch.float64), 0] for n in names}
    handles = []
    for n in names:
        def hook(_m, inp, _out, n=n):
            x = inp[0].reshape(-1, inp[0].shape[-1]).double()
            acc[n][0] += x.T @ x
            acc[n][1] += x.shape[0]

        handles.append(mods[n].register_forward_hook(hook))
    with torch.no_grad():
        for ids in batches:
            model(ids)
    for h in handles:
        h.remove()
    return {n: s / c for n, (s, c) in acc.items()}


def test_each_layer_is_calibrated_on_the_quantized_layers_before_it(monkeypatch):
    original = tiny_llama()
    model = copy.deepcopy(original)
    batches = calib()
    seen: list[torch.Tensor] = []
    real_gptq = layerwise.gptq

    def recording(weight, hessian, spec, **kw):
        seen.append(hessian.detach().clone())
        return real_gptq(weight, hessian, spec, **kw)

    monkeypatch.setattr(layerwise, "gptq", recording)
    result = quantize_model(model, SPEC, method="gptq", batches=batches, progress=False)
    order = [n for n in plan_targets(original, SPEC)[0] if n.startswith("model.layers.")]
    assert list(result.weights)[: len(order)] == order and len(seen) == len(order)
    used = dict(zip(order, seen))

    layer0 = [n for n in order if n.startswith("model.layers.0.")]
    layer1 = [n for n in order if n.startswith("model.layers.1.")]
    # layer 0: inputs of the unquantized model
    for n, h in input_hessians(original, layer0, batches).items():
        torch.testing.assert_close(used[n][0].double(), h, rtol=1e-4, atol=1e-6)
    # layer 1: inputs of the model whose layer 0 is quantized (layer 1 itself not yet)
    mixed = copy.deepcopy(original)
    mixed.model.layers[0].load_state_dict(model.model.layers[0].state_dict())
    expected = input_hessians(mixed, layer1, batches)
    unquantized = input_hessians(original, layer1, batches)
    for n in layer1:
        torch.testing.assert_close(used[n][0].double(), expected[n], rtol=1e-4, atol=1e-6)
        assert not torch.allclose(expected[n], unquantized[n], rtol=1e-4, atol=1e-6)  # the check can fail
    # the model's weights are the dequantized integers
    mods = dict(model.named_modules())
    for n, (q, scale) in result.weights.items():
        assert torch.equal(mods[n].weight.data, dequantize(q, scale, torch.float32))


def test_offload_gives_the_same_result():
    batches = calib()
    a, b = tiny_llama(), tiny_llama()
    ra = quantize_model(a, SPEC, method="gptq", batches=batches, progress=False)
    rb = quantize_model(b, SPEC, method="gptq", batches=batches, progress=False, offload=True)
    for n in ra.weights:
        assert torch.equal(ra.weights[n][0], rb.weights[n][0]) and torch.equal(ra.weights[n][1], rb.weights[n][1])


def test_rtn_method_is_round_to_nearest_in_the_export_dtype():
    spec = QuantSpec(4, 32, torch.bfloat16)
    model = tiny_llama()
    weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    result = quantize_model(model, spec, method="rtn", progress=False)
    assert "lm_head" not in result.weights and result.ignored == ["lm_head"]
    for n, (q, scale) in result.weights.items():
        eq, es = rtn(weights[n].to(torch.bfloat16), spec)
        assert torch.equal(q, eq) and torch.equal(scale, es)


def test_gptq_beats_rtn_on_the_model_output():
    batches = calib(6)
    ref = tiny_llama(seed=4)
    spec = QuantSpec(4, 32, torch.float32)

    def output_error(method: str) -> float:
        m = copy.deepcopy(ref)
        quantize_model(m, spec, method=method, batches=batches, progress=False)
        with torch.no_grad():
            return sum(float((m(ids).logits - ref(ids).logits).pow(2).mean()) for ids in batches)

    assert output_error("gptq") < output_error("rtn")


def test_uniform_saliency_is_plain_gptq():
    batches = calib()
    a, b = tiny_llama(), tiny_llama()
    targets = plan_targets(a, SPEC)[0]
    ones = {n: [torch.ones(ids.numel(), 2) for ids in batches] for n in targets}
    ra = quantize_model(a, SPEC, method="gptq", batches=batches, progress=False)
    rb = quantize_model(b, SPEC, method="gptq", batches=batches, progress=False, saliency=ones)
    for n in ra.weights:
        assert torch.equal(ra.weights[n][0], rb.weights[n][0])


def test_saliency_is_the_squared_kd_gradient_at_each_linear_output():
    student, teacher = tiny_llama(seed=0), tiny_llama(seed=7)
    batches = calib(2)
    targets = plan_targets(student, SPEC)[0]
    groups, temperature = 4, 2.0
    sal = distillation_saliency(student, teacher, batches, targets, groups=groups, temperature=temperature,
                                progress=False)
    name = "model.layers.0.mlp.up_proj"  # 96 output rows -> 4 groups of 24
    mods = dict(student.named_modules())
    for b, ids in enumerate(batches):
        captured = {}
        h = mods[name].register_forward_hook(lambda _m, _i, out, box=captured: box.setdefault("z", out))
        s_logits = student(ids).logits[:, :-1].double() / temperature
        h.remove()
        with torch.no_grad():
            t_logits = teacher(ids).logits[:, :-1].double() / temperature
        # forward KL(p_t || p_s) summed over predicting positions, scaled by T^2 (the fused loss's convention)
        kl = F.kl_div(F.log_softmax(s_logits, -1), F.log_softmax(t_logits, -1), log_target=True, reduction="sum")
        (grad,) = torch.autograd.grad(kl * temperature**2, captured["z"])
        expected = grad.double().reshape(-1, groups, 96 // groups).pow(2).mean(-1)
        got = sal[name][b]
        assert got.shape == (ids.numel(), groups)
        torch.testing.assert_close(got.double(), expected, rtol=2e-3, atol=1e-12)
        last = torch.arange(ids.numel()) % ids.shape[1] == ids.shape[1] - 1
        assert torch.all(got[last] == 0) and torch.all(got[~last].sum(-1) > 0)  # the last position predicts nothing
    assert all(p.grad is None for p in student.parameters())  # parameter gradients were not accumulated


def test_saliency_across_padded_vocabularies_ignores_the_padded_rows():
    """A student with 8 padded lm_head rows more than its teacher: with vocab=120 the padded rows take no part
    (changing them changes nothing), over every batch."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    student, teacher = AutoModelForCausalLM.from_config(cfg).eval(), tiny_llama(seed=7)
    batches, targets = calib(2), plan_targets(student, SPEC)[0]
    a = distillation_saliency(student, teacher, batches, targets, progress=False, vocab=120)
    with torch.no_grad():
        student.lm_head.weight[120:] = torch.randn(8, 64)
    b = distillation_saliency(student, teacher, batches, targets, progress=False, vocab=120)
    for name in targets:
        for x, y in zip(a[name], b[name]):
            torch.testing.assert_close(x, y)


def test_guided_gptq_differs_from_plain_and_uses_per_group_hessians():
    student, teacher = tiny_llama(seed=0), tiny_llama(seed=7)
    batches = calib(3)
    targets = plan_targets(student, SPEC)[0]
    sal = distillation_saliency(student, teacher, batches, targets, groups=4, progress=False)
    plain = quantize_model(copy.deepcopy(student), SPEC, method="gptq", batches=batches, progress=False)
    guided = quantize_model(copy.deepcopy(student), SPEC, method="gptq", batches=batches, progress=False,
                            saliency=sal)
    differs = [n for n in plain.weights if not torch.equal(plain.weights[n][0], guided.weights[n][0])]
    assert differs, "guided saliency changed no quantized weight"


@pytest.mark.parametrize("ignore", [["lm_head", "re:.*\\.mlp\\..*"], ["lm_head", "v_proj"]])
def test_ignore_patterns(ignore):
    targets, _, ignored = plan_targets(tiny_llama(), SPEC, ignore)
    assert "lm_head" in ignored and not set(targets) & set(ignored)
    assert all(not any(t.endswith(s) for s in ("gate_proj", "up_proj", "down_proj")) for t in targets) or \
        ignore[1] == "v_proj"
    assert all(not t.endswith("v_proj") for t in targets) or ignore[1] != "v_proj"
