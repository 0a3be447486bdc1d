"""The training loop: loss goes down under distillation, resume reproduces an uninterrupted run, lr schedule."""

from __future__ import annotations

import json
from importlib.resources import files

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from sapling.config import register_configs
from sapling.data import build_packed_data
from sapling.models import build_model, source_config
from sapling.train.engine import LocalEngine
from sapling.train.loop import fit
from sapling.train.metrics import MetricsLogger, read_metrics
from sapling.train.optim import lr_factor


def _cfg(tmp_path, *overrides: str):
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(files("sapling.conf")), version_base=None):
        cfg = compose(config_name="config", overrides=["command=distill", f"output_dir={tmp_path}",
                                                       f"cache_dir={tmp_path / 'cache'}", "logger=none",
                                                       "trainer.progress=false", *overrides])
    return cfg


@pytest.fixture(scope="module")
def packed(tokenizer, corpus_file, tmp_path_factory):
    return build_packed_data([str(corpus_file)], tokenizer, 32, val_fraction=0.1, seed=0,
                             max_tokens=60_000, cache_dir=str(tmp_path_factory.mktemp("data")))


def _models(cfg, tokenizer, teacher_seed=0):
    tcfg = source_config(cfg.teacher)
    tcfg.vocab_size = len(tokenizer)
    teacher = build_model(cfg.teacher, tcfg, torch.device("cpu"), seed=teacher_seed)
    scfg = source_config(cfg.student, base=tcfg)
    student = build_model(cfg.student, scfg, torch.device("cpu"), seed=1)
    return teacher, student


def test_distillation_reduces_kd_loss(tmp_path, tokenizer, packed):
    cfg = _cfg(tmp_path, "teacher.tiny=llama-tiny", "student.config.hidden_size=32",
               "student.config.num_hidden_layers=1", "trainer.max_steps=30", "trainer.micro_batch_size=4",
               "trainer.log_every=1", "trainer.lr=1e-2", "trainer.warmup_steps=3", "trainer.eval_every=0",
               "trainer.eval_batches=2", "distill.temperature=2.0")
    teacher, student = _models(cfg, tokenizer)
    # Give the teacher a peaked distribution to imitate (a random init is nearly uniform).
    with torch.no_grad():
        teacher.lm_head.weight.mul_(8.0)
    m = MetricsLogger(tmp_path, None)
    fit(cfg, student=student, teacher=teacher, tokenizer=tokenizer, data=packed, output_dir=tmp_path, metrics=m,
        device=torch.device("cpu"))
    m.close()
    kd = [r["kd"] for r in read_metrics(tmp_path / "metrics.jsonl") if r["event"] == "train"]
    assert len(kd) == 30
    assert sum(kd[-5:]) / 5 < 0.7 * sum(kd[:5]) / 5


def test_teacher_is_untouched(tmp_path, tokenizer, packed):
    cfg = _cfg(tmp_path, "teacher.tiny=llama-tiny", "trainer.max_steps=2", "trainer.micro_batch_size=2",
               "trainer.eval_batches=1")
    teacher, student = _models(cfg, tokenizer)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    m = MetricsLogger(tmp_path, None)
    fit(cfg, student=student, teacher=teacher, tokenizer=tokenizer, data=packed, output_dir=tmp_path, metrics=m,
        device=torch.device("cpu"))
    m.close()
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert all(p.grad is None for p in teacher.parameters())


def _run(tmp_path, tokenizer, packed, out, fail_at=None, **kw):
    cfg = _cfg(out, "teacher.tiny=llama-tiny", "student.config.num_hidden_layers=1", "trainer.max_steps=8",
               "trainer.micro_batch_size=2", "trainer.grad_accum=2", "trainer.log_every=1", "trainer.save_every=3",
               "trainer.eval_every=0", "trainer.eval_batches=1", "trainer.lr=2e-3")
    teacher, student = _models(cfg, tokenizer)
    if fail_at is not None:
        original = LocalEngine.step
        calls = {"n": 0}

        def failing(self):
            calls["n"] += 1
            if calls["n"] == fail_at:
                raise KeyboardInterrupt("simulated crash")
            return original(self)

        kw["monkeypatch"].setattr(LocalEngine, "step", failing)
    m = MetricsLogger(out, None)
    try:
        fit(cfg, student=student, teacher=teacher, tokenizer=tokenizer, data=packed, output_dir=out, metrics=m,
            device=torch.device("cpu"))
    finally:
        m.close()
        if fail_at is not None:
            kw["monkeypatch"].undo()
    return student


