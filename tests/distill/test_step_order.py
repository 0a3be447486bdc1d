"""loss_on_batch runs the teacher's forward (without autograd) before the student's, so the teacher's temporaries
are freed before the student's graph is built; the loss is the same as with the other order."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from sapling.distill.step import count_valid, loss_on_batch
from sapling.kernels import kd_loss_reference
from sapling.models import decoder_and_head, final_hidden, shifted_targets, tiny_config


def _model(seed: int):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config("llama-tiny", vocab_size=64, hidden_size=32, num_hidden_layers=1, intermediate_size=64,
                      num_attention_heads=2, num_key_value_heads=1)
    return AutoModelForCausalLM.from_config(cfg).double()


def test_teacher_runs_first_without_grad_and_the_loss_is_the_reference():
    teacher, student = _model(0).eval(), _model(1).train()
    calls: list[tuple[str, bool]] = []
    for name, model in (("teacher", teacher), ("student", student)):
        decoder_and_head(model)[0].register_forward_pre_hook(
            lambda _m, _a, name=name: calls.append((name, torch.is_grad_enabled())))
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(2))
    cfg = SimpleNamespace(divergence="forward_kl", beta=0.5, temperature=1.0, kd_weight=1.0, ce_weight=0.0,
                          chunk_size=None, router_aux_weight=None)
    loss, _ = loss_on_batch(student, teacher, {"input_ids": ids, "labels": ids}, cfg,
                            num_valid_tokens=count_valid(ids))
    assert calls == [("teacher", False), ("student", True)]

    hs = final_hidden(student, ids)  # the other order, by hand: the student first
    with torch.no_grad():
        ht = final_hidden(teacher, ids)
    ref = kd_loss_reference(hs, decoder_and_head(student)[1].weight, ht, decoder_and_head(teacher)[1].weight,
                            labels=shifted_targets(ids)).double()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)  # the fused loss accumulates in fp32
