"""The training loop: distillation from a frozen teacher, or plain LM training when there is none.

Readable top to bottom: build the engine and loader, resume if a checkpoint exists, then per step
fetch `grad_accum` micro-batches, normalise the loss over all their valid tokens (on all ranks), backward
each, step once; log, validate and checkpoint on their schedules; save an HF checkpoint at the end.

The same loop runs in one process (`deepspeed=none`, LocalEngine) and on N ranks under DeepSpeed ZeRO
(`torchrun --nproc-per-node N -m sapling distill deepspeed=zero3 ...`): each rank reads its share of
every global batch, the loss is a mean over the valid tokens of the whole global batch, and rank 0 alone
writes metrics, the progress bar and the final HF export. SIGTERM or SIGUSR1 (Slurm preemption) makes
every rank stop at the next step boundary, after a checkpoint.
"""

from __future__ import annotations

import math
import os
import resource
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from sapling.data import PackedData, ResumableLoader
from sapling.dist import any_across_ranks, barrier, rank_world, sum_across_ranks
from sapling.distill.features import FeatureDistiller, StudentWithFeatures, student_weights
from sapling.distill.step import count_valid, loss_on_batch
from sapling.eval.perplexity import evaluate_lm
from sapling.models import save_hf_checkpoint
from sapling.train.checkpoint import latest_tag, load_checkpoint, needs_universal, read_state, save_checkpoint
from sapling.train.engine import build_engine, prepare_teacher
from sapling.train.flops import distill_step_flops, kd_head_flops_per_row, peak_flops
from sapling.train.metrics import MetricsLogger

# USR1: Slurm's --signal (launchers/slurm.sbatch); USR2: submitit's; TERM: preemption and scancel.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
# Test-only fault injection: rank 0 sends itself SIGUSR1 after this optimizer step.
FAULT_SIGNAL_ENV = "SAPLING_FAULT_SIGNAL_AT_STEP"


@dataclass
class TrainResult:
    steps: int
    tokens: int
    wall_s: float
    final_val: dict[str, float] = field(default_factory=dict)
    model_dir: Path | None = None
    final_loss: float = float("nan")  # the last step's training loss (the whole global batch's, on every rank)
    stopped: bool = False  # stopped early by a STOP_SIGNALS signal after a checkpoint; rerun to resume
    signal: int | None = None  # the signal that stopped it (None: another rank's)
    model: torch.nn.Module | None = None  # the trained student (under ZeRO-3 still partitioned: call on all ranks)


