"""Distributed distillation on 2 CPU ranks (gloo) with DeepSpeed ZeRO, against the single-process trainer.

- ZeRO 1, 2 and 3 give the single-process losses and gradient norms on the same global batch (5+ steps,
  gradient accumulation 2, so neither DeepSpeed's rank averaging nor its accumulation scaling may
  double-normalise the loss);
- the consolidated export (`output_dir/model` and `sapling export` of the last checkpoint) gives the
  trained engine's logits;
- a run killed (SIGKILL) in the middle of a checkpoint save resumes from the previous checkpoint and then
  reproduces the uninterrupted run exactly; SIGUSR1 checkpoints at the next step and exits cleanly;
- a 2-rank checkpoint resumes on 1 rank through DeepSpeed's universal checkpoint conversion;
- a mixture-of-experts student (its router load-balancing loss included) under ZeRO-3 matches one process.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sapling.faults import FAULT_SIGNAL_ENV, FAULT_STALL_ENV

WORKER = Path(__file__).with_name("zero_distill_worker.py")
STEPS = 6
# 2 ranks x 2 sequences x 2 accumulation steps = the single process's 2 x 4.
COMMON = ["data.seq_len=32", f"trainer.max_steps={STEPS}", "trainer.micro_batch_size=2", "trainer.log_every=1",
          "trainer.eval_every=0", "trainer.eval_batches=2", "trainer.warmup_steps=2", "trainer.lr=3e-3",
          "distill.ce_weight=0.3", "distill.temperature=2.0", "logger=none", "trainer.progress=false"]
ZERO3 = ["deepspeed=zero3", "deepspeed.param_persistence_threshold=0", "trainer.save_every=3"]


def _env() -> dict:
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
            "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}


def _torchrun(nproc: int, *args: str) -> list[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
            "127.0.0.1", "--master-port", str(port), *args]


def _distill(nproc: int, out: Path, models: dict, *overrides: str) -> list[str]:
    return _torchrun(nproc, "-m", "sapling", "distill", f"teacher.path={models['teacher']}",
                     f"student.path={models['student']}", f"data.files=[{models['data']}]", *COMMON,
                     f"hydra.run.dir={out}", *overrides)


def _check(res: subprocess.CompletedProcess) -> None:
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]


def _records(out: Path, event: str = "train") -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _records(out)}


@pytest.fixture(scope="module")
def models(tmp_path_factory, teacher_dir, tokenizer, text_files) -> dict:
    from transformers import AutoModelForCausalLM

    from sapling.models import save_hf_checkpoint, tiny_config

    torch.manual_seed(1)
    cfg = tiny_config("llama-tiny", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=1)
    student = save_hf_checkpoint(AutoModelForCausalLM.from_config(cfg), tokenizer,
                                 tmp_path_factory.mktemp("student") / "model")
    return {"teacher": teacher_dir, "student": student, "data": text_files[-1]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, models, run_sapling) -> dict:
    """The single-process reference and the three ZeRO stages (one torchrun launch)."""
    root = tmp_path_factory.mktemp("zero")
    ref = root / "single"
    code = run_sapling(root, "distill", f"teacher.path={models['teacher']}", f"student.path={models['student']}",
                       f"data.files=[{models['data']}]", *COMMON, "trainer.grad_accum=4", f"hydra.run.dir={ref}")
    assert code == 0, "the single-process reference run failed (its stderr is in the captured output)"
    res = subprocess.run(_torchrun(2, str(WORKER), str(root), str(models["teacher"]), str(models["student"]),
                                   str(models["data"]), *COMMON, "trainer.grad_accum=2", "trainer.save_every=3",
                                   "trainer.activation_checkpointing=true"),
                         env=_env(), capture_output=True, text=True, timeout=900)
    _check(res)
    return {"root": root, "single": ref, **{s: root / s for s in ("zero1", "zero2", "zero3")}}


@pytest.mark.parametrize("stage", ["zero1", "zero2", "zero3"])
def test_zero_stage_matches_single_process(runs, stage):
    ref, got = _records(runs["single"]), _records(runs[stage])
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    for a, b in zip(ref, got):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), (stage, a["step"])
        assert b["kd"] == pytest.approx(a["kd"], rel=1e-4) and b["ce"] == pytest.approx(a["ce"], rel=1e-4)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), (stage, a["step"])
        assert b["tokens"] == a["tokens"]
    assert ref[-1]["loss"] < ref[0]["loss"]  # the steps did something
    start = _records(runs[stage], "start")[0]
    assert start["student_params"] == _records(runs["single"], "start")[0]["student_params"]


@pytest.mark.parametrize("stage", ["zero1", "zero2", "zero3"])
def test_sharded_validation_matches_single_process(runs, stage):
    # each rank evaluates its share of the validation batches (ZeRO-3: in lockstep) and the sums are reduced
    (ref,), (got,) = _records(runs["single"], "done"), _records(runs[stage], "done")
    assert got["val_loss"] == pytest.approx(ref["val_loss"], rel=1e-4), stage


def test_zero3_export_gives_engine_logits(runs, tmp_path, sapling_main):
    from transformers import AutoModelForCausalLM

    z3 = runs["zero3"]
    probe = torch.load(z3 / "engine_logits.pt")
    ckpt = z3 / "checkpoints"
    assert (ckpt / "latest").read_text() == f"global_step{STEPS}"
    assert (ckpt / f"global_step{STEPS}" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").exists()
    code, err = sapling_main("export", f"checkpoint={ckpt}", f"output={tmp_path / 'exported'}")  # in this process
    assert code == 0, err[-6000:]
    for path in (z3 / "model", tmp_path / "exported"):
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        with torch.no_grad():
            logits = model(input_ids=probe["ids"]).logits
        torch.testing.assert_close(logits, probe["logits"], rtol=1e-5, atol=1e-5, msg=str(path))
    assert (tmp_path / "exported" / "tokenizer.json").exists()


def test_kill_mid_save_then_signal_then_resume_on_one_rank(runs, models, tmp_path):
    out = tmp_path / "run"
    ckpt = out / "checkpoints"
    ac = "trainer.activation_checkpointing=true"
    # 1. killed (SIGKILL, all processes) while saving step 4: step 2's checkpoint stays the one to resume.
    proc = subprocess.Popen(_distill(2, out, models, *ZERO3, "trainer.grad_accum=2", "trainer.save_every=2", ac),
                            env={**_env(), FAULT_STALL_ENV: "4"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 600
    markers = [ckpt / ".stalled-4-rank0", ckpt / ".stalled-4-rank1"]
    while not all(m.exists() for m in markers):
        assert proc.poll() is None and time.monotonic() < deadline, "the run never reached the stalled save"
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (ckpt / "latest").read_text() == "global_step2"
    assert (ckpt / ".tmp-global_step4").is_dir() and not (ckpt / "global_step4").exists()

    # 2. resumed from step 2; SIGUSR1 after step 5 -> checkpoint at step 5, rank 0 exits 3 (stopped,
    #    resumable), which torchrun reports as a failed worker (exit 1).
    res = subprocess.run(_distill(2, out, models, *ZERO3, "trainer.grad_accum=2", "trainer.save_every=2", ac),
                         env={**_env(), FAULT_SIGNAL_ENV: "5"}, capture_output=True, text=True, timeout=900)
    assert res.returncode != 0, res.stderr[-6000:]
    assert "stopped by a signal after step 5" in res.stderr
    assert (ckpt / "latest").read_text() == "global_step5"
    assert not (ckpt / ".tmp-global_step4").exists()
    assert sorted(p.name for p in ckpt.glob("global_step*")) == ["global_step4", "global_step5"]  # keep_last=2
    reference = _losses(runs["zero3"])
    resumed = _losses(out)  # both launches' records; the resumed launch's steps 3-5 come last
    for step in (3, 4, 5):
        assert resumed[step] == reference[step], (step, resumed[step], reference[step])  # exact (fp32, CPU)
    stop = _records(out, "stopped")
    assert [r["step"] for r in stop] == [5] and stop[0]["signal"] == "SIGUSR1"
    assert not (out / "model").exists()

    # 3. the 2-rank checkpoint resumes on 1 rank (universal checkpoint), same global batch (1 x 2 x 4).
    res = subprocess.run(_distill(1, out, models, *ZERO3, "trainer.grad_accum=4", ac), env=_env(),
                         capture_output=True, text=True, timeout=900)
    _check(res)
    resume = _records(out, "resume")[-1]
    assert (resume["step"], resume["from_world_size"], resume["world_size"], resume["universal"]) == (5, 2, 1, True)
    last = _records(out)[-1]
    assert last["step"] == STEPS
    assert last["loss"] == pytest.approx(reference[STEPS], rel=1e-4)
    assert (out / "model" / "config.json").exists()


MOE_STEPS = 4


# A mixture-of-experts teacher (Qwen3-MoE) pruned by the prune pre-hook to 3 of 4 experts and a narrower expert
# FFN (calibration split over the ranks, scores all-reduced, a ZeRO-3 teacher read layer by layer) and distilled
# with ZeRO-3 gives the single-process pruning, losses, router load-balancing loss and gradient norms (issue 20.3).


@pytest.fixture(scope="module")
def moe_teacher(tmp_path_factory, tokenizer) -> Path:
    from transformers import AutoModelForCausalLM

    from sapling.models import save_hf_checkpoint, tiny_config

    torch.manual_seed(0)
    cfg = tiny_config("qwen3-moe-tiny", vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                      moe_intermediate_size=16)
    return save_hf_checkpoint(AutoModelForCausalLM.from_config(cfg), tokenizer,
                              tmp_path_factory.mktemp("moe") / "teacher")


def _one_process_and_zero3(tmp_path: Path, run_sapling, args: list[str]) -> tuple[Path, Path]:
    """`sapling distill *args` in one process (4 micro-batches a step) and on 2 ZeRO-3 ranks (2 each)."""
    single = tmp_path / "single"
    assert run_sapling(tmp_path, "distill", *args, "trainer.grad_accum=4", f"hydra.run.dir={single}") == 0
    zero3 = tmp_path / "zero3"
    res = subprocess.run(_torchrun(2, "-m", "sapling", "distill", *args, "trainer.grad_accum=2", "deepspeed=zero3",
                                   "deepspeed.param_persistence_threshold=0", f"hydra.run.dir={zero3}"),
                         env=_env(), capture_output=True, text=True, timeout=900)
    _check(res)
    return single, zero3


def test_moe_prune_and_zero3_distillation_match_one_process(moe_teacher, text_files, tmp_path, run_sapling):
    args = [f"teacher.path={moe_teacher}", f"data.files=[{text_files[-1]}]", *COMMON, f"trainer.max_steps={MOE_STEPS}",
            "distill.router_aux_weight=0.05", "hooks.pre=[prune]", "prune.target.num_experts=3",
            "prune.target.moe_intermediate_size=8", "prune.calibration.samples=8", "prune.calibration.batch_size=2"]
    single, zero3 = _one_process_and_zero3(tmp_path, run_sapling, args)
    (p1,), (p2,) = _records(single, "prune"), _records(zero3, "prune")
    assert p2["student_params"] == p1["student_params"] and p2["calibration_tokens"] == p1["calibration_tokens"]
    assert p2["val_loss"] == pytest.approx(p1["val_loss"], rel=1e-5)
    ref, got = _records(single), _records(zero3)
    assert [r["step"] for r in got] == list(range(1, MOE_STEPS + 1))
    for a, b in zip(ref, got):
        for key in ("loss", "kd", "ce", "router_aux", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), (key, a["step"], a[key], b[key])
    assert ref[0]["router_aux"] > 0 and ref[-1]["loss"] < ref[0]["loss"]
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(zero3 / "model")
    assert (student.config.num_experts, student.config.moe_intermediate_size) == (3, 8)


def test_on_policy_distillation_under_zero3_matches_one_process(models, tmp_path, run_sapling, chatml_template):
    """lambda = 1 on chat data: both ranks generate together (synced), and the samples, losses and gradient
    norms are one process's with the same global batch."""
    from sapling.data.demo import stdlib_chat

    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps(r) + "\n" for r in stdlib_chat(40)))
    template = tmp_path / "chatml.jinja"
    template.write_text(chatml_template)
    args = [f"teacher.path={models['teacher']}", f"student.path={models['student']}", f"data.files=[{chat}]",
            "data.format=chat", f"data.chat_template={template}", *COMMON, "data.seq_len=160", "trainer.max_steps=3",
            "distill.on_policy.fraction=1.0", "distill.on_policy.max_new_tokens=8", "distill.ce_weight=0.0"]
    single, zero3 = _one_process_and_zero3(tmp_path, run_sapling, args)
    ref, got = _records(single), _records(zero3)
    assert [r["step"] for r in got] == [1, 2, 3] and all(r["on_policy_batches"] == 2 for r in got)
    for a, b in zip(ref, got, strict=True):
        assert b["label_tokens"] == a["label_tokens"]  # the same completions, all ranks counted
        for key in ("loss", "kd", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), (key, a["step"], a[key], b[key])
