"""Per-step metrics: achieved TFLOP/s, MFU of the student and of the whole step, peak memory, top-1 agreement."""

from __future__ import annotations

import json

from transformers import AutoConfig

from sapling.train.flops import distill_step_flops


def test_train_records_carry_mfu_and_memory(cli_in_process, tmp_path, teacher_dir, text_files):
    cli = cli_in_process  # in this process: the records are what is checked, not the process
    out = tmp_path / "speed"
    files = "[" + ",".join(str(p) for p in text_files) + "]"
    res = cli("distill", f"teacher.path={teacher_dir}", f"data.files={files}", "data.seq_len=32",
              "student.config.num_hidden_layers=1", "trainer.max_steps=3", "trainer.micro_batch_size=2",
              "trainer.grad_accum=2", "trainer.log_every=1", "trainer.eval_batches=1", "trainer.peak_flops=1e11",
              "logger=none", f"hydra.run.dir={out}")
    assert res.returncode == 0, res.stderr[-3000:]
    train = [e for e in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if e["event"] == "train"]
    assert len(train) == 3
    teacher = AutoConfig.from_pretrained(teacher_dir)
    student = AutoConfig.from_pretrained(out / "model")
    f = distill_step_flops(student, teacher, batch_size=2, seq_len=32)
    for e in train:
        steps_per_s = e["tokens_per_s"] / (2 * 2 * 32)
        assert abs(e["tflops_per_device"] - f.total * 2 * steps_per_s / 1e12) <= 1e-6 * e["tflops_per_device"]
        assert abs(e["mfu_step"] - e["tflops_per_device"] * 1e12 / 1e11) <= 1e-9
        assert 0 < e["mfu_student"] < e["mfu_step"]  # the teacher's forward is part of the whole step only
        assert e["peak_rss_gib"] > 0.1
        assert 0.0 <= e["top1_agreement"] <= 1.0
    valid = 2 * 2 * 31  # sequences per micro-batch x micro-batches x predicted positions (all but the last)
    for e in train:  # a count of agreeing tokens over the step's valid tokens
        assert abs(e["top1_agreement"] * valid - round(e["top1_agreement"] * valid)) < 1e-6
