"""Pruning at scale: calibration over 2 CPU ranks, and a ZeRO-3 partitioned teacher, equal one process."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from sapling.data.calibration import calibration_batches
from sapling.dist import all_reduce_sum
from sapling.models import tiny_config
from sapling.prune.distributed import gather_units, is_zero3_partitioned
from sapling.prune.importance import distributed_importance, estimate_importance

WORKER = Path(__file__).with_name("prune_distributed_worker.py")
TOLERANCE = 1e-6  # relative to each score tensor's largest magnitude: float64 sums in another order


def _ids(blocks: torch.Tensor, samples: int, rank: int, world: int) -> list[list[int]]:
    batches = calibration_batches(blocks, samples, 3, "cpu", 5, rank, world)
    return [row for b in batches for row in b["input_ids"].tolist()]


@pytest.mark.parametrize("samples, world", [(11, 2), (10, 3), (2, 4), (40, 3)])
def test_calibration_shares_are_disjoint_slices_of_the_global_order(samples, world):
    blocks = torch.arange(30 * 2).reshape(30, 2)
    shares = [_ids(blocks, samples, r, world) for r in range(world)]
    assert sum(shares, []) == _ids(blocks, samples, 0, 1)  # in order, disjoint, covering
    sizes = [len(s) for s in shares]
    assert max(sizes) - min(sizes) <= 1
    assert sum(sizes) == min(samples, 30)
    with pytest.raises(ValueError, match="rank"):
        next(calibration_batches(blocks, samples, 3, "cpu", 5, rank=world, world_size=world))


def test_single_process_helpers_are_no_ops():
    t = torch.arange(3.0)
    assert all_reduce_sum(t) is t and torch.equal(t, torch.arange(3.0))
    torch.manual_seed(0)
    cfg = tiny_config("qwen3-tiny", vocab_size=64, num_hidden_layers=2)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    assert not is_zero3_partitioned(model)
    units = gather_units(model)
    assert [p for p, _ in units] == ["model.embed_tokens.", "model.layers.0.", "model.layers.1.", "model.norm.",
                                     "model.rotary_emb.", "lm_head."]
    blocks = torch.randint(0, 64, (9, 8), generator=torch.Generator().manual_seed(1))
    got = distributed_importance(model, blocks, samples=7, batch_size=3, device="cpu", seed=2, layer_loss=True)
    ref = estimate_importance(model, calibration_batches(blocks, 7, 3, "cpu", seed=2), layer_loss=True)
    for name in ("mlp", "heads", "kv_groups", "hidden", "block_influence", "layer_loss"):
        assert torch.equal(getattr(got, name), getattr(ref, name)), name
    assert got.num_tokens == ref.num_tokens == 7 * 8


def test_two_ranks_and_zero3_teacher_match_one_process(two_rank_workers):
    result = two_rank_workers[WORKER.name]
    assert result["world"] == 2
    assert result["shares"] == {"sizes": [7, 6], "union_is_global_order": True}
    cases = result["cases"]
    expected = {f"{fam}/{kind}" for fam in ("llama-tiny", "qwen2-tiny")
                for kind in ("dp/samples=13", "dp/samples=1", "dp/mean", "dp/variance",
                             "zero3-bare/samples=13", "zero3-bare/samples=1", "zero3-bare/slice",
                             "zero3-engine/samples=13", "zero3-engine/samples=1", "zero3-engine/slice")}
    assert set(cases) == expected
    for name, case in cases.items():
        if name.endswith("/slice"):
            assert case["same_keys"] and case["config_equal"] and case["unequal"] == [], (name, case)
            assert not case["partitioned"] and case["device"] == "cpu", (name, case)
            assert case["tied"] == case["ref_tied"], (name, case)
            assert case["teacher_partitioned"], (name, case)
            # One decoder layer (or embedding / norm / head) whole at a time, never the model.
            assert 0 < case["slice_peak"] <= case["layer_params"] < case["total_params"], (name, case)
            if "bare" in name:
                assert 0 < case["forward_peak"] <= case["layer_params"], (name, case)
        else:
            assert case["same"], f"{name}: ranks disagree"
            worst = max(case["err"].items(), key=lambda kv: kv[1])
            assert worst[1] <= TOLERANCE, (name, worst)
    assert cases["llama-tiny/dp/samples=1"]["err"]["layer_loss"] <= TOLERANCE  # rank 1 had no batch
