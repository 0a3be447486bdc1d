"""`sapling prune` and `sapling distill hooks.pre=[prune]` end to end."""

from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def test_prune_command_writes_loadable_smaller_model(cli, tmp_path, teacher_dir, text_files):
    out = tmp_path / "pruned"
    files = "[" + ",".join(str(p) for p in text_files) + "]"
    res = cli("prune", f"teacher.path={teacher_dir}", f"data.files={files}", "data.seq_len=32",
              "prune.target.intermediate_size=64", "prune.target.num_hidden_layers=1", "prune.target.hidden_size=48",
              "prune.target.num_key_value_heads=1", "prune.calibration.samples=8", "logger=none",
              f"hydra.run.dir={out}")
    assert res.returncode == 0, res.stderr[-3000:]
    model, info = AutoModelForCausalLM.from_pretrained(out / "model", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    cfg = model.config
    assert (cfg.intermediate_size, cfg.num_hidden_layers, cfg.hidden_size) == (64, 1, 48)
    assert (cfg.num_key_value_heads, cfg.num_attention_heads) == (1, 2)
    tok = AutoTokenizer.from_pretrained(out / "model")
    ids = tok("def main():", return_tensors="pt").input_ids
    gen = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert gen.shape[1] == ids.shape[1] + 5
    assert torch.isfinite(model(ids).logits).all()
    events = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert {e["model"] for e in events if e["event"] == "eval"} == {"teacher", "pruned"}
    assert "pruned" in (out / "report.md").read_text()
    assert (out / "prune_scores.pt").exists()

    # Re-pruning to another size reuses the saved scores (no calibration pass).
    again = tmp_path / "again"
    res = cli("prune", f"teacher.path={teacher_dir}", f"data.files={files}", "data.seq_len=32",
              "prune.target.intermediate_size=32", f"prune.scores={out / 'prune_scores.pt'}", "logger=none",
              f"hydra.run.dir={again}")
    assert res.returncode == 0, res.stderr[-3000:]
    assert AutoModelForCausalLM.from_pretrained(again / "model").config.intermediate_size == 32
    assert not (again / "prune_scores.pt").exists()


def test_prune_bad_target_is_one_line(cli, teacher_dir, text_files):
    res = cli("prune", f"teacher.path={teacher_dir}", f"data.files=[{text_files[0]}]",
              "prune.target.intermediate_size=100000")
    assert res.returncode == 2
    assert "prune.target.intermediate_size=100000" in res.stderr and "larger than the teacher" in res.stderr
    res = cli("prune", f"teacher.path={teacher_dir}", f"data.files=[{text_files[0]}]", "prune.target.depth=3")
    assert res.returncode != 0 and "depth" in res.stderr
    res = cli("prune", f"teacher.path={teacher_dir}", f"data.files=[{text_files[0]}]")
    assert res.returncode == 2 and "no target shape" in res.stderr


def test_distill_with_prune_prehook(cli, tmp_path, teacher_dir, text_files):
    out = tmp_path / "kd"
    files = "[" + ",".join(str(p) for p in text_files) + "]"
    res = cli("distill", f"teacher.path={teacher_dir}", f"data.files={files}", "data.seq_len=32", "hooks.pre=[prune]",
              "prune.target.intermediate_size=64", "prune.target.num_hidden_layers=1", "prune.calibration.samples=8",
              "trainer.max_steps=3", "trainer.micro_batch_size=2", "trainer.log_every=1", "trainer.eval_batches=1",
              "logger=none", f"hydra.run.dir={out}")
    assert res.returncode == 0, res.stderr[-3000:]
    cfg = AutoModelForCausalLM.from_pretrained(out / "model").config
    assert (cfg.intermediate_size, cfg.num_hidden_layers) == (64, 1)
    events = [json.loads(x)["event"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert events.index("prune") < events.index("start") < events.index("train")
