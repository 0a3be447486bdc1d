"""Validation under data parallelism: each rank evaluates its share of the batches and the sums are reduced,
so every rank gets the single-process value; under ZeRO-3 (lockstep) all ranks run as many forwards."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import sapling.eval.perplexity as perplexity
from sapling.eval.perplexity import evaluate_lm
from sapling.models import tiny_config


@pytest.mark.parametrize("lockstep", [False, True])
def test_rank_shares_sum_to_the_single_process_value(monkeypatch, lockstep):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama-tiny", vocab_size=64, hidden_size=32,
                                                         num_hidden_layers=1))
    blocks = torch.randint(0, 64, (7, 9))
    blocks[:, 0] = torch.arange(7)  # block i starts with token i: the forwards show which blocks ran
    want = evaluate_lm(model, blocks, micro_batch_size=2)  # 4 batches: [0 1] [2 3] [4 5] [6]

    world, sums, ran = 3, [], []
    monkeypatch.setattr(perplexity, "all_reduce_sum", lambda t: sums.append(t.clone()) or t)
    final_hidden = perplexity.final_hidden

    def recorded(model, ids, position_ids=None):
        ran[-1].append(ids[:, 0].tolist())
        return final_hidden(model, ids, position_ids)

    monkeypatch.setattr(perplexity, "final_hidden", recorded)
    for rank in range(world):
        monkeypatch.setattr(perplexity, "rank_world", lambda r=rank: (r, world))
        ran.append([])
        evaluate_lm(model, blocks, micro_batch_size=2, shard=True, lockstep=lockstep)
    nll, tokens = torch.stack(sums).sum(0).tolist()  # what the all-reduce gives every rank
    assert int(tokens) == want["tokens"] == 7 * 8
    assert nll / tokens == pytest.approx(want["loss"], rel=1e-12)
    if lockstep:  # the same number of forwards on every rank; a short share reruns batch 0 with zero weight
        assert ran == [[[0, 1], [6]], [[2, 3], [0, 1]], [[4, 5], [0, 1]]]
    else:
        assert ran == [[[0, 1], [6]], [[2, 3]], [[4, 5]]]


def test_a_budget_takes_blocks_spread_over_the_split(monkeypatch):
    """max_tokens / max_batches below the split take blocks j * n // k (evenly spread), not the first k: the
    validation split is in document order, and its first documents are not the split."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama-tiny", vocab_size=64, hidden_size=32,
                                                         num_hidden_layers=1))
    blocks = torch.randint(0, 64, (10, 9))
    blocks[:, 0] = torch.arange(10)
    ran = []
    final_hidden = perplexity.final_hidden

    def recorded(model, ids, position_ids=None):
        ran.extend(ids[:, 0].tolist())
        return final_hidden(model, ids, position_ids)

    monkeypatch.setattr(perplexity, "final_hidden", recorded)
    got = evaluate_lm(model, blocks, micro_batch_size=2, max_tokens=4 * 9)
    assert ran == [0, 2, 5, 7]
    ran.clear()
    evaluate_lm(model, blocks, micro_batch_size=2, max_batches=1)
    assert ran == [0, 5]
    ran.clear()
    want = evaluate_lm(model, blocks[[0, 2, 5, 7]], micro_batch_size=2)
    assert got == want
