"""Iterative pruning: `prune.rounds=R` reaches the target in R prune -> distill rounds in one run."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM

from sapling.config import SaplingConfig
from sapling.data.blocks import PackedBlocks
from sapling.prune.plan import prune_teacher, round_shapes

START = {"num_hidden_layers": 8, "hidden_size": 512, "intermediate_size": 1536, "num_attention_heads": 16,
         "num_key_value_heads": 8}
FINAL = {"num_hidden_layers": 4, "hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4,
         "num_key_value_heads": 4}


@pytest.mark.parametrize("rounds", [1, 2, 3, 5])
def test_round_shapes_move_monotonically_to_the_target(rounds):
    shapes = round_shapes(START, FINAL, rounds, multiple=64)
    assert len(shapes) == rounds and shapes[-1] == FINAL
    prev = START
    for shape in shapes:
        for key in START:
            assert FINAL[key] <= shape[key] <= prev[key], (key, shape)
        assert shape["num_attention_heads"] % shape["num_key_value_heads"] == 0
        for key in ("hidden_size", "intermediate_size"):
            assert shape[key] % 64 == 0 or shape[key] in (START[key], FINAL[key])
        prev = shape
    if rounds == 2:  # halfway: 6 layers, 384 hidden, 1024 intermediate, 6 KV groups x 1.5 -> 2 heads each
        assert shapes[0] == {"num_hidden_layers": 6, "hidden_size": 384, "intermediate_size": 1024,
                             "num_attention_heads": 12, "num_key_value_heads": 6}


def _events(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_distill_in_two_prune_rounds(cli, cli_in_process, tmp_path, teacher_dir, text_files):
    out = tmp_path / "rounds"
    files = "[" + ",".join(str(p) for p in text_files) + "]"
    args = ("distill", f"teacher.path={teacher_dir}", f"data.files={files}", "data.seq_len=32", "hooks.pre=[prune]",
            "prune.target.intermediate_size=32", "prune.target.num_hidden_layers=1", "prune.target.hidden_size=32",
            "prune.calibration.samples=8", "prune.rounds=2", "prune.round_steps=[2]", "trainer.max_steps=5",
            "trainer.micro_batch_size=2", "trainer.log_every=1", "trainer.eval_batches=1", "logger=none",
            f"hydra.run.dir={out}")
    # stopped (SIGUSR1) after the main run's first step, then restarted: the restart resumes that run with
    # the pruned shape from its checkpoint, so neither round is pruned or distilled again (the signalled run
    # has a process of its own; the restart and the rerun below need none)
    res = cli(*args, env={"SAPLING_FAULT_SIGNAL_AT_STEP": "distill:1"})
    assert res.returncode == 3, res.stderr[-3000:]
    res = cli_in_process(*args)
    assert res.returncode == 0, res.stderr[-3000:]
    cfg = AutoModelForCausalLM.from_pretrained(out / "model").config
    assert (cfg.intermediate_size, cfg.num_hidden_layers, cfg.hidden_size) == (32, 1, 32)
    mid = AutoModelForCausalLM.from_pretrained(out / "prune_rounds" / "round1" / "model").config
    assert mid.hidden_size > 32 and mid.intermediate_size > 32  # an intermediate shape
    events = _events(out / "metrics.jsonl")
    prunes = [e for e in events if e["event"] == "prune"]
    assert [e["round"] for e in prunes] == [1, 2] and all(e["val_loss"] > 0 for e in prunes)
    assert prunes[0]["teacher_params"] > prunes[0]["student_params"] > prunes[1]["student_params"]
    (rnd,) = [e for e in events if e["event"] == "prune_round"]
    assert rnd["round"] == 1 and rnd["steps"] == 2
    done = [e for e in events if e["event"] == "done"]
    assert done[-1]["step"] == 3  # 5 steps in all: 2 in round 1, 3 for the last round
    assert [e["step"] for e in _events(out / "prune_rounds" / "round1" / "metrics.jsonl") if e["event"] == "done"] \
        == [2]
    assert (out / "prune_rounds" / "round2" / "prune_scores.pt").exists()  # re-estimated on the distilled model
    assert [e["event"] for e in events].count("prune_resumed") == 1

    # A rerun of the finished run does nothing (it says so).
    res = cli_in_process(*args)
    assert res.returncode == 0 and "already finished" in res.stderr, res.stderr[-3000:]
    assert len(_events(out / "metrics.jsonl")) == len(events)


def test_rounds_need_distillation(cli_in_process, teacher_dir, text_files):
    cli = cli_in_process  # config errors, before any model loads: no process of their own
    res = cli("prune", f"teacher.path={teacher_dir}", f"data.files=[{text_files[0]}]",
              "prune.target.intermediate_size=32", "prune.rounds=2")
    assert res.returncode == 2 and "prune.rounds" in res.stderr and "sapling distill" in res.stderr
    res = cli("distill", f"teacher.path={teacher_dir}", f"data.files=[{text_files[0]}]", "hooks.pre=[prune]",
              "prune.target.intermediate_size=32", "prune.rounds=3", "prune.round_steps=[5]")
    assert res.returncode == 2 and "prune.round_steps" in res.stderr and "needs 2" in res.stderr


def test_a_finished_round_reloads_in_the_dtype_of_a_fresh_one(tmp_path, teacher_dir):
    """A restarted `prune.rounds` run reloads a finished round's model in the teacher's dtype, as the round was
    sliced from it (not float32): the final student is the same as the first run's."""
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.bfloat16)
    cfg = OmegaConf.structured(SaplingConfig)
    cfg.prune.importance, cfg.prune.rounds, cfg.prune.round_steps = "magnitude", 2, [1]
    cfg.prune.target.num_hidden_layers, cfg.prune.target.intermediate_size = 1, 32
    cfg.trainer.max_steps, cfg.trainer.eval_batches, cfg.trainer.progress = 2, 1, False
    blocks = PackedBlocks(np.random.default_rng(0).integers(0, teacher.config.vocab_size, (4, 16)))
    data = SimpleNamespace(train=blocks, val=blocks)
    trained = []

    def distill_fn(student, *, steps, output_dir, desc):  # stands in for the training loop: saves the model
        trained.append(desc)
        student.save_pretrained(output_dir / "model")
        return {"loss": 1.0, "ppl": math.e}

    metrics = SimpleNamespace(log=lambda record: None)
    first = prune_teacher(cfg, teacher, data, torch.device("cpu"), tmp_path, metrics, distill_fn=distill_fn)
    again = prune_teacher(cfg, teacher, data, torch.device("cpu"), tmp_path, metrics, distill_fn=distill_fn)
    assert trained == ["prune round 1/2"]  # the second run reused round 1
    assert first.student.dtype == again.student.dtype == torch.bfloat16
