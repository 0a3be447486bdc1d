"""On-policy distillation (issue 21.3): the student samples completions of the chat data's prompts, the teacher
scores them, the loss runs on the completion only; with lambda=1 it trains, and a run is reproducible and
resumes mid-run to the same samples."""

from __future__ import annotations

import json
from importlib.resources import files

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from sapling.config import register_configs
from sapling.data import build_packed_data
from sapling.data.chat import ChatFormat
from sapling.data.demo import stdlib_chat
from sapling.distill.on_policy import draw, generate_batch, prompts_from_batch
from sapling.models import build_model, source_config
from sapling.train.engine import LocalEngine
from sapling.train.loop import fit
from sapling.train.metrics import MetricsLogger, read_metrics

SEQ = 160


@pytest.fixture(scope="module")
def chat_data(tokenizer, chatml_template, tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    path = root / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in stdlib_chat(60)))
    tok = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    tok.chat_template = chatml_template
    return tok, build_packed_data([str(path)], tok, SEQ, format="chat", val_fraction=0.1,
                                  chat=ChatFormat(chat_template=chatml_template), cache_dir=str(root / "cache"))


def _cfg(out, *overrides):
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(files("sapling.conf")), version_base=None):
        return compose(config_name="config", overrides=[
            "command=distill", f"output_dir={out}", f"cache_dir={out / 'cache'}", "logger=none",
            "trainer.progress=false", "teacher.tiny=llama-tiny", "student.config.num_hidden_layers=1",
            f"data.seq_len={SEQ}", "trainer.micro_batch_size=2", "trainer.grad_accum=2", "trainer.log_every=1",
            "trainer.eval_every=0", "trainer.eval_batches=1", "trainer.lr=1e-2", "distill.on_policy.fraction=1.0",
            "distill.on_policy.max_new_tokens=12", "distill.on_policy.divergence=reverse_kl", *overrides])


def _models(cfg, tokenizer):
    tcfg = source_config(cfg.teacher)
    tcfg.vocab_size = len(tokenizer)
    teacher = build_model(cfg.teacher, tcfg, torch.device("cpu"), seed=0)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(8.0)  # a peaked distribution to imitate (a random init is nearly uniform)
    student = build_model(cfg.student, source_config(cfg.student, base=tcfg), torch.device("cpu"), seed=1)
    return teacher, student


def _fit(out, tok, data, *overrides, fail_at=None, monkeypatch=None):
    cfg = _cfg(out, *overrides)
    teacher, student = _models(cfg, tok)
    if fail_at is not None:
        original, calls = LocalEngine.step, {"n": 0}

        def failing(self):
            calls["n"] += 1
            if calls["n"] == fail_at:
                raise KeyboardInterrupt("simulated crash")
            return original(self)

        monkeypatch.setattr(LocalEngine, "step", failing)
    m = MetricsLogger(out, None)
    try:
        fit(cfg, student=student, teacher=teacher, tokenizer=tok, data=data, output_dir=out, metrics=m,
            device=torch.device("cpu"))
    finally:
        m.close()
        if monkeypatch is not None:
            monkeypatch.undo()
    return [r for r in read_metrics(out / "metrics.jsonl") if r["event"] == "train"]


def test_prompts_stop_before_the_last_assistant_turn_and_completions_alone_are_labelled(chat_data):
    tok, data = chat_data
    batch = data.train.batch([0, 1, 2])
    prompts = prompts_from_batch(batch, chat=True)
    for p in prompts:
        text = tok.decode(p)
        assert text.startswith("<|im_start|>user") and text.endswith("Class?<|im_end|>\n<|im_start|>assistant\n")
    model = build_model(_cfg_plain(), _tiny(tok), torch.device("cpu"), seed=0)
    a = generate_batch(model, prompts, seq_len=SEQ, max_new_tokens=8, temperature=1.0, top_p=1.0, seed=5, pad_id=0)
    b = generate_batch(model, prompts, seq_len=SEQ, max_new_tokens=8, temperature=1.0, top_p=1.0, seed=5, pad_id=0)
    c = generate_batch(model, prompts, seq_len=SEQ, max_new_tokens=8, temperature=1.0, top_p=1.0, seed=6, pad_id=0)
    assert torch.equal(a.batch["input_ids"], b.batch["input_ids"])
    assert not torch.equal(a.batch["input_ids"], c.batch["input_ids"])
    for i, p in enumerate(prompts):
        labels = a.batch["labels"][i]
        assert (labels[: p.numel()] == -100).all() and torch.equal(a.batch["input_ids"][i, : p.numel()], p)
        n = int((labels != -100).sum())
        assert 1 <= n <= 8 and (labels[p.numel() + n:] == -100).all()
    assert a.new_tokens == int((a.batch["labels"] != -100).sum())
    assert sum(draw(0, s, 0, 0.5) for s in range(400)) in range(160, 241)  # about half the batches
    assert sum(draw(0, s, 0, 0.1) for s in range(400)) in range(20, 61)


