"""The fused KD head under DeepSpeed ZeRO-3 on 2 CPU ranks equals a single-process reference."""

from __future__ import annotations

from pathlib import Path

WORKER = Path(__file__).with_name("kd_head_zero3_worker.py")


def test_kd_head_zero3_two_ranks_matches_single_process(two_rank_workers):
    result = two_rank_workers[WORKER.name]
    assert result["world"] == 2
    assert result["head_partitioned"], "lm_head weight should be partitioned by ZeRO-3 outside its forward"
    assert abs(result["loss"] - result["ref_loss"]) <= 1e-5 * abs(result["ref_loss"])
    assert result["num_params"] > 5
    worst = max(result["grad_rel_err"].items(), key=lambda kv: kv[1])
    assert worst[1] < 1e-5, worst
