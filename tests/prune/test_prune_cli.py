"""`sapling prune` and `sapling distill hooks.pre=[prune]` end to end, through `sapling.cli.main` in this process
(no check here needs a process of its own)."""

from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def test_prune_command_writes_loadable_smaller_model(cli_in_process, tmp_path, teacher_dir, text_files):
    cli = cli_in_process
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


def test_prune_bad_target_is_one_line(cli_in_process, teacher_dir, text_files):
    res = cli_in_process("prune", f"teacher.path={teacher_dir}", f"data.files=[{text_files[0]}]",
              "prune.target.intermediate_size=100000")
    assert res.returncode == 2
    assert "prune.target.intermediate_size=100000" in res.stderr and "larger than the teacher" in res.stderr
    res = cli_in_process("prune", f"teacher.path={teacher_dir}", f"data.files=[{text_files[0]}]", "prune.target.depth=3")
    assert res.returncode != 0 and "depth" in res.stderr
    res = cli_in_process("prune", f"teacher.path={teacher_dir}", f"data.files=[{text_files[0]}]")
    assert res.returncode == 2 and "no target shape" in res.stderr


def test_distill_with_prune_prehook(cli_in_process, tmp_path, teacher_dir, text_files):
    cli = cli_in_process
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


def test_prune_to_a_parameter_budget(cli_in_process, tmp_path, teacher_dir, text_files):
    from sapling.models import count_parameters

    cli = cli_in_process

    teacher_params = count_parameters(AutoModelForCausalLM.from_pretrained(teacher_dir))
    budget = int(0.6 * teacher_params)
    out = tmp_path / "budget"
    files = "[" + ",".join(str(p) for p in text_files) + "]"
    res = cli("prune", f"teacher.path={teacher_dir}", f"data.files={files}", "data.seq_len=32",
              f"prune.target.params={budget}", "prune.calibration.samples=8", "prune.calibration.batch_size=4",
              "prune.search.eval_batches=2", "prune.search.max_candidates=4", "logger=none", f"hydra.run.dir={out}")
    assert res.returncode == 0, res.stderr[-3000:]
    model, info = AutoModelForCausalLM.from_pretrained(out / "model", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert abs(count_parameters(model) - budget) <= 0.01 * budget
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    ranked = [r for r in rows if r["event"] == "prune_search"]
    assert 1 < len(ranked) <= 4 and [r["rank"] for r in ranked] == list(range(1, len(ranked) + 1))
    losses = [r["loss_pruned"] for r in ranked]
    assert losses == sorted(losses)
    best = ranked[0]
    assert (model.config.hidden_size, model.config.intermediate_size, model.config.num_hidden_layers) == \
        (best["hidden_size"], best["intermediate_size"], best["num_hidden_layers"])
    assert "Parameter-budget search" in (out / "report.md").read_text()
    assert (out / "prune_search.md").read_text().count("\n") >= len(ranked) + 2


def test_impossible_budget_is_one_line(cli_in_process, teacher_dir, text_files):
    res = cli_in_process("prune", f"teacher.path={teacher_dir}", f"data.files=[{text_files[0]}]", "prune.target.params=10")
    assert res.returncode == 2
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "prune.target.params=10" in lines[0] and "fix:" in lines[0]
    res = cli_in_process("prune", f"teacher.path={teacher_dir}", f"data.files=[{text_files[0]}]", "prune.target.params=1000",
                         "prune.target.hidden_size=32")
    assert res.returncode == 2 and "not both" in res.stderr


def test_gemma2_teacher_pruned_and_distilled_with_its_softcap(cli_in_process, tmp_path, tokenizer, text_files):
    """A family beyond Llama end to end: a tiny Gemma 2 (sandwich norms, scaled embeddings, sliding/global
    layers, final-logit softcap) pruned on every axis by the prune pre-hook, distilled, saved and reloaded."""
    from sapling.models import save_hf_checkpoint, tiny_config

    torch.manual_seed(0)
    cfg = tiny_config("gemma2-tiny", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=3, final_logit_softcapping=5.0)
    teacher = save_hf_checkpoint(AutoModelForCausalLM.from_config(cfg), tokenizer, tmp_path / "teacher")
    out = tmp_path / "kd"
    files = "[" + ",".join(str(p) for p in text_files) + "]"
    res = cli_in_process("distill", f"teacher.path={teacher}", f"data.files={files}", "data.seq_len=32",
                         "hooks.pre=[prune]", "prune.target.num_hidden_layers=2", "prune.target.hidden_size=48",
                         "prune.target.intermediate_size=64", "prune.target.num_key_value_heads=1",
                         "prune.calibration.samples=8", "trainer.max_steps=3", "trainer.micro_batch_size=2",
                         "trainer.log_every=1", "trainer.eval_batches=1", "logger=none", f"hydra.run.dir={out}")
    assert res.returncode == 0, res.stderr[-3000:]
    student, info = AutoModelForCausalLM.from_pretrained(out / "model", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    s = student.config
    assert (s.model_type, s.num_hidden_layers, s.hidden_size, s.intermediate_size) == ("gemma2", 2, 48, 64)
    assert (s.num_key_value_heads, s.num_attention_heads, s.final_logit_softcapping) == (1, 2, 5.0)
    assert len(s.layer_types) == 2 and set(s.layer_types) <= {"sliding_attention", "full_attention"}
    ids = torch.tensor([[5, 6, 7, 8]])
    assert student.generate(ids, max_new_tokens=4, do_sample=False).shape == (1, 8)
    train = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["kd"] >= 0 for r in train if r["event"] == "train")
