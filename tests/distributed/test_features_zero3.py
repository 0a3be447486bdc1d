"""Feature distillation with a ZeRO-3 teacher (never gathered by us) and a ZeRO-3 student on 2 CPU ranks."""

from __future__ import annotations

from pathlib import Path

WORKER = Path(__file__).with_name("features_zero3_worker.py")


def test_feature_distillation_zero3_two_ranks_matches_single_process(two_rank_workers):
    r = two_rank_workers[WORKER.name]
    assert r["world"] == 2 and r["teacher_layers"] == [1, 2]
    # the partitioned teacher's captured layer outputs equal the plain copy's, and it stays partitioned
    assert r["teacher_partitioned"]
    assert r["teacher_feature_err"] < 1e-6, r["teacher_feature_err"]
    # so does the loss, and the 2-rank loss over the global token count equals one process on the whole batch
    assert abs(r["loss"] - r["loss_plain_teacher"]) <= 1e-6 * abs(r["loss"])
    assert abs(r["loss"] - r["ref_loss"]) <= 1e-5 * abs(r["ref_loss"]), (r["loss"], r["ref_loss"])
    assert abs(r["feat"] * 0.7 - r["loss"]) <= 1e-6 * abs(r["loss"]) and r["loss"] > 0
    # gradients (student layers and the projection) equal the single-process ones; the projection is a
    # ZeRO-3 parameter of the student engine, gathered only inside the distiller's forward, and it trains
    assert "features.proj" in r["grad_rel_err"] and len(r["grad_rel_err"]) > 10
    worst = max(r["grad_rel_err"].items(), key=lambda kv: kv[1])
    assert worst[1] < 1e-5, worst
    assert r["unexpected_grads"] == []
    assert r["proj_partitioned"] and r["proj_moved"]
