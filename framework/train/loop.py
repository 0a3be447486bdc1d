"""The training loop: distillation from a frozen teacher, or plain LM training when there is none.

Readable top to bottom: build the engine and loader, resume if a checkpoint exists, then per step
fetch `grad_accum` micro-batches, normalise the loss over all their valid tokens, backward each,
step once; log, validate and checkpoint on their schedules; save an HF checkpoint at the end.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from sapling.data import PackedData, ResumableLoader
from sapling.distill.step import count_valid, loss_on_batch
from sapling.eval.perplexity import evaluate_lm
from sapling.models import save_hf_checkpoint
from sapling.train.checkpoint import load_latest, save_checkpoint, set_rng_state
from sapling.train.engine import LocalEngine
from sapling.train.metrics import MetricsLogger


@dataclass
class TrainResult:
    steps: int
    tokens: int
    wall_s: float
    final_val: dict[str, float] = field(default_factory=dict)
    model_dir: Path | None = None


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

    `save_model=False` skips the final HF checkpoint (short throwaway runs, e.g. ranking prune candidates).
    """
    t = cfg.trainer
    output_dir = Path(output_dir)
    ckpt_root = output_dir / "checkpoints"
    torch.manual_seed(t.seed)

    if teacher is not None:
        teacher.eval()
        teacher.requires_grad_(False)
    student.train()
    engine = LocalEngine(student, t)
    loader = ResumableLoader(data.train, t.micro_batch_size, seed=t.seed)
    tokens_per_step = t.micro_batch_size * t.grad_accum * data.train[0].numel()

    start_step, tokens_seen = 0, 0
    resumed = load_latest(ckpt_root) if t.resume else None
    if resumed is not None:
        engine_state, client = resumed
        if client.get("data_fingerprint", data.fingerprint) != data.fingerprint:
            raise ValueError(f"{ckpt_root} was written for other data (fingerprint {client['data_fingerprint'][:12]}, "
                             f"now {data.fingerprint[:12]}); use a new output_dir or trainer.resume=false")
        engine.load_state_dict(engine_state)
        loader.load_state_dict(client["loader"])
        set_rng_state(client["rng"])
        start_step, tokens_seen = client["step"], client["tokens"]
        metrics.log({"event": "resume", "step": start_step, "tokens": tokens_seen})

    def validate(step: int) -> dict[str, float]:
        val = evaluate_lm(student, data.val, micro_batch_size=t.micro_batch_size, max_batches=t.eval_batches,
                          device=device)
        metrics.log({"event": "eval", "step": step, "tokens": tokens_seen, "val_loss": val["loss"],
                     "val_ppl": val["ppl"]})
        return val

    batches = iter(loader)
    bar = tqdm(total=t.max_steps, initial=start_step, desc=desc, disable=not t.progress, dynamic_ncols=True,
               mininterval=1.0 if sys.stderr.isatty() else 30.0)
    t0, window_t0, window_tokens = time.perf_counter(), time.perf_counter(), 0
    last_val: dict[str, float] = {}
    for step in range(start_step, t.max_steps):
        micro = [{k: v.to(device) for k, v in next(batches).items()} for _ in range(t.grad_accum)]
        valid = [count_valid(mb["labels"]) for mb in micro]
        num_valid = sum(valid)
        step_loss, step_kd, step_ce = 0.0, 0.0, 0.0
        for mb, mb_valid in zip(micro, valid):
            loss, parts = loss_on_batch(student, teacher, mb, cfg.distill, num_valid_tokens=num_valid)
            engine.backward(loss)
            share = mb_valid / num_valid
            step_loss += float(loss.detach())
            step_kd += parts["kd"] * share
            step_ce += parts["ce"] * share
        if not math.isfinite(step_loss):
            raise FloatingPointError(f"loss is {step_loss} at step {step + 1}; lower trainer.lr or check the data")
        lr = engine.lr
        grad_norm = engine.step()
        tokens_seen += tokens_per_step
        window_tokens += tokens_per_step
        done = step + 1

        if done % t.log_every == 0 or done == t.max_steps:
            now = time.perf_counter()
            tok_s = window_tokens / max(1e-9, now - window_t0)
            metrics.log({"event": "train", "step": done, "tokens": tokens_seen, "loss": step_loss, "kd": step_kd,
                         "ce": step_ce, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tok_s})
            window_t0, window_tokens = now, 0
            bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{tok_s:,.0f}", refresh=False)
        if t.eval_every and done % t.eval_every == 0 and done != t.max_steps:
            last_val = validate(done)
            bar.set_postfix(loss=f"{step_loss:.3f}", val=f"{last_val['loss']:.3f}", refresh=False)
        if t.save_every and done % t.save_every == 0 and done != t.max_steps:
            save_checkpoint(ckpt_root, done, engine.state_dict(),
                            {"step": done, "tokens": tokens_seen, "loader": loader.state_dict(),
                             "data_fingerprint": data.fingerprint}, t.keep_last)
        bar.update(1)
    bar.close()

    last_val = validate(t.max_steps)
    model_dir = save_hf_checkpoint(student, tokenizer, output_dir / "model") if save_model else None
    wall = time.perf_counter() - t0
    metrics.log({"event": "done", "step": t.max_steps, "tokens": tokens_seen, "wall_s": wall,
                 "val_loss": last_val["loss"], "val_ppl": last_val["ppl"]})
    return TrainResult(steps=t.max_steps, tokens=tokens_seen, wall_s=wall, final_val=last_val, model_dir=model_dir)