def test_resume_reproduces_uninterrupted_run(tmp_path, tokenizer, packed, monkeypatch):
    ref_out, cut_out = tmp_path / "ref", tmp_path / "cut"
    ref_student = _run(tmp_path, tokenizer, packed, ref_out)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, tokenizer, packed, cut_out, fail_at=8, monkeypatch=monkeypatch)  # dies in step 8, after ckpt 6
    assert (cut_out / "checkpoints" / "latest").read_text() == "global_step6"
    assert sorted(p.name for p in (cut_out / "checkpoints").glob("global_step*")) == ["global_step3", "global_step6"]
    resumed = _run(tmp_path, tokenizer, packed, cut_out)
    ref = {r["step"]: r["loss"] for r in read_metrics(ref_out / "metrics.jsonl") if r["event"] == "train"}
    recs = read_metrics(cut_out / "metrics.jsonl")
    assert any(r["event"] == "resume" and r["step"] == 6 for r in recs)
    after = {r["step"]: r["loss"] for r in recs[[i for i, r in enumerate(recs) if r["event"] == "resume"][0]:]
             if r["event"] == "train"}
    assert sorted(after) == [7, 8]
    for step, loss in after.items():
        assert loss == ref[step], (step, loss, ref[step])
    for (name, a), (_, b) in zip(ref_student.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


def test_fault_seam_stops_an_in_process_run(tmp_path, tokenizer, packed, monkeypatch):
    """The loop calls `faults.after_step` after every step; a test installs a fault there, no env needed."""
    import signal

    from sapling import faults

    cfg = _cfg(tmp_path, "teacher.tiny=llama-tiny", "student.config.num_hidden_layers=1", "trainer.max_steps=4",
               "trainer.micro_batch_size=2", "trainer.eval_batches=1")
    teacher, student = _models(cfg, tokenizer)
    calls = []

    def after_step(done: int, desc: str) -> None:
        calls.append((done, desc))
        if done == 2:
            signal.raise_signal(signal.SIGUSR1)

    monkeypatch.setattr(faults, "after_step", after_step)
    m = MetricsLogger(tmp_path, None)
    result = fit(cfg, student=student, teacher=teacher, tokenizer=tokenizer, data=packed, output_dir=tmp_path,
                 metrics=m, device=torch.device("cpu"), desc="distill")
    m.close()
    assert calls == [(1, "distill"), (2, "distill")]
    assert result.stopped and result.steps == 2 and result.signal == signal.SIGUSR1
    assert (tmp_path / "checkpoints" / "latest").read_text() == "global_step2"


def test_lr_schedule_shape():
    f = [lr_factor(s, warmup_steps=10, max_steps=100, min_lr_ratio=0.1) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[9:], f[10:]))
    assert f[-1] == pytest.approx(0.1, abs=1e-3)
    assert lr_factor(100, warmup_steps=10, max_steps=100, min_lr_ratio=0.1) == pytest.approx(0.1)


def test_metrics_jsonl_is_one_object_per_line(tmp_path):
    m = MetricsLogger(tmp_path, None)
    m.log({"event": "train", "step": 1, "loss": float("nan")})
    m.log({"event": "eval", "step": 1, "val_loss": 1.5})
    m.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["event"] for x in lines] == ["train", "eval"]


def test_trainer_fused_loss_matches_reference_loss(tmp_path, tokenizer, packed, monkeypatch):
    """A short distillation with the fused loss (the default) gives the reference loss's losses."""
    import sapling.models.kd_head as head_mod
    from sapling.kernels import fused_linear_kd_loss, kd_loss_reference

    assert head_mod.fused_linear_kd_loss is fused_linear_kd_loss
    losses = {}
    for name, fn in (("fused", fused_linear_kd_loss), ("reference", kd_loss_reference)):
        monkeypatch.setattr(head_mod, "fused_linear_kd_loss", fn)
        out = tmp_path / name
        cfg = _cfg(out, "teacher.tiny=llama-tiny", "student.config.num_hidden_layers=1", "trainer.max_steps=5",
                   "trainer.micro_batch_size=2", "trainer.grad_accum=2", "trainer.log_every=1",
                   "trainer.eval_every=0", "trainer.eval_batches=1", "distill.divergence=jsd",
                   "distill.temperature=2.0", "distill.ce_weight=0.3", "distill.chunk_size=16")
        teacher, student = _models(cfg, tokenizer)
        m = MetricsLogger(out, None)
        fit(cfg, student=student, teacher=teacher, tokenizer=tokenizer, data=packed, output_dir=out, metrics=m,
            device=torch.device("cpu"))
        m.close()
        losses[name] = [r["loss"] for r in read_metrics(out / "metrics.jsonl") if r["event"] == "train"]
    assert len(losses["fused"]) == 5
    assert losses["fused"] == pytest.approx(losses["reference"], rel=1e-5)


def test_path_with_shape_overrides_is_refused_unless_they_match(teacher_dir):
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM

    from sapling.models import build_model, source_config

    reference = AutoModelForCausalLM.from_pretrained(teacher_dir)

    def src(init: str = "auto", **config):
        return OmegaConf.create({"path": str(teacher_dir), "tiny": None, "config": config, "init": init,
                                 "dtype": "float32", "attn_implementation": "sdpa"})

    same = src(hidden_size=reference.config.hidden_size, num_hidden_layers=None)  # a preset's matching override
    model = build_model(same, source_config(same), torch.device("cpu"))
    assert torch.equal(model.model.embed_tokens.weight, reference.model.embed_tokens.weight)  # loaded, not random
    other = src(num_hidden_layers=1)
    with pytest.raises(ValueError, match=r"config.num_hidden_layers=1 \(checkpoint: 2\).*init=random"):
        build_model(other, source_config(other), torch.device("cpu"))
    random = src("random", num_hidden_layers=1)
    assert build_model(random, source_config(random), torch.device("cpu")).config.num_hidden_layers == 1
