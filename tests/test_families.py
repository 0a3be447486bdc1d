"""Every family Sapling runs: its fused-loss perplexity and KD loss equal float64 ones from the HF model's own
logits (softcapped for Gemma 2/3, scaled for Cohere and Granite), and a family it has not checked is refused.

Tiny random configs; the transforms are made strong (a softcap of 1-2, scales far from 1, a wide lm_head
init) so that a loss computed from the raw lm_head output would be visibly wrong.
"""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoConfig, AutoModelForCausalLM

from sapling.errors import ModelSourceError
from sapling.models import LOGIT_MODEL_TYPES, install_kd_head, logit_transform
from sapling.models.shapes import check_shape

SHAPE = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=64, initializer_range=0.5,
             pad_token_id=0, bos_token_id=1, eos_token_id=2)
# the field that makes each family's logits differ from W·h, set far from identity
STRONG = {"gemma2": dict(final_logit_softcapping=1.5), "gemma3_text": dict(final_logit_softcapping=2.0),
          "cohere": dict(logit_scale=3.0), "cohere2": dict(logit_scale=0.3), "granite": dict(logits_scaling=0.25)}

MOE = {"qwen3_moe": dict(num_experts=4, moe_intermediate_size=16, num_experts_per_tok=2),
       "mixtral": dict(num_local_experts=4, num_experts_per_tok=2), "olmoe": dict(num_experts=4, num_experts_per_tok=2)}


def tiny(model_type: str, seed: int) -> torch.nn.Module:
    extra = dict(sliding_window=8) if model_type in ("gemma2", "gemma3_text", "cohere2") else {}
    extra.update(MOE.get(model_type, {}))
    cfg = AutoConfig.for_model(model_type, **SHAPE, **extra, **STRONG.get(model_type, {}))
    torch.manual_seed(seed)
    moe = dict(experts_implementation="eager") if model_type in MOE else {}  # grouped_mm has no float64
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", **moe).double().eval()


def ids(seed: int, batch: int = 3, length: int = 12) -> torch.Tensor:
    return torch.randint(0, SHAPE["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("model_type", LOGIT_MODEL_TYPES)
def test_perplexity_and_kd_loss_equal_the_models_own_logits(model_type):
    from sapling.distill.step import loss_on_batch
    from sapling.eval.perplexity import evaluate_lm

    teacher, student = tiny(model_type, 0), tiny(model_type, 1)
    x = ids(2)
    with torch.no_grad():
        hf_loss = float(teacher(input_ids=x, labels=x).loss)
        z_t, z_s = teacher(input_ids=x).logits[:, :-1], student(input_ids=x).logits[:, :-1]
    ours = evaluate_lm(teacher, list(x), micro_batch_size=2)
    assert ours["tokens"] == x[:, 1:].numel()
    assert ours["loss"] == pytest.approx(hf_loss, rel=1e-6)

    lp_t, lp_s = z_t.log_softmax(-1), z_s.log_softmax(-1)
    kl64 = float((lp_t.exp() * (lp_t - lp_s)).sum(-1).mean())
    ce64 = float(-lp_s.gather(-1, x[:, 1:, None]).mean())
    distill = OmegaConf.create(dict(divergence="forward_kl", beta=0.5, temperature=1.0, kd_weight=1.0,
                                    ce_weight=0.25))
    loss, parts = loss_on_batch(student, teacher, {"input_ids": x, "labels": x}, distill)
    assert float(parts["kd"]) == pytest.approx(kl64, rel=1e-5)
    assert float(parts["ce"]) == pytest.approx(ce64, rel=1e-5)
    assert float(loss.detach()) == pytest.approx(kl64 + 0.25 * ce64, rel=1e-5)

    transform = logit_transform(teacher.config)
    if model_type in STRONG:  # the raw lm_head output would have given another loss
        with torch.no_grad():
            raw = teacher.get_output_embeddings()(teacher.model(input_ids=x).last_hidden_state[:, :-1])
        raw_loss = float(torch.nn.functional.cross_entropy(raw.reshape(-1, raw.shape[-1]), x[:, 1:].reshape(-1)))
        assert transform is not None and abs(raw_loss - hf_loss) > 0.05
    else:
        assert transform is None


def test_teacher_topk_cache_is_of_the_models_own_logits():
    from sapling.distill.teacher_cache import teacher_topk

    teacher = tiny("gemma2", 0)
    x = ids(3)
    lp, idx, tail = teacher_topk(teacher, x, top_k=5, temperature=2.0)
    with torch.no_grad():
        ref = (teacher(input_ids=x).logits[:, :-1].reshape(-1, SHAPE["vocab_size"]) / 2.0).log_softmax(-1)
    want_lp, want_idx = ref.topk(5, dim=-1)
    assert torch.equal(idx, want_idx)
    torch.testing.assert_close(lp.double(), want_lp, rtol=0, atol=1e-5)
    rest = ref.scatter(1, want_idx, float("-inf")).logsumexp(-1)
    torch.testing.assert_close(tail.double(), rest, rtol=0, atol=1e-5)


def test_a_family_sapling_has_not_checked_is_refused_in_one_line():
    gpt2 = AutoConfig.for_model("gpt2", n_embd=32, n_layer=1, n_head=4, vocab_size=97)
    for call in (lambda: logit_transform(gpt2, "teacher.config"), lambda: check_shape("teacher.config", gpt2),
                 lambda: install_kd_head(AutoModelForCausalLM.from_config(gpt2), "teacher")):
        with pytest.raises(ModelSourceError) as err:
            call()
        text = str(err.value)
        assert "\n" not in text and "'gpt2'" in text and "gemma2" in text and "fix:" in text
    assert math.isclose(logit_transform(AutoConfig.for_model("granite", logits_scaling=8.0)).scale, 0.125)
