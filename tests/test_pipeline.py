"""`sapling pipeline`: the demo recipe end to end at toy scale, and the teacher cache on a second run."""

from __future__ import annotations

import json

TOY = [
    "pipeline.corpus.max_bytes=300000", "pipeline.corpus.vocab_size=320", "pipeline.teacher_steps=12",
    "teacher.config.hidden_size=64", "teacher.config.intermediate_size=128", "teacher.config.num_hidden_layers=2",
    "teacher.config.num_attention_heads=4", "teacher.config.num_key_value_heads=2",
    "student.config.hidden_size=32", "student.config.intermediate_size=64", "student.config.num_hidden_layers=1",
    "student.config.num_attention_heads=2", "student.config.num_key_value_heads=1",
    "data.seq_len=32", "trainer.max_steps=6", "trainer.micro_batch_size=4", "trainer.log_every=2",
    "trainer.eval_every=3", "trainer.eval_batches=2", "eval.batches=4", "logger=none",
]


def test_pipeline_end_to_end_and_teacher_cache(cli, tmp_path):
    first = tmp_path / "first"
    res = cli("pipeline", *TOY, f"hydra.run.dir={first}")
    assert res.returncode == 0, res.stderr[-3000:]
    report = (first / "report.md").read_text()
    for row in ("unigram", "| teacher |", "student (distilled)", "student (CE from scratch)"):
        assert row in report, row
    assert "trained now" in report
    assert (first / "model" / "config.json").exists()
    events = [json.loads(x) for x in (first / "metrics.jsonl").read_text().splitlines()]
    evals = {e["model"]: e for e in events if e["event"] == "eval"}
    assert set(evals) == {"teacher", "student (distilled)", "student (CE from scratch)", "unigram"}
    assert all(e["val_ppl"] > 1 for e in evals.values())
    for stage in ("teacher", "distill", "scratch"):
        recs = [json.loads(x) for x in (first / stage / "metrics.jsonl").read_text().splitlines()]
        assert any(r["event"] == "done" for r in recs), stage

    second = tmp_path / "second"
    res = cli("pipeline", *TOY, f"hydra.run.dir={second}")
    assert res.returncode == 0, res.stderr[-3000:]
    report2 = (second / "report.md").read_text()
    assert "cached:" in report2
    assert not (second / "teacher").exists()
    # The cached teacher is the same model: same validation perplexity in both reports.
    row = next(line for line in report.splitlines() if line.startswith("| teacher |"))
    assert row in report2
