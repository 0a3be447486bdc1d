"""`sapling pipeline`: the demo recipe end to end at toy scale, and the teacher cache on a second run."""

from __future__ import annotations

import json

import torch

TOY = [
    "pipeline.corpus.max_bytes=300000", "pipeline.corpus.vocab_size=320", "pipeline.teacher_steps=12",
    "teacher.config.hidden_size=64", "teacher.config.intermediate_size=128", "teacher.config.num_hidden_layers=2",
    "teacher.config.num_attention_heads=4", "teacher.config.num_key_value_heads=2",
    "prune.target.hidden_size=32", "prune.target.intermediate_size=64", "prune.target.num_hidden_layers=1",
    "prune.target.num_attention_heads=2", "prune.target.num_key_value_heads=1", "prune.calibration.samples=16",
    "data.seq_len=32", "trainer.max_steps=6", "trainer.micro_batch_size=4", "trainer.log_every=2",
    "trainer.eval_every=3", "trainer.eval_batches=2", "eval.batches=4", "logger=none", "quant.group_size=32",
    "quant.calibration.samples=8",
]


def test_pipeline_end_to_end_and_teacher_cache(cli_in_process, tmp_path):
    cli = cli_in_process  # in this process (a pipeline in a process of its own, stopped and resumed: test_signals.py)
    first = tmp_path / "first"
    res = cli("pipeline", *TOY, f"hydra.run.dir={first}")
    assert res.returncode == 0, res.stderr[-3000:]
    report = (first / "report.md").read_text()
    for row in ("unigram", "| teacher |", "student (pruned, before KD)", "student (pruned + distilled)",
                "student (CE from scratch)"):
        assert row in report, row
    assert "trained now" in report
    # every stage's size and generation speed, and the students' validation curves as a picture
    sizes = {r["model"]: r for r in _events(first, "size")}
    assert set(sizes) == {"teacher", "student (pruned + distilled)", "student (CE from scratch)",
                          "student (w4g32 export)"}
    assert all(r["gen_tokens_per_s"] > 0 for r in sizes.values())
    assert sizes["student (w4g32 export)"]["disk_bytes"] < sizes["student (pruned + distilled)"]["disk_bytes"]
    assert "## Size and speed" in report and "![validation curves](curves.png)" in report
    assert (first / "curves.png").read_bytes().startswith(b"\x89PNG")
    assert (first / "model" / "config.json").exists()
    events = [json.loads(x) for x in (first / "metrics.jsonl").read_text().splitlines()]
    evals = {e["model"]: e for e in events if e["event"] == "eval"}
    assert set(evals) == {"teacher", "student (pruned, before KD)", "student (pruned + distilled)",
                          "student (CE from scratch)", "unigram"}
    pruning = next(e for e in events if e["event"] == "prune")
    assert pruning["student_hidden_size"] == 32 and pruning["student_num_hidden_layers"] == 1
    assert (first / "prune_scores.pt").exists()
    assert all(e["val_ppl"] > 1 for e in evals.values())
    for stage in ("teacher", "distill", "scratch"):
        recs = [json.loads(x) for x in (first / stage / "metrics.jsonl").read_text().splitlines()]
        assert any(r["event"] == "done" for r in recs), stage
    # the demo ends quantized: GPTQ + guided int4 export, its perplexity and size in the report
    quant = next(e for e in events if e["event"] == "quantize")
    assert quant["method"] == "gptq" and quant["guided"] and quant["format"] == "w4g32"
    export = first / "model-w4a16"
    qcfg = json.loads((export / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "compressed-tensors" and qcfg["format"] == "pack-quantized"
    assert 0 < quant["bytes"] < quant["bytes_16bit"]
    q_row = next(line for line in report.splitlines() if "w4g32 gptq + guided" in line and "pruned + distilled" in line)
    assert f"{quant['val_quantized']['ppl']:.2f}" in q_row
    assert "Quantized student" in report and f"{quant['bytes'] / 1e6:.2f}" in report

    second = tmp_path / "second"
    res = cli("pipeline", *TOY, f"hydra.run.dir={second}")
    assert res.returncode == 0, res.stderr[-3000:]
    report2 = (second / "report.md").read_text()
    assert "cached:" in report2
    assert not (second / "teacher").exists()
    # The cached teacher is the same model: same validation perplexity in both reports.
    row = next(line for line in report.splitlines() if line.startswith("| teacher |"))
    assert row in report2


def test_pipeline_with_random_student_shape(cli_in_process, tmp_path):
    """Without the prune pre-hook the student is the teacher's architecture at student.config, random init."""
    out = tmp_path / "random"
    random_student = ["hooks.pre=[]", "student.config.hidden_size=32", "student.config.intermediate_size=64",
                      "student.config.num_hidden_layers=1", "student.config.num_attention_heads=2",
                      "student.config.num_key_value_heads=1", "pipeline.scratch_baseline=false",
                      "pipeline.sample_prompts=['def f(x):']", "pipeline.sample_tokens=3"]
    res = cli_in_process("pipeline", *TOY, *random_student, f"hydra.run.dir={out}")
    assert res.returncode == 0, res.stderr[-3000:]
    report = (out / "report.md").read_text()
    assert "| student (distilled) |" in report and "pruned" not in report and "from scratch" not in report
    samples = report.split("## Samples", 1)[1].split("\n## ", 1)[0]  # each model's answer to each prompt
    assert "**def f(x):**" in samples and "- teacher: `" in samples and "- student (distilled): `" in samples


def _events(run, event: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["event"] == event]


def test_pipeline_distill_stage_runs_the_post_hooks(sapling_main, tmp_path):
    """The distill stage is `sapling distill`'s code path: its hooks.post run there (they were ignored)."""
    out = tmp_path / "hooked"
    code, err = sapling_main("pipeline", *TOY, "hooks.post=[eval]", "pipeline.scratch_baseline=false",
                             "pipeline.quantize=false", "eval.gen_tokens=0", f"hydra.run.dir={out}")
    assert code == 0, err[-3000:]
    assert (out / "distill" / "report.md").exists()  # the eval post-hook's report, in the stage's directory
    hooks = [(r["stage"], r["name"]) for r in _events(out / "distill", "hook")]
    assert hooks == [("pre", "prune"), ("post", "eval")]
    assert (out / "prune_scores.pt").exists() and _events(out, "prune")


def test_pipeline_corrects_a_pretrained_teacher_first(sapling_main, tmp_path, teacher_dir, text_files):
    """pipeline.teacher_correction_steps=N: the teacher.path is fine-tuned with CE on the distillation data
    (`sapling train`'s code path, stage `teacher_correction`) and that corrected teacher is pruned, distilled
    and reported; without a teacher.path it is refused in one line."""
    out = tmp_path / "corrected"
    files = "[" + ",".join(str(p) for p in text_files) + "]"
    args = [f"teacher.path={teacher_dir}", f"data.files={files}", "prune.target.hidden_size=32",
            "prune.target.intermediate_size=64", "prune.target.num_attention_heads=2", "prune.target.num_key_value_heads=1",
            "prune.target.num_hidden_layers=1", "prune.calibration.samples=8", "data.seq_len=32",
            "trainer.max_steps=2", "trainer.micro_batch_size=2", "trainer.eval_batches=1", "eval.batches=2",
            "logger=none", "pipeline.scratch_baseline=false", "pipeline.quantize=false", "eval.gen_tokens=0",
            "pipeline.teacher_correction_steps=3", "pipeline.teacher_correction_lr=1e-3"]
    code, err = sapling_main("pipeline", *args, f"hydra.run.dir={out}")
    assert code == 0, err[-3000:]
    done = _events(out / "teacher_correction", "done")
    assert done and done[0]["step"] == 3
    assert (out / "teacher_correction" / "model" / "config.json").exists()
    report = (out / "report.md").read_text()
    assert "corrected on this data (3 CE steps" in report
    from transformers import AutoModelForCausalLM

    before = AutoModelForCausalLM.from_pretrained(teacher_dir).state_dict()
    after = AutoModelForCausalLM.from_pretrained(out / "teacher_correction" / "model").state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the correction trained the teacher
    curve = [r["loss"] for r in _events(out / "teacher_correction", "train")]
    assert curve and all(c == c for c in curve)

    code, err = sapling_main("pipeline", *args[1:], f"hydra.run.dir={tmp_path / 'refused'}")
    assert code == 2 and "pipeline.teacher_correction_steps=3" in err
