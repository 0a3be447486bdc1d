"""The training step never waits on the device between logged steps; a non-finite loss still stops the run
before anything trained on it is saved.

On a GPU every `float(t)`, `t.item()`, `t.tolist()`, `bool(t)`, `int(t)` of a device tensor blocks the host
until the device has caught up. The CPU runs the same code, so counting those calls made by Sapling's own
code shows where a GPU would stall.
"""

from __future__ import annotations

import sys
from importlib.resources import files
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

import sapling
import sapling.train.loop as loop_mod
from sapling.config import register_configs
from sapling.data import build_packed_data
from sapling.models import build_model, source_config
from sapling.train.engine import LocalEngine
from sapling.train.loop import fit
from sapling.train.metrics import MetricsLogger

SYNCS = ("item", "tolist", "__float__", "__int__", "__bool__")
SAPLING = Path(sapling.__file__).resolve().parent
KERNELS = Path(sapling.kernels.__file__).resolve().parent
# Host-side code: data preparation reads CPU tensors, and the CPU-only fast path of the chunk function
# (kernels/chunk_torch.py: `forward_kl_fast_path` is never taken on CUDA) checks its logits on the host.
HOST_SIDE = (SAPLING / "data", KERNELS / "chunk_torch.py")


def _cfg(out: Path, *overrides: str):
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(files("sapling.conf")), version_base=None):
        return compose(config_name="config", overrides=[
            "command=distill", f"output_dir={out}", f"cache_dir={out / 'cache'}", "logger=none",
            "trainer.progress=false", "teacher.tiny=llama-tiny", "student.config.num_hidden_layers=1",
            "trainer.micro_batch_size=2", "trainer.grad_accum=2", "trainer.eval_every=0", "trainer.eval_batches=1",
            *overrides])


@pytest.fixture(scope="module")
def packed(tokenizer, corpus_file, tmp_path_factory):
    return build_packed_data([str(corpus_file)], tokenizer, 32, val_fraction=0.1, seed=0, max_tokens=20_000,
                             cache_dir=str(tmp_path_factory.mktemp("data")))


def _fit(cfg, tokenizer, packed, out: Path):
    tcfg = source_config(cfg.teacher)
    tcfg.vocab_size = len(tokenizer)
    teacher = build_model(cfg.teacher, tcfg, torch.device("cpu"), seed=0)
    student = build_model(cfg.student, source_config(cfg.student, base=tcfg), torch.device("cpu"), seed=1)
    m = MetricsLogger(out, None)
    try:
        return fit(cfg, student=student, teacher=teacher, tokenizer=tokenizer, data=packed, output_dir=out, metrics=m,
                   device=torch.device("cpu"))
    finally:
        m.close()


def _ours(filename: str) -> bool:
    path = Path(filename).resolve()
    inside = [root for root in (SAPLING, KERNELS) if path.is_relative_to(root)]
    return bool(inside) and not any(path.is_relative_to(h) if h.is_dir() else path == h for h in HOST_SIDE)


@pytest.mark.parametrize("features", [0.0, 0.5])
def test_unlogged_steps_read_nothing_back_from_the_device(tmp_path, tokenizer, packed, monkeypatch, features):
    events: list[tuple[str, str]] = []
    for name in SYNCS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            caller = sys._getframe(1)
            if _ours(caller.f_code.co_filename):
                events.append((_name, f"{Path(caller.f_code.co_filename).name}:{caller.f_lineno}"))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    step = LocalEngine.step

    def marked(self):
        events.append(("step", ""))
        return step(self)

    monkeypatch.setattr(LocalEngine, "step", marked)
    cfg = _cfg(tmp_path, "trainer.max_steps=4", "trainer.log_every=4", "distill.ce_weight=0.2",
               f"distill.features.weight={features}", "student.config.hidden_size=32")
    res = _fit(cfg, tokenizer, packed, tmp_path)
    monkeypatch.undo()
    steps = [i for i, e in enumerate(events) if e[0] == "step"]
    assert len(steps) == 4
    # From the end of step 1 to the end of step 3: two whole unlogged steps (4 micro-batches, their loss,
    # kd/ce/feature parts and top-1 counts, the valid-token count, the fused loss's scale, the step).
    between = [e for e in events[steps[0] + 1:steps[2]] if e[0] != "step"]
    assert between == [], between
    # The logged last step reads its numbers back (they are the ones logged).
    assert events[steps[3] + 1:] and res.final_loss > 0


def test_nonfinite_loss_stops_before_any_checkpoint_of_it(tmp_path, tokenizer, packed, monkeypatch):
    calls = {"n": 0}
    loss_on_batch = loop_mod.loss_on_batch

    def poisoned(*args, **kwargs):  # step 2's micro-batches (2 per step) give a NaN loss
        calls["n"] += 1
        loss, parts = loss_on_batch(*args, **kwargs)
        return (loss * float("nan"), parts) if calls["n"] in (3, 4) else (loss, parts)

    monkeypatch.setattr(loop_mod, "loss_on_batch", poisoned)
    cfg = _cfg(tmp_path, "trainer.max_steps=6", "trainer.log_every=5", "trainer.save_every=2")
    with pytest.raises(FloatingPointError, match=r"^loss is nan at step 2; lower trainer.lr or check the data$"):
        _fit(cfg, tokenizer, packed, tmp_path)
    assert not list((tmp_path / "checkpoints").glob("global_step*"))  # step 2 would have been the first
    assert calls["n"] == 4  # found at the first checkpoint, before step 3 trained on NaN weights
