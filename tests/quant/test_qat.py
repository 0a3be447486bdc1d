"""Quantization-aware training: the forward uses the export's numerics, the backward is straight-through,
the parameters and their names are untouched, and the RTN export reproduces what the forward used."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig

from sapling.quant.layerwise import quantize_model
from sapling.quant.numerics import QuantSpec, dequantize, rtn
from sapling.quant.qat import FakeQuantLinear, disable_quant_aware, enable_quant_aware

SPEC = QuantSpec(4, 32, torch.bfloat16)


def tiny_llama(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return AutoModelForCausalLM.from_config(cfg)


def test_forward_uses_the_export_numerics_and_backward_is_straight_through():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 16)
    enable = torch.nn.Sequential(lin)
    enable_quant_aware(enable, SPEC, ignore=[])
    assert isinstance(lin, FakeQuantLinear)
    x = torch.randn(5, 64, dtype=torch.float64).float().requires_grad_(True)
    q, scale = rtn(lin.weight.detach().to(torch.bfloat16), SPEC)
    w_export = dequantize(q, scale, torch.float32)  # what the served model multiplies by
    out = lin(x)
    torch.testing.assert_close(out, F.linear(x, w_export, lin.bias), rtol=0, atol=0)
    g = torch.randn_like(out)
    out.backward(g)
    # straight-through: the latent weight gets the gradient of the linear evaluated at the quantized weight
    torch.testing.assert_close(lin.weight.grad, g.T @ x.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad, g @ w_export, rtol=1e-6, atol=1e-6)


def test_enable_keeps_parameters_and_names_and_disable_restores():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = enable_quant_aware(model, SPEC)
    assert "lm_head" not in names and len(names) == 7
    assert all(isinstance(dict(model.named_modules())[n], FakeQuantLinear) for n in names)
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], v) for k, v in before.items())
    disable_quant_aware(model)
    assert not any(isinstance(m, FakeQuantLinear) for m in model.modules())


def test_incompatible_width_fails_before_training():
    model = tiny_llama()
    with pytest.raises(ValueError, match="down_proj has input width 96"):
        enable_quant_aware(model, QuantSpec(4, 64, torch.bfloat16))


def test_training_moves_the_latent_weights_and_the_rtn_export_is_the_trained_forward():
    model = tiny_llama()
    enable_quant_aware(model, SPEC)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ids = torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(2))
    start = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    losses = []
    for _ in range(5):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, start)
    assert losses[-1] < losses[0]
    with torch.no_grad():
        trained = model(ids).logits  # the forward QAT trains: fake-quantized weights, float32 elsewhere
    disable_quant_aware(model)
    quantize_model(model, SPEC, method="rtn", progress=False)  # the post-hook's export path (method auto -> rtn)
    with torch.no_grad():
        exported = model(ids).logits
    torch.testing.assert_close(exported, trained, rtol=0, atol=0)
