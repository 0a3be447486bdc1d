"""Feature distillation through the trainer: `distill.features.weight > 0` on `sapling distill`."""

from __future__ import annotations

import json

from transformers import AutoModelForCausalLM


def test_distill_with_feature_loss(cli_in_process, tmp_path, teacher_dir, text_files):
    cli = cli_in_process  # `sapling distill` and `sapling export` in this process: none needs its own
    out = tmp_path / "feat"
    files = "[" + ",".join(str(p) for p in text_files) + "]"
    args = ("distill", f"teacher.path={teacher_dir}", f"data.files={files}", "data.seq_len=32",
            "student.config.num_hidden_layers=1", "student.config.hidden_size=32", "distill.features.weight=0.5",
            "trainer.max_steps=4", "trainer.save_every=2", "trainer.micro_batch_size=2", "trainer.log_every=1",
            "trainer.eval_batches=1", "logger=none", f"hydra.run.dir={out}")
    res = cli(*args)
    assert res.returncode == 0, res.stderr[-3000:]
    train = [e for e in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if e["event"] == "train"]
    assert len(train) == 4 and all(e["feat"] > 0 for e in train)
    for e in train:  # loss = kd + weight * feat (ce_weight is 0)
        assert abs(e["loss"] - (e["kd"] + 0.5 * e["feat"])) < 1e-4 * e["loss"]
    # The exported student is a plain HF model: the projection stays in the training checkpoint only.
    model, info = AutoModelForCausalLM.from_pretrained(out / "model", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert model.config.hidden_size == 32
    res = cli("export", f"checkpoint={out}", f"output={tmp_path / 'exported'}")
    assert res.returncode == 0, res.stderr[-3000:]
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "exported")
    assert all((a == b).all() for a, b in zip(model.state_dict().values(), again.state_dict().values()))
