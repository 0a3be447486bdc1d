"""`sapling eval`: sliding-window perplexity and teacher agreement against direct float64 computations."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from sapling.eval.evaluate import sliding_window_eval, token_stream, windows
from sapling.models import tiny_config


@pytest.mark.parametrize("n,window,stride", [(50, 8, 1), (50, 8, 3), (50, 8, 7), (9, 8, 4), (2, 8, 8), (64, 16, 16)])
def test_windows_score_each_token_once(n, window, stride):
    seen = []
    for begin, end, first in windows(n, window, stride):
        assert end - begin <= window and begin < first <= end
        seen += list(range(first, end))
    assert seen == sorted(set(seen))  # never twice
    if stride < window:
        assert seen == list(range(1, n))  # every token after the first
    else:  # block-wise: each block's first token has no context
        assert seen == [t for t in range(1, n) if t % window]


def _models(seed: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    cfg = tiny_config("llama-tiny", vocab_size=97, hidden_size=32, num_hidden_layers=2)
    torch.manual_seed(seed)
    student = AutoModelForCausalLM.from_config(cfg)
    teacher = AutoModelForCausalLM.from_config(cfg)
    return student.float(), teacher.float()


def _reference(model, teacher, stream: torch.Tensor, window: int, stride: int) -> dict[str, float]:
    """Float64 logits of every window, scored where `windows` says: mean NLL, KL(teacher||model), top-1."""
    m64 = AutoModelForCausalLM.from_config(model.config).double()
    m64.load_state_dict(model.state_dict())
    t64 = AutoModelForCausalLM.from_config(teacher.config).double()
    t64.load_state_dict(teacher.state_dict())
    nll = kl = agree = 0.0
    count = 0
    for begin, end, first in windows(stream.numel(), window, stride):
        ids = stream[begin:end][None]
        with torch.no_grad():
            lp = F.log_softmax(m64(ids).logits[0], -1)
            lt = F.log_softmax(t64(ids).logits[0], -1)
        for pos in range(first, end):  # predicting token `pos` from position pos - 1 of the window
            i = pos - begin - 1
            nll -= lp[i, stream[pos]].item()
            kl += (lt[i].exp() * (lt[i] - lp[i])).sum().item()
            agree += float(lp[i].argmax() == lt[i].argmax())
            count += 1
    return {"loss": nll / count, "kl": kl / count, "top1_agreement": agree / count, "tokens": count}


@pytest.mark.parametrize("window,stride,micro", [(8, 3, 2), (8, 8, 4), (12, 5, 8)])
def test_matches_float64_reference(window, stride, micro):
    torch.manual_seed(window * 100 + stride)
    student, teacher = _models(seed=stride)
    stream = torch.randint(0, 97, (61,))
    got = sliding_window_eval(student, stream, window=window, stride=stride, micro_batch_size=micro, teacher=teacher)
    ref = _reference(student, teacher, stream, window, stride)
    assert got["tokens"] == ref["tokens"]
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    assert got["ppl"] == pytest.approx(math.exp(ref["loss"]), rel=1e-5)
    assert got["kl"] == pytest.approx(ref["kl"], rel=1e-4, abs=1e-7)
    assert got["top1_agreement"] == pytest.approx(ref["top1_agreement"])


def test_stride_one_gives_each_token_its_longest_context():
    """stride=1: token t is predicted from tokens max(0, t-window+1)..t-1, one forward per token."""
    torch.manual_seed(3)
    student, _ = _models(seed=3)
    stream = torch.randint(0, 97, (30,))
    window = 6
    got = sliding_window_eval(student, stream, window=window, stride=1, micro_batch_size=4)
    m64 = AutoModelForCausalLM.from_config(student.config).double()
    m64.load_state_dict(student.state_dict())
    nll = 0.0
    with torch.no_grad():
        for t in range(1, stream.numel()):
            ctx = stream[max(0, t - window + 1): t][None]
            nll -= F.log_softmax(m64(ctx).logits[0, -1], -1)[stream[t]].item()
    assert got["tokens"] == stream.numel() - 1
    assert got["loss"] == pytest.approx(nll / (stream.numel() - 1), rel=1e-5)


def test_token_stream_rejoins_blocks():
    blocks = [torch.arange(i * 4, i * 4 + 4) for i in range(5)]
    assert token_stream(blocks).tolist() == list(range(20))
    assert token_stream(blocks, max_tokens=7).tolist() == list(range(7))


def _report_rows(out: Path) -> list[dict]:
    return [r for r in (json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines())
            if r["event"] == "eval"]


def test_eval_command_on_checkpoint_and_quantized_export(cli_in_process, tmp_path, teacher_dir, corpus_file,
                                                         tokenizer):
    from sapling.data import build_packed_data
    from sapling.quant.apply import load_quantized

    cli = cli_in_process  # the commands in this process: nothing here depends on a process of their own

    common = [f"data.files=[{corpus_file}]", "data.seq_len=32", "eval.window=24", "eval.stride=10",
              "eval.max_tokens=600", "eval.gen_tokens=4", "eval.gen_batch=2", "eval.gen_prompt_len=8", "logger=none"]
    quant = tmp_path / "quant"
    res = cli("quantize", f"model.path={teacher_dir}", "quant.method=rtn", "quant.group_size=32",
              f"data.files=[{corpus_file}]", "data.seq_len=32", "logger=none", f"hydra.run.dir={quant}")
    assert res.returncode == 0, res.stderr[-3000:]

    ev = tmp_path / "eval"
    res = cli("eval", f"model.path={quant / 'model'}", f"teacher.path={teacher_dir}", *common, f"hydra.run.dir={ev}")
    assert res.returncode == 0, res.stderr[-3000:]
    rows = {r["model"]: r for r in _report_rows(ev)}
    assert rows["model"]["quantized"] is True and rows["teacher"]["quantized"] is False
    assert rows["model"]["disk_bytes"] < rows["teacher"]["disk_bytes"]
    assert rows["model"]["gen_tokens"] == 8 and rows["model"]["gen_tokens_per_s"] > 0
    assert 0 < rows["model"]["top1_agreement"] <= 1 and rows["model"]["kl"] > 0

    # Direct computation: the dequantized export and the teacher through plain HF logits, same windows.
    data = build_packed_data([str(corpus_file)], tokenizer, 32, val_fraction=0.0,
                             cache_dir=str(tmp_path / "data_cache"))
    stream = token_stream(data.train, 600)
    ref = _reference(load_quantized(quant / "model"), AutoModelForCausalLM.from_pretrained(teacher_dir), stream, 24, 10)
    assert rows["model"]["tokens"] == ref["tokens"] == 599
    assert rows["model"]["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    # KL here is ~1e-4 nats: float32 logits carry ~1e-7 absolute error per token (the reference is float64)
    assert rows["model"]["kl"] == pytest.approx(ref["kl"], rel=1e-4, abs=2e-6)
    report = (ev / "report.md").read_text()
    for heading in ("## Perplexity", "## Agreement with the teacher", "## Size and speed (cpu)"):
        assert heading in report

    res = cli("eval", f"model.path={teacher_dir}", *common, "eval.stride=25", f"hydra.run.dir={tmp_path / 'bad'}")
    assert res.returncode == 2 and "eval.stride=25" in res.stderr and "between 1 and the window (24)" in res.stderr


def test_harness_tasks_without_the_extra_fail_before_loading(monkeypatch, capsys, tmp_path, teacher_dir,
                                                             corpus_file):
    """Without lm-evaluation-harness (simulated: the extra may be installed here), `eval.tasks` stops the
    command with one line naming the key and the extra, before any model is loaded."""
    import importlib.util

    from sapling.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["eval", f"model.path={teacher_dir}", f"data.files=[{corpus_file}]", "eval.tasks=[arc_easy]",
              "logger=none", f"hydra.run.dir={tmp_path / 'h'}"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "eval.tasks=['arc_easy']" in err and "sapling[eval]" in err
    assert not (tmp_path / "h" / "metrics.jsonl").exists()


def test_greedy_samples_are_the_models_argmax_continuation(tokenizer):
    """`pipeline.sample_prompts`: each answer is exactly the greedy continuation, decoded (raw text without a
    chat template), and as long as asked."""
    from sapling.eval.evaluate import greedy_samples

    cfg = tiny_config("llama-tiny", vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).float()
    prompts = ["def main():", "import os"]
    texts = greedy_samples(model, tokenizer, prompts, 6)
    for prompt, text in zip(prompts, texts):
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        for _ in range(6):
            with torch.no_grad():
                ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
        expected = tokenizer.decode(ids[0, -6:], skip_special_tokens=True).strip()
        assert text == expected
