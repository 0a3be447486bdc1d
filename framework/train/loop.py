"""The training loop: distillation from a frozen teacher, or plain LM training when there is none.

Readable top to bottom: build the engine and loader, resume if a checkpoint exists, then per step
fetch `grad_accum` micro-batches, normalise the loss over all their valid tokens (on all ranks), backward
each, step once; log, validate and checkpoint on their schedules; save an HF checkpoint at the end.

The same loop runs in one process (`deepspeed=none`, LocalEngine) and on N ranks under DeepSpeed ZeRO
(`torchrun --nproc-per-node N -m sapling distill deepspeed=zero3 ...`): each rank reads its share of
every global batch, the loss is a mean over the valid tokens of the whole global batch, and rank 0 alone
writes metrics, the progress bar and the final HF export. SIGTERM, SIGUSR1/2 (Slurm, submitit preemption)
or Ctrl-C makes every rank stop at the next step boundary (the last one too), after a checkpoint; see
`StopRequest`.
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

from sapling import faults
from sapling.data import PackedData, ResumableLoader
from sapling.data.mixture import MixtureOrder, mix_sources
from sapling.dist import all_reduce_sum, any_across_ranks, barrier, rank_world
from sapling.distill.features import FeatureDistiller, StudentWithFeatures, student_weights
from sapling.distill.on_policy import GenerationWindow, OnPolicy
from sapling.distill.router import router_aux_weight
from sapling.distill.step import count_valid, loss_on_batch
from sapling.errors import CheckpointError
from sapling.eval.perplexity import evaluate_lm
from sapling.models import save_hf_checkpoint
from sapling.train.checkpoint import latest_tag, load_checkpoint, needs_universal, read_state, save_checkpoint
from sapling.train.engine import build_engine, prepare_teacher
from sapling.train.flops import distill_step_flops, kd_head_flops_per_row, peak_flops
from sapling.train.metrics import MetricsLogger

# What a step sums over its micro-batches (and ranks): loss_on_batch's parts and the loss.
STEP_STATS = ("loss", "kd", "ce", "feat", "top1_agree", "aux")
# USR1: Slurm's --signal (launchers/slurm.sbatch); USR2: submitit's; TERM: preemption and scancel; INT: Ctrl-C.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)


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
    already_finished: bool = False  # a rerun of a run that had finished at max_steps: nothing was trained


class StopRequest:
    """Sapling's one signal policy: a stop signal (STOP_SIGNALS) asks for a stop at the next safe point.

    The handler only records the signal; the code inside the `with` block polls `signum` at its safe points
    (the loop after each optimizer step: checkpoint, then return `stopped`; the pipeline between stages) and
    the CLI exits with EXIT_STOPPED (3). One line on stderr says so. A second Ctrl-C raises
    KeyboardInterrupt at once (the CLI exits 130 without a checkpoint). Nested requests share one state:
    an inner one (the loop's inside the pipeline's) starts with the outer's pending signal and hands its own
    back on exit, so a signal is never lost between stages.
    """

    def __init__(self, pause: str = "step") -> None:
        self.signum: int | None = None
        self.interrupts = 0  # Ctrl-Cs seen: the second one aborts
        self.pause = pause  # what finishes before the stop, for the one line printed
        self._previous: dict[int, Any] = {}
        self._outer: StopRequest | None = None

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
            outer = getattr(self._previous[signal.SIGINT], "__self__", None)
            if isinstance(outer, StopRequest):
                self._outer = outer
                self.signum, self.interrupts = outer.signum, outer.interrupts
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        if signum == signal.SIGINT:
            self.interrupts += 1
            if self.interrupts > 1:
                raise KeyboardInterrupt
        first = self.signum is None
        self.signum = self.signum or signum
        if rank_world()[0] == 0 and (first or signum == signal.SIGINT):
            again = "; Ctrl-C again to abort" if signum == signal.SIGINT else ""
            lead = "\n" if sys.stderr.isatty() else ""  # off the progress bar's line
            # os.write, not print: the handler may interrupt a write to sys.stderr (the progress bar).
            os.write(2, f"{lead}sapling: {signal.Signals(signum).name}: stopping after this {self.pause}{again}\n".encode())

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self._outer is not None:
            self._outer.signum = self._outer.signum or self.signum
            self._outer.interrupts = max(self._outer.interrupts, self.interrupts)


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
    hidden_index: torch.Tensor | None = None,
) -> TrainResult:
    """Train `student` for `cfg.trainer.max_steps` optimizer steps (KD when `teacher` is given, else CE).

    With `cfg.deepspeed` set, every rank calls this (after `init_distributed`), the student becomes a ZeRO
    engine and the teacher a DeepSpeed engine without optimizer. `save_model=False` skips the final HF
    checkpoint (short throwaway runs, e.g. ranking prune candidates). `hidden_index`: the teacher channel
    each student hidden channel was sliced from (a width-pruned student), where feature projections start.
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
        raise CheckpointError(f"{resume_dir} was written for other data (fingerprint {state['data_fingerprint'][:12]}, "
                              f"now {data.fingerprint[:12]}); fix: resume with the data.* settings it was written "
                              "with, or train on the new data in a new output_dir (or with trainer.overwrite=true, which moves this run aside)")
    kind = "local" if cfg.deepspeed.name == "none" else "deepspeed"
    universal = state is not None and needs_universal(state, kind, int(cfg.deepspeed.stage))
    features = None
    if teacher is not None and cfg.distill.features.weight > 0:
        teacher_config = getattr(teacher, "module", teacher).config
        like = next(student.parameters())  # the projection is made beside the student
        features = FeatureDistiller.from_config(cfg.distill.features, student.config, teacher_config, seed=t.seed,
                                                hidden_index=hidden_index, device=like.device, dtype=like.dtype)
    trained = StudentWithFeatures(student, features) if features is not None else student
    engine = build_engine(trained, cfg, world, load_universal=universal, device=device)
    # `model` is the HF student (validated and exported); the projections live beside it in the engine
    model, features = (engine.module.model, engine.module.features) if features is not None else (engine.module, None)
    cached_teacher = getattr(data.train, "has_teacher", False)  # a teacher cache: top-k comes with the batches
    router_aux = router_aux_weight(model, cfg.distill) > 0  # an MoE student's load-balancing loss is logged
    sources = mix_sources(data.meta)  # a data mixture: sampled by weight, counted and validated per source
    mixture = MixtureOrder([b - a for a, b in (m.train for m in sources)], [m.weight for m in sources],
                           seed=t.seed) if sources else None
    loader = ResumableLoader(data.train, t.micro_batch_size, rank=rank, world_size=world, seed=t.seed,
                             mixture=mixture)
    on_policy = OnPolicy.from_config(cfg, model, tokenizer, data, synced=engine.kind == "deepspeed" and world > 1
                                     and int(cfg.deepspeed.stage) == 3, rank=rank, world=world, teacher=teacher,
                                     output_dir=output_dir) if teacher is not None else None
    gen_window = GenerationWindow()
    tokens_per_step = t.micro_batch_size * t.grad_accum * data.train[0].numel() * world

    start_step, tokens_seen = 0, 0
    if state is not None:
        load_checkpoint(resume_dir, engine, universal=universal)
        loader.load_state_dict(state["loader"])
        start_step, tokens_seen = state["step"], state["tokens"]
        if main:
            print(f"sapling: resuming from step {start_step} of {t.max_steps} ({resume_dir})", file=sys.stderr)
        metrics.log({"event": "resume", "step": start_step, "tokens": tokens_seen, "from_world_size":
                     state.get("world_size", 1), "world_size": world, "universal": universal})

    # [step, loss] of the first step whose loss was not finite (step 0: none), kept on the device so that no
    # step waits for it; read (one small sync) wherever state leaves the loop: a logged or validated step,
    # a checkpoint, the end. So a NaN stops the run before anything trained on it is validated or saved.
    nonfinite = torch.zeros(2, dtype=torch.float64, device=device)
    zero = torch.zeros((), dtype=torch.float64, device=device)

    def check_finite(read: list[float] | None = None) -> None:
        bad_step, bad_loss = nonfinite.tolist() if read is None else read
        if bad_step:
            raise FloatingPointError(f"loss is {bad_loss} at step {int(bad_step)}; lower trainer.lr or check the data")

    def validate(step: int) -> dict[str, float]:
        check_finite()
        # Each rank evaluates its share of the batches (the sums are all-reduced); under ZeRO-3 every rank
        # takes part in each forward, so all ranks run as many forwards (lockstep).
        lockstep = engine.kind == "deepspeed" and int(cfg.deepspeed.stage) == 3
        parts = [(m.name, data.val[m.val[0]:m.val[1]]) for m in sources if m.val[1] > m.val[0]] or [("", data.val)]
        per_source = {}
        for name, blocks in parts:  # each source's share of the budget
            per_source[name] = evaluate_lm(
                model, blocks, micro_batch_size=t.micro_batch_size, max_batches=t.eval_batches,
                max_tokens=None if t.eval_tokens is None else max(1, t.eval_tokens // len(parts)), device=device,
                progress=t.progress, desc=f"validation {name}".strip(), shard=True, lockstep=lockstep)
        tokens = sum(v["tokens"] for v in per_source.values())
        loss = sum(v["loss"] * v["tokens"] for v in per_source.values()) / max(1, tokens)
        val = {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": tokens}
        # Cumulative model FLOPs so far: the student's training (6N per token + attention + head) and the
        # whole step's, which adds the online teacher's forward (a cached teacher's pass is not counted).
        metrics.log({"event": "eval", "step": step, "tokens": tokens_seen, "val_loss": val["loss"],
                     "val_ppl": val["ppl"], "val_tokens": val["tokens"],
                     **{f"val_loss/{n}": v["loss"] for n, v in per_source.items() if n},
                     "student_flops": step * step_flops[0], "flops": step * step_flops[1]})
        return val

    def checkpoint(step: int) -> None:
        check_finite()
        client = {"tokens": tokens_seen, "loader": loader.state_dict(), "data_fingerprint": data.fingerprint,
                  "wandb_run_id": getattr(metrics, "run_id", None)}
        save_checkpoint(ckpt_root, step, engine, client, t.keep_last, model=model, tokenizer=tokenizer)
        metrics.log({"event": "checkpoint", "step": step, "tokens": tokens_seen})

    step_flops = _step_flops(cfg, model, teacher, data.train[0].numel(), world)
    peak = peak_flops(device, next(model.parameters()).dtype, t.peak_flops)

    batches = iter(loader)
    bar = tqdm(total=t.max_steps, initial=start_step, desc=desc, disable=not (t.progress and main),
               dynamic_ncols=True, mininterval=1.0 if sys.stderr.isatty() else 30.0)
    t0, window_t0, window_tokens = time.perf_counter(), time.perf_counter(), 0
    last_val: dict[str, float] = {}
    done, stopped, step_loss = start_step, False, float("nan")
    with StopRequest() as stop:
        for step in range(start_step, t.max_steps):
            # (the block indices stay on the host: only teacher samples read them, as cache keys)
            micro = [{k: v if k == "index" else v.to(device) for k, v in next(batches).items()}
                     for _ in range(t.grad_accum)]
            if cached_teacher:  # packed top-k records were copied; decode them on the device
                micro = [data.train.decode(mb) for mb in micro]
            if on_policy is not None:  # GKD: some micro-batches become the student's own samples
                micro, generated = on_policy.replace(micro, step)
                gen_window.add(generated)
            # Everything per step stays on the device (a GPU never waits for the host to read a number back)
            # and is read once, when the step is logged or validated.
            num_valid = all_reduce_sum(sum(count_valid(mb["labels"]) for mb in micro))  # the global batch's
            stats = torch.zeros(len(STEP_STATS), dtype=torch.float64, device=device)
            for mb in micro:
                loss_cfg = on_policy.loss_cfg if mb.pop("on_policy", False) else cfg.distill
                loss, parts = loss_on_batch(model, teacher, mb, loss_cfg, num_valid_tokens=num_valid,
                                            features=features)
                engine.backward(loss)
                parts["loss"] = loss.detach()  # each part is already normalised by num_valid
                stats += torch.stack([parts[k].double() if k in parts else zero for k in STEP_STATS])
            all_reduce_sum(stats)
            first_bad = (nonfinite[0] == 0) & ~torch.isfinite(stats[0])
            nonfinite[1] = torch.where(first_bad, stats[0], nonfinite[1])
            nonfinite[0] = torch.where(first_bad, float(step + 1), nonfinite[0])
            lr = engine.lr
            grad_norm = engine.step()
            tokens_seen += tokens_per_step
            window_tokens += tokens_per_step
            done = step + 1
            if main:
                faults.after_step(done, desc)  # test-only seam (sapling.faults), a no-op in real runs

            logged = done % t.log_every == 0 or done == t.max_steps
            evaluating = bool(t.eval_every) and done % t.eval_every == 0 and done != t.max_steps
            if logged or evaluating:  # this step's one host sync: its sums (all ranks) and the finite check
                read = torch.cat([nonfinite, stats, num_valid.reshape(1).to(stats)]).tolist()
                check_finite(read[:2])
                step_loss, step_kd, step_ce, step_feat, step_top1, step_aux = read[2:-1]
                n_valid = read[-1]
            if logged:
                now = time.perf_counter()
                tok_s = window_tokens / max(1e-9, now - window_t0)
                record = {"event": "train", "step": done, "tokens": tokens_seen, "loss": step_loss, "kd": step_kd,
                          "ce": step_ce, "lr": lr, "grad_norm": float(grad_norm), "tokens_per_s": tok_s,
                          "label_tokens": int(n_valid)}  # this step's targets, all ranks (chat: assistant tokens)
                if on_policy is not None:
                    record.update(gen_window.record(now - window_t0))
                if mixture is not None:  # blocks drawn from each source so far, in tokens
                    counts = mixture.counts_before(loader.consumed_samples) * data.train.seq_len
                    record.update({f"tokens/{m.name}": int(c) for m, c in zip(sources, counts, strict=True)})
                if features is not None:
                    record["feat"] = step_feat
                if router_aux:
                    record["router_aux"] = step_aux
                if (teacher is not None or cached_teacher) and cfg.distill.kd_weight > 0:
                    record["top1_agreement"] = step_top1 / max(n_valid, 1)  # of this step's valid tokens
                record.update(_speed_record(step_flops, tok_s / tokens_per_step, world, peak, device))
                metrics.log(record)
                window_t0, window_tokens = now, 0
                bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{tok_s:,.0f}", refresh=False)
            if evaluating:
                last_val = validate(done)
                bar.set_postfix(loss=f"{step_loss:.3f}", val=f"{last_val['loss']:.3f}", refresh=False)
            # With checkpointing on, the last step is saved too (`sapling export` of the final state).
            saved = bool(t.save_every) and (done % t.save_every == 0 or done == t.max_steps)
            if saved:
                checkpoint(done)
            bar.update(1)
            # Also after the last step: the final validation, export and post-hooks (GPTQ) may outlast a
            # preemption's grace period; the rerun resumes at max_steps, trains nothing and runs them.
            if any_across_ranks(stop.signum is not None, device):
                if not saved:
                    checkpoint(done)
                stopped, step_loss = True, float(stats[0])
                metrics.log({"event": "stopped", "step": done, "tokens": tokens_seen,
                             "signal": signal.Signals(stop.signum).name if stop.signum else "peer"})
                break
    bar.close()
    if not stopped and save_model and state is not None and not t.save_every and state["step"] != t.max_steps:
        # A resumed run keeps `latest` at its final state: otherwise a rerun would train again from the
        # stale checkpoint it resumed from (and a larger max_steps could not continue from the end).
        checkpoint(t.max_steps)

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
