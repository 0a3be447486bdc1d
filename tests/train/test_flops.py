"""FLOP formulas of sapling.train.flops against torch's FlopCounterMode on tiny HF decoders, peaks, MFU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM

from sapling.models import tiny_config
from sapling.train import flops

B, L = 2, 16


def _model(name: str, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = tiny_config(name, **overrides)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")  # eager: Q K^T, P V are bmm


def _count(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _ids(cfg) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (B, L), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("llama-tiny", {}),
        ("mistral-tiny", {"num_key_value_heads": 1}),
        ("qwen2-tiny", {"tie_word_embeddings": False}),
        ("qwen3-tiny", {"head_dim": 32}),  # head_dim * heads != hidden: q/o projections are 64 <-> 128
    ],
)
def test_forward_and_train_flops_match_flop_counter(name, overrides):
    model = _model(name, **overrides)
    ids = _ids(model.config)
    out = {}
    fwd = _count(lambda: out.setdefault("loss", model(input_ids=ids, labels=ids).loss))
    bwd = _count(lambda: out["loss"].backward())
    assert fwd == pytest.approx(B * L * flops.forward_flops_per_token(model.config, L), rel=1e-9)
    assert fwd + bwd == pytest.approx(B * L * flops.train_flops_per_token(model.config, L), rel=1e-9)
    # the attention term depends on the sequence length: a wrong L is visibly off
    assert fwd != pytest.approx(B * L * flops.forward_flops_per_token(model.config, 2 * L), rel=1e-3)
    decoder_only = flops.forward_flops_per_token(model.config, L, lm_head=False)
    cfg = model.config
    assert flops.forward_flops_per_token(cfg, L) - decoder_only == 2 * cfg.hidden_size * cfg.vocab_size


@pytest.mark.parametrize("mode, reentrant", [("early_stop", False), ("full", True)])
def test_recompute_flops_match_activation_checkpointing(mode, reentrant):
    model = _model("llama-tiny", num_hidden_layers=3)
    kwargs = {"use_reentrant": reentrant}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # transformers < 5
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.train()
    ids = _ids(model.config)
    total = _count(lambda: model(input_ids=ids, labels=ids).loss.backward())
    want = B * L * flops.train_flops_per_token(model.config, L, recompute=mode)
    assert total == pytest.approx(want, rel=1e-9)
    assert want > B * L * flops.train_flops_per_token(model.config, L)  # recompute adds FLOPs


def test_distill_step_flops_match_a_naive_distillation_step():
    """Student decoder fwd+bwd, teacher decoder fwd, and the KD head's (2*Ht + 6*Hs) * V per row."""
    teacher = _model("llama-tiny", num_hidden_layers=3, hidden_size=96, intermediate_size=160)
    student = _model("qwen3-tiny", num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    ids = _ids(student.config)

    def step():
        hs = student.model(input_ids=ids).last_hidden_state[:, :-1].reshape(-1, 64)
        with torch.no_grad():
            ht = teacher.model(input_ids=ids).last_hidden_state[:, :-1].reshape(-1, 96)
            lp_t = F.log_softmax(F.linear(ht, teacher.lm_head.weight), dim=-1)
        lp_s = F.log_softmax(F.linear(hs, student.lm_head.weight), dim=-1)
        F.kl_div(lp_s, lp_t, log_target=True, reduction="batchmean").backward()

    want = flops.distill_step_flops(student.config, teacher.config, batch_size=B, seq_len=L)
    assert _count(step) == pytest.approx(want.total, rel=1e-9)
    rows = B * (L - 1)
    assert want.head == rows * (2 * 96 + 6 * 64) * 512
    assert want.teacher == B * L * flops.forward_flops_per_token(teacher.config, L, lm_head=False)
    cached = flops.distill_step_flops(student.config, None, batch_size=B, seq_len=L, kd_rows=7)
    assert cached.teacher == 0 and cached.head == 7 * 6 * 64 * 512


def test_ce_step_flops_and_causal_attention():
    cfg = tiny_config("llama-tiny")
    ce = flops.ce_step_flops(cfg, batch_size=B, seq_len=L)
    assert ce.total == pytest.approx(B * L * flops.train_flops_per_token(cfg, L))
    # causal: on average (L + 1) / 2 keys per query instead of L, only the attention term changes
    full = flops.forward_flops_per_token(cfg, L, lm_head=False)
    causal = flops.forward_flops_per_token(cfg, L, lm_head=False, causal=True)
    d = flops.DecoderDims.from_config(cfg)
    assert full - causal == pytest.approx(d.layers * 4 * d.heads * d.head_dim * (L - (L + 1) / 2))
    with pytest.raises(ValueError, match="recompute"):
        flops.train_flops_per_token(cfg, L, recompute="yes")


def test_llama_8b_forward_flops_close_to_2n_rule():
    """Sanity at real scale: Llama-3.1-8B's forward at short context is ~2 * params FLOPs per token."""
    cfg = tiny_config(
        "llama-tiny",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=False,
    )
    params_no_embed = 32 * (4096 * 4096 * 2 + 2 * 4096 * 1024 + 3 * 4096 * 14336) + 128256 * 4096
    assert flops.forward_flops_per_token(cfg, 1) == pytest.approx(2 * params_no_embed, rel=1e-4)


def test_peak_flops_table_and_override():
    assert flops.peak_flops_for_name("NVIDIA H100 80GB HBM3", torch.bfloat16) == 989e12
    assert flops.peak_flops_for_name("NVIDIA H100 PCIe", torch.bfloat16) == 756e12
    assert flops.peak_flops_for_name("NVIDIA A100-SXM4-80GB", torch.float16) == 312e12
    assert flops.peak_flops_for_name("NVIDIA H200", torch.bfloat16) == 989e12
    assert flops.peak_flops_for_name("NVIDIA H20", torch.bfloat16) is None  # not an H200
    assert flops.peak_flops_for_name("NVIDIA GeForce RTX 4090", torch.bfloat16) is None
    assert flops.peak_flops_for_name("NVIDIA A100 80GB PCIe", torch.int8) is None
    saved = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert flops.peak_flops_for_name("NVIDIA A100-SXM4-40GB", torch.float32) == 19.5e12
        torch.set_float32_matmul_precision("high")  # TF32 tensor cores
        assert flops.peak_flops_for_name("NVIDIA A100-SXM4-40GB", torch.float32) == 156e12
    finally:
        torch.set_float32_matmul_precision(saved)
    assert flops.peak_flops("cpu", torch.float32) is None
    assert flops.peak_flops("cpu", torch.float32, override=2e12) == 2e12
    with pytest.raises(ValueError, match="peak_flops"):
        flops.peak_flops("cpu", torch.float32, override=-1.0)


def test_mfu():
    assert flops.mfu(989e12, 1.0, 1, 989e12) == pytest.approx(1.0)
    assert flops.mfu(3e15, 2.0, 8, 1e15) == pytest.approx(3e15 / (2.0 * 8 * 1e15))
    assert flops.mfu(1e12, 1.0, 1, None) is None
    assert flops.mfu(1e12, 0.0, 1, 1e12) is None
