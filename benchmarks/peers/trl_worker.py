"""The peer side of `distill.py`, run by the peers' virtualenv (no Sapling import): TRL's offline logit
distillation, or the naive loop every user can write, on the exact token blocks Sapling trained on.

    .venv-peers/bin/python benchmarks/peers/trl_worker.py --system trl|naive --teacher DIR --student DIR \
        --blocks blocks.pt --batch B --steps N --lr LR ... --out result.json

- ``trl``: ``trl.experimental.gkd.GKDTrainer`` with ``lmbda=0`` (never generates: every batch is the data),
  ``seq_kd=False`` and ``beta=0`` (its generalized JSD at beta=0 is ``kl_div(log p_s, log p_t)`` =
  KL(p_t || p_s), Sapling's forward_kl), temperature 1, no gradient checkpointing (TRL's SFT default turns it
  on; Sapling's runs do not checkpoint), bf16 autocast on CUDA only (fp32 on CPU, as Sapling's CPU run). The blocks go in their given order (a
  sequential sampler instead of the Trainer's random one) with every next-token position labelled.
- ``naive``: HF forward of both models to full ``[B, L, V]`` logits, float32 log-softmax, ``F.kl_div`` summed
  over the vocabulary, mean over the ``B * (L - 1)`` next-token positions.

On CUDA both keep fp32 weights and autocast to bf16 (HF's mixed precision) and report
``torch.cuda.max_memory_allocated``. Both use the optimizer Sapling builds (AdamW, decay on >= 2-D weights
only, eps 1e-8), its schedule (linear warmup ``(s + 1) / warmup``, cosine to ``min_lr_ratio``; HF's warmup starts at 0, so the Trainer gets this one
as a LambdaLR) and global-norm clipping, so the loss curves can be compared step by step.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def lr_factor(step: int, warmup: int, max_steps: int, min_ratio: float) -> float:
    """Sapling's schedule (sapling.train.optim.lr_factor), restated here: this process cannot import Sapling."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def optimizer_and_schedule(model: torch.nn.Module, a: argparse.Namespace):
    params = list({id(p): p for p in model.parameters() if p.requires_grad}.values())
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": a.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=a.lr, betas=(a.beta1, a.beta2), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, a.warmup, a.steps, a.min_lr_ratio))
    return opt, sched


def load(a: argparse.Namespace):
    """fp32 weights on `a.device` (on CUDA the steps autocast to bf16, HF's mixed precision), SDPA attention."""
    from transformers import AutoModelForCausalLM

    kw = {"dtype": torch.float32, "attn_implementation": "sdpa"}
    teacher = AutoModelForCausalLM.from_pretrained(a.teacher, **kw).to(a.device).eval()
    teacher.requires_grad_(False)
    student = AutoModelForCausalLM.from_pretrained(a.student, **kw).to(a.device).train()
    blocks = torch.load(a.blocks)
    if blocks.shape[0] < a.steps * a.batch:
        raise SystemExit(f"{a.blocks}: {blocks.shape[0]} blocks, need steps x batch = {a.steps * a.batch}")
    return teacher, student, blocks


def run_naive(a: argparse.Namespace, record: dict) -> None:
    teacher, student, blocks = load(a)
    opt, sched = optimizer_and_schedule(student, a)
    cuda = a.device == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        record["cuda_at_start"] = torch.cuda.memory_allocated()
    record["start_time"] = time.time()
    for step in range(a.steps):
        ids = blocks[step * a.batch : (step + 1) * a.batch].to(a.device)
        with torch.no_grad(), autocast:
            t_logits = teacher(input_ids=ids).logits[:, :-1].float()
        with autocast:
            s_logits = student(input_ids=ids).logits[:, :-1].float()
        kl = F.kl_div(F.log_softmax(s_logits, -1), F.log_softmax(t_logits, -1), log_target=True, reduction="sum")
        loss = kl / (ids.shape[0] * (ids.shape[1] - 1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), a.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        value = float(loss.detach())
        if cuda:
            torch.cuda.synchronize()
        record["steps"].append({"step": step + 1, "time": time.time(), "loss": value})
    _gpu_memory(record, cuda)


def run_trl(a: argparse.Namespace, record: dict) -> None:
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoTokenizer, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    teacher, student, blocks = load(a)
    blocks = blocks[: a.steps * a.batch]
    tokenizer = AutoTokenizer.from_pretrained(a.teacher)
    losses: list[float] = []

    def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
        ids = torch.tensor([r["input_ids"] for r in rows], dtype=torch.long)
        labels = ids.clone()
        labels[:, 0] = -100  # (the shifted loss never reads it; HF counts label tokens before the shift)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    class InOrder(GKDTrainer):
        def _get_train_sampler(self, *args, **kwargs):  # the blocks in Sapling's order, not reshuffled
            return SequentialSampler(self.train_dataset)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            losses.append(float((out[0] if return_outputs else out).detach()))
            return out

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                record["cuda_at_start"] = torch.cuda.memory_allocated()
            record["start_time"] = time.time()

        def on_step_end(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            record["steps"].append({"step": state.global_step, "time": time.time(), "loss": losses[-1]})

    args = GKDConfig(
        output_dir=str(Path(a.out).parent / "trl_out"), max_steps=a.steps, per_device_train_batch_size=a.batch,
        gradient_accumulation_steps=1, max_grad_norm=a.grad_clip, lmbda=0.0, beta=0.0, temperature=1.0,
        seq_kd=False, bf16=a.device == "cuda", fp16=False, gradient_checkpointing=False, use_cpu=a.device == "cpu",
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, seed=0,
        dataloader_num_workers=0, dataloader_pin_memory=False, max_length=blocks.shape[1],
    )
    trainer = InOrder(model=student, teacher_model=teacher, args=args, data_collator=collate,
                      train_dataset=Dataset.from_dict({"input_ids": blocks.tolist()}), processing_class=tokenizer,
                      optimizers=optimizer_and_schedule(student, a), callbacks=[Clock()])
    trainer.train()
    _gpu_memory(record, a.device == "cuda")


def _gpu_memory(record: dict, cuda: bool) -> None:
    if cuda:
        record["cuda_peak"] = torch.cuda.max_memory_allocated()


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "trl", "accelerate"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "missing"
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--system", choices=["trl", "naive"], required=True)
    p.add_argument("--teacher", required=True)
    p.add_argument("--student", required=True)
    p.add_argument("--blocks", required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--warmup", type=int, required=True)
    p.add_argument("--min-lr-ratio", type=float, required=True)
    p.add_argument("--weight-decay", type=float, required=True)
    p.add_argument("--beta1", type=float, required=True)
    p.add_argument("--beta2", type=float, required=True)
    p.add_argument("--grad-clip", type=float, required=True)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    torch.manual_seed(0)
    record = {"system": a.system, "versions": versions(), "threads": torch.get_num_threads(), "steps": []}
    (run_trl if a.system == "trl" else run_naive)(a, record)
    Path(a.out).write_text(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