class StopRequest:
    """Records SIGTERM/SIGUSR1/SIGUSR2 instead of dying, so the loop can checkpoint and exit at a step boundary."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _step_flops(cfg: Any, model: torch.nn.Module, teacher: torch.nn.Module | None, seq_len: int,
                world: int) -> tuple[float, float]:
    """(student FLOPs, whole-step FLOPs incl. the teacher) of one optimizer step on all ranks (model FLOPs)."""
    t = cfg.trainer
    teacher_config = None if teacher is None else getattr(teacher, "module", teacher).config
    f = distill_step_flops(model.config, teacher_config, batch_size=t.micro_batch_size, seq_len=seq_len)
    micro = t.grad_accum * world
    v = model.config.vocab_size
    student_head = (f.head / kd_head_flops_per_row(model.config, teacher_config)) * 6 * model.config.hidden_size * v
    return (f.student + student_head) * micro, f.total * micro


def _speed_record(step_flops: tuple[float, float], steps_per_s: float, world: int, peak: float | None,
                  device: torch.device) -> dict[str, float]:
    """Achieved TFLOP/s per device, MFU (student alone and whole step) when the peak is known, peak memory."""
    per_device = [f * steps_per_s / world for f in step_flops]
    out = {"tflops_per_device": per_device[1] / 1e12}
    if peak:
        out["mfu_student"], out["mfu_step"] = per_device[0] / peak, per_device[1] / peak
    if device.type == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    return out


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each decoder layer's activations in backward instead of keeping them (HF's own mechanism)."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def fit(
    cfg: Any,
    *,
    student: torch.nn.Module,
    teacher: torch.nn.Module | None,
    tokenizer: Any,
    data: PackedData,
    output_dir: str | Path,
    metrics: MetricsLogger,
    device: torch.device,
    desc: str = "train",
    save_model: bool = True,
) -> TrainResult:
    """Train `student` for `cfg.trainer.max_steps` optimizer steps (KD when `teacher` is given, else CE).

    With `cfg.deepspeed` set, every rank calls this (after `init_distributed`), the student becomes a ZeRO
    engine and the teacher a DeepSpeed engine without optimizer. `save_model=False` skips the final HF
    checkpoint (short throwaway runs, e.g. ranking prune candidates).
    """
    t = cfg.trainer
    rank, world = rank_world()
    main = rank == 0
    output_dir = Path(output_dir)
    ckpt_root = output_dir / "checkpoints"
    torch.manual_seed(t.seed)

    if teacher is not None:
        teacher = prepare_teacher(teacher, cfg, world)
    student.train()
    if t.activation_checkpointing:
        enable_activation_checkpointing(student)

    resume_dir = latest_tag(ckpt_root) if t.resume else None
    state = read_state(resume_dir) if resume_dir is not None else None
    if state is not None and state.get("data_fingerprint", data.fingerprint) != data.fingerprint:
        raise ValueError(f"{ckpt_root} was written for other data (fingerprint {state['data_fingerprint'][:12]}, "
                         f"now {data.fingerprint[:12]}); use a new output_dir or trainer.resume=false")
    kind = "local" if cfg.deepspeed.name == "none" else "deepspeed"
    universal = state is not None and needs_universal(state, kind, int(cfg.deepspeed.stage))
    features = None
    if teacher is not None and cfg.distill.features.weight > 0:
        teacher_config = getattr(teacher, "module", teacher).config
        features = FeatureDistiller.from_config(cfg.distill.features, student.config, teacher_config, seed=t.seed)
    trained = StudentWithFeatures(student, features) if features is not None else student
    engine = build_engine(trained, cfg, world, load_universal=universal)
    # `model` is the HF student (validated and exported); the projections live beside it in the engine
    model, features = (engine.module.model, engine.module.features) if features is not None else (engine.module, None)
    cached_teacher = getattr(data.train, "has_teacher", False)  # a teacher cache: top-k comes with the batches
    loader = ResumableLoader(data.train, t.micro_batch_size, rank=rank, world_size=world, seed=t.seed)
    tokens_per_step = t.micro_batch_size * t.grad_accum * data.train[0].numel() * world

    start_step, tokens_seen = 0, 0
    if state is not None:
        load_checkpoint(resume_dir, engine, universal=universal)
        loader.load_state_dict(state["loader"])
        start_step, tokens_seen = state["step"], state["tokens"]
        metrics.log({"event": "resume", "step": start_step, "tokens": tokens_seen, "from_world_size":
                     state.get("world_size", 1), "world_size": world, "universal": universal})

    def validate(step: int) -> dict[str, float]:
        # Every rank evaluates the same batches: under ZeRO-3 all ranks take part in each forward.
        val = evaluate_lm(model, data.val, micro_batch_size=t.micro_batch_size, max_batches=t.eval_batches,
                          device=device)
        # Cumulative model FLOPs so far: the student's training (6N per token + attention + head) and the
        # whole step's, which adds the online teacher's forward (a cached teacher's pass is not counted).
        metrics.log({"event": "eval", "step": step, "tokens": tokens_seen, "val_loss": val["loss"],
                     "val_ppl": val["ppl"], "student_flops": step * step_flops[0], "flops": step * step_flops[1]})
        return val

    def checkpoint(step: int) -> None:
        client = {"tokens": tokens_seen, "loader": loader.state_dict(), "data_fingerprint": data.fingerprint,
                  "wandb_run_id": getattr(metrics, "run_id", None)}
        save_checkpoint(ckpt_root, step, engine, client, t.keep_last, model=model, tokenizer=tokenizer)
        metrics.log({"event": "checkpoint", "step": step, "tokens": tokens_seen})

    step_flops = _step_flops(cfg, model, teacher, data.train[0].numel(), world)
    peak = peak_flops(device, next(model.parameters()).dtype, t.peak_flops)

    batches = iter(loader)
    bar = tqdm(total=t.max_steps, initial=start_step, desc=desc, disable=not (t.progress and main),
               dynamic_ncols=True, mininterval=1.0 if sys.stderr.isatty() else 30.0)
    fault_step = int(os.environ.get(FAULT_SIGNAL_ENV, "0") or 0)
    t0, window_t0, window_tokens = time.perf_counter(), time.perf_counter(), 0
    last_val: dict[str, float] = {}
    done, stopped, step_loss = start_step, False, float("nan")
    with StopRequest() as stop:
        for step in range(start_step, t.max_steps):
            micro = [{k: v.to(device) for k, v in next(batches).items()} for _ in range(t.grad_accum)]
            if cached_teacher:  # packed top-k records were copied; decode them on the device
                micro = [data.train.decode(mb) for mb in micro]
            valid = [count_valid(mb["labels"]) for mb in micro]
            num_valid = int(sum_across_ranks([sum(valid)], device)[0])  # the whole global batch's valid tokens
            step_loss, step_kd, step_ce, step_feat, step_top1 = 0.0, 0.0, 0.0, 0.0, 0.0
            for mb in micro:
                loss, parts = loss_on_batch(model, teacher, mb, cfg.distill, num_valid_tokens=num_valid,
                                            features=features)
                engine.backward(loss)
                step_loss += float(loss.detach())  # each part is already normalised by num_valid
                step_kd += parts["kd"]
                step_ce += parts["ce"]
                step_feat += parts.get("feat", 0.0)
                step_top1 += parts.get("top1_agree", 0.0)
            step_loss, step_kd, step_ce, step_feat, step_top1 = sum_across_ranks(
                [step_loss, step_kd, step_ce, step_feat, step_top1], device)
            if not math.isfinite(step_loss):
                raise FloatingPointError(f"loss is {step_loss} at step {step + 1}; lower trainer.lr or check the data")
            lr = engine.lr
            grad_norm = engine.step()
            tokens_seen += tokens_per_step
            window_tokens += tokens_per_step
            done = step + 1
            if main and fault_step == done:
                os.kill(os.getpid(), signal.SIGUSR1)

            if done % t.log_every == 0 or done == t.max_steps:
                now = time.perf_counter()
                tok_s = window_tokens / max(1e-9, now - window_t0)
                record = {"event": "train", "step": done, "tokens": tokens_seen, "loss": step_loss, "kd": step_kd,
                          "ce": step_ce, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tok_s}
                if features is not None:
                    record["feat"] = step_feat
                if (teacher is not None or cached_teacher) and cfg.distill.kd_weight > 0:
                    record["top1_agreement"] = step_top1 / max(num_valid, 1)  # of this step's valid tokens
                record.update(_speed_record(step_flops, tok_s / tokens_per_step, world, peak, device))
                metrics.log(record)
                window_t0, window_tokens = now, 0
                bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{tok_s:,.0f}", refresh=False)
            if t.eval_every and done % t.eval_every == 0 and done != t.max_steps:
                last_val = validate(done)
                bar.set_postfix(loss=f"{step_loss:.3f}", val=f"{last_val['loss']:.3f}", refresh=False)
            # With checkpointing on, the last step is saved too (`sapling export` of the final state).
            saved = bool(t.save_every) and (done % t.save_every == 0 or done == t.max_steps)
            if saved:
                checkpoint(done)
            bar.update(1)
            if done != t.max_steps and any_across_ranks(stop.signum is not None, device):
                if not saved:
                    checkpoint(done)
                stopped = True
                metrics.log({"event": "stopped", "step": done, "tokens": tokens_seen,
                             "signal": signal.Signals(stop.signum).name if stop.signum else "peer"})
                break
    bar.close()

    if stopped:
        return TrainResult(steps=done, tokens=tokens_seen, wall_s=time.perf_counter() - t0, final_loss=step_loss,
                           stopped=True, signal=stop.signum, model=model)
    last_val = validate(t.max_steps)
    model_dir = None
    if save_model:
        model_dir = output_dir / "model"
        if engine.kind == "local":
            save_hf_checkpoint(model, tokenizer, model_dir)
        else:
            weights = student_weights(engine.full_state_dict())  # collective; rank 0 gets the weights
            if main:
                save_hf_checkpoint(model, tokenizer, model_dir, state_dict=weights)
            barrier()
    wall = time.perf_counter() - t0
    metrics.log({"event": "done", "step": t.max_steps, "tokens": tokens_seen, "wall_s": wall,
                 "val_loss": last_val["loss"], "val_ppl": last_val["ppl"], "student_flops": t.max_steps * step_flops[0],
                 "flops": t.max_steps * step_flops[1]})
    return TrainResult(steps=t.max_steps, tokens=tokens_seen, wall_s=wall, final_val=last_val, model_dir=model_dir,
                       final_loss=step_loss, model=model)