def _cfg_plain():
    from omegaconf import OmegaConf

    return OmegaConf.create({"path": None, "tiny": "llama-tiny", "config": {}, "init": "random", "dtype": "float32",
                             "attn_implementation": "auto", "trust_remote_code": False, "revision": None,
                             "gguf_file": None})


def _tiny(tok):
    from sapling.models import tiny_config

    return tiny_config("llama-tiny", vocab_size=len(tok), hidden_size=64, num_hidden_layers=1)


def test_lambda_one_trains_reproducibly_and_resumes_to_the_same_samples(chat_data, tmp_path, monkeypatch):
    tok, data = chat_data
    ref = _fit(tmp_path / "ref", tok, data, "trainer.max_steps=8", "trainer.save_every=3")
    assert all(r["on_policy_batches"] == 2 and r["gen_tokens"] > 0 and 0 < r["gen_share"] < 1 for r in ref)
    assert sum(r["kd"] for r in ref[-3:]) < sum(r["kd"] for r in ref[:3])  # the teacher's scores are learnt
    assert all(r["loss"] == pytest.approx(r["kd"]) for r in ref)  # no CE on the student's own samples
    again = _fit(tmp_path / "again", tok, data, "trainer.max_steps=8", "trainer.save_every=3")
    assert [r["loss"] for r in again] == [r["loss"] for r in ref]
    with pytest.raises(KeyboardInterrupt):
        _fit(tmp_path / "cut", tok, data, "trainer.max_steps=8", "trainer.save_every=3", fail_at=8,
             monkeypatch=monkeypatch)
    resumed = _fit(tmp_path / "cut", tok, data, "trainer.max_steps=8", "trainer.save_every=3")
    after = {r["step"]: r["loss"] for r in resumed if r["step"] > 6}
    assert after == {r["step"]: r["loss"] for r in ref if r["step"] > 6}


def test_on_policy_with_a_teacher_cache_is_refused(sapling_main, tmp_path):
    (tmp_path / "c").mkdir()
    rc, err = sapling_main("distill", f"teacher.cache={tmp_path / 'c'}", "distill.on_policy.fraction=0.5")
    assert rc == 2 and "distill.on_policy.fraction=0.5" in err
    rc, err = sapling_main("distill", "teacher.tiny=llama-tiny", "distill.on_policy.max_new_tokens=0")
    assert rc == 2 and "distill.on_policy.max_new_tokens=0" in err


def test_sequence_kd_trains_on_teacher_answers_written_once(chat_data, tmp_path):
    from sapling.distill.on_policy import TeacherSamples

    tok, data = chat_data
    recs = _fit(tmp_path / "seq", tok, data, "trainer.max_steps=3", "distill.on_policy.fraction=0",
                "distill.on_policy.teacher_samples=true")
    store = TeacherSamples(tmp_path / "seq" / "teacher_samples")
    assert len(store.samples) == 3 * 2 * 2  # one completion per training block drawn, each generated once
    assert all(1 <= len(t) <= 12 for t in store.samples.values())
    assert all(r["on_policy_batches"] == 0 and r["label_tokens"] <= 4 * 12 for r in recs)
    assert sum(r["gen_tokens"] for r in recs) == sum(len(t) for t in store.samples.values())
    path = store.path
    with open(path, "ab") as f:  # a record cut short by a crash is ignored, the rest kept
        f.write(b"\x07\x00\x00\x00\x00\x00\x00\x00\x05\x00\x00\x00\x01\x00")
    again = TeacherSamples(path.parent)
    assert again.samples.keys() == store.samples.keys()
    assert all(torch.equal(again.get(i), t) for i, t in store.samples.items())
