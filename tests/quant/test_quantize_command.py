"""`sapling quantize` and `sapling distill ... hooks.post=[quantize]` end to end (through `sapling.cli.main`, in
this process: none of the checks here needs a process of its own)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from sapling.quant.apply import cast_parameters
from sapling.quant.export import read_packed
from sapling.quant.numerics import QuantSpec, dequantize, rtn_export

DATA = ["data.seq_len=32", "data.max_tokens=8000", "logger=none", "trainer.progress=false",
        "quant.group_size=32", "quant.calibration.samples=8", "eval.batches=2"]
DISTILL = ["trainer.max_steps=3", "trainer.micro_batch_size=4", "trainer.eval_every=0", "trainer.eval_batches=1",
           "student.config.num_hidden_layers=1", "student.init=random"]


def events(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_quantize_command_writes_an_export_transformers_loads(cli_in_process, tmp_path, teacher_dir, corpus_file):
    cli = cli_in_process
    out = tmp_path / "q"
    res = cli("quantize", f"model.path={teacher_dir}", f"data.files=[{corpus_file}]", *DATA, "quant.method=rtn",
              f"output_dir={out}")
    assert res.returncode == 0, res.stderr[-3000:]
    qcfg = json.loads((out / "model" / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "compressed-tensors" and qcfg["format"] == "pack-quantized"
    report = (out / "report.md").read_text()
    assert "16-bit (bfloat16)" in report and "w4g32 rtn" in report

    # the packed integers are RTN of the source weights, computed here independently of the command
    source = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    spec = QuantSpec(4, 32, torch.bfloat16)
    stored = read_packed(out / "model", 4)
    modules = dict(source.named_modules())
    assert len(stored) == 14
    for name, (q, scale) in stored.items():
        eq, es = rtn_export(modules[name].weight.data, spec)
        assert torch.equal(q, eq) and torch.equal(scale, es)
        modules[name].weight.data = dequantize(eq, es, torch.float32)
    fake = cast_parameters(source, torch.bfloat16)
    served = AutoModelForCausalLM.from_pretrained(out / "model")
    ids = torch.randint(0, source.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(served(ids).logits, fake(ids).logits, rtol=0, atol=0)
    quant = next(e for e in events(out) if e["event"] == "quantize")
    assert quant["bytes"] < quant["bytes_16bit"] and quant["val_quantized"]["ppl"] > 1


def test_config_and_shape_errors_fail_fast(cli_in_process, tmp_path, teacher_dir, corpus_file):
    base = [f"model.path={teacher_dir}", f"data.files=[{corpus_file}]", *DATA]
    res = cli_in_process("quantize", *base, "quant.group_size=48", f"output_dir={tmp_path / 'a'}")
    assert res.returncode != 0
    assert "model.layers.0.self_attn.q_proj has input width 64" in res.stderr
    assert "quant.skip_incompatible=true" in res.stderr
    assert not (tmp_path / "a" / "model").exists()
    res = cli_in_process("quantize", *base, "quant.guided=true", f"output_dir={tmp_path / 'b'}")
    assert res.returncode != 0 and "quant.guided=True" in res.stderr and "teacher.path" in res.stderr
    # with skip_incompatible, group 48 divides none of this model's input widths: nothing left to quantize
    res = cli_in_process("quantize", *base, "quant.group_size=48", "quant.skip_incompatible=true", f"output_dir={tmp_path / 'c'}")
    assert res.returncode != 0 and "no linear layer to quantize" in res.stderr


def test_distill_post_hook_guided_and_quant_aware(cli_in_process, tmp_path, teacher_dir, corpus_file):
    cli = cli_in_process
    common = [f"teacher.path={teacher_dir}", f"data.files=[{corpus_file}]", *DATA, *DISTILL, "hooks.post=[quantize]"]
    guided = tmp_path / "guided"
    res = cli("distill", *common, "quant.guided=true", f"output_dir={guided}")
    assert res.returncode == 0, res.stderr[-3000:]
    q = next(e for e in events(guided) if e["event"] == "quantize")
    assert q["method"] == "gptq" and q["guided"] is True and q["model_dir"] == str(guided / "model-w4a16")
    assert (guided / "model" / "config.json").exists() and (guided / "quantize_report.md").exists()
    AutoModelForCausalLM.from_pretrained(guided / "model-w4a16")

    aware = tmp_path / "aware"
    res = cli("distill", *common, "quant.aware=true", f"output_dir={aware}")
    assert res.returncode == 0, res.stderr[-3000:]
    ev = events(aware)
    assert any(e["event"] == "quant_aware" and e["linears"] == 7 for e in ev)
    q = next(e for e in ev if e["event"] == "quantize")
    assert q["method"] == "rtn"
    # the export holds exactly the integers the trained forward used: RTN of the saved latent weights
    latent = dict(AutoModelForCausalLM.from_pretrained(aware / "model", dtype=torch.float32).named_modules())
    spec = QuantSpec(4, 32, torch.bfloat16)
    stored = read_packed(aware / "model-w4a16", 4)
    assert len(stored) == 7
    for name, (qi, scale) in stored.items():
        eq, es = rtn_export(latent[name].weight.data, spec)
        assert torch.equal(qi, eq) and torch.equal(scale, es)
