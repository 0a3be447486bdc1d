"""Where a distillation step's time goes: the same step split into phases, with Sapling's fused KD head and
with the full-logit head the naive loop and TRL's GKD loss compute (run in Sapling's virtualenv).

Phases: the teacher's forward to its final hidden states (no grad), the student's forward to its final hidden
states, the head (lm_head logits + forward KL, forward and backward; Sapling's fused loss computes the gradient
during its forward), the student's backward through its decoder from the head's gradient, and the AdamW step.
Everything but the head is the same transformers code in all three systems, so this shows how much of a step
the choice of head can change at all.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

PHASES = ("teacher forward", "student forward", "head: logits + KD, fwd + bwd", "student backward",
          "optimizer step")
HEADS = ("fused", "full")


def make_heads(w_s: torch.Tensor, w_t: torch.Tensor, labels: torch.Tensor) -> dict[str, Callable]:
    """The two heads, each (student hidden [N, H], teacher hidden [N, H]) -> mean forward KL over the N rows."""
    from sapling.kernels import fused_linear_kd_loss

    n = labels.numel()

    def fused(h: torch.Tensor, ht: torch.Tensor) -> torch.Tensor:
        return fused_linear_kd_loss(h, w_s, ht, w_t, labels=labels, num_valid_tokens=n)

    def full(h: torch.Tensor, ht: torch.Tensor) -> torch.Tensor:
        lp_s = F.log_softmax(F.linear(h, w_s).float(), dim=-1)
        with torch.no_grad():
            lp_t = F.log_softmax(F.linear(ht, w_t).float(), dim=-1)
        return F.kl_div(lp_s, lp_t, reduction="none", log_target=True).sum() / n

    return {"fused": fused, "full": full}


TRAINER_PHASES = ("loss_on_batch: forwards + head", "engine.backward: student backward",
                  "engine.step: clip + AdamW + schedule")


def phase_times(teacher_dir: Path, student_dir: Path, ids: torch.Tensor, repeats: int = 2,
                trainer_cfg: Any = None) -> dict[str, dict]:
    """Median seconds per phase for each head over `repeats` steps (after one warm-up step of each), the two
    heads alternating on the same micro-batch `ids` [B, L]. With `trainer_cfg` (a composed `sapling distill`
    config) Sapling's own step joins the rounds: `loss_on_batch` and a `LocalEngine` over a second copy of the
    student, as `sapling distill`'s loop runs them, so its time beyond the fused phases is measured in the
    same process."""
    from transformers import AutoModelForCausalLM

    from sapling.models import decoder_and_head, final_hidden, shifted_targets

    kw = {"dtype": torch.float32, "attn_implementation": "sdpa"}
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, **kw).eval().requires_grad_(False)
    student = AutoModelForCausalLM.from_pretrained(student_dir, **kw).train()
    params = list({id(p): p for p in student.parameters()}.values())
    opt = torch.optim.AdamW(params, lr=1e-7)  # the step's work, not its effect, is what is timed
    w_s, w_t = decoder_and_head(student)[1].weight, decoder_and_head(teacher)[1].weight
    heads = make_heads(w_s, w_t, shifted_targets(ids))

    def step(head: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> list[float]:
        marks = [time.perf_counter()]
        with torch.no_grad():
            ht = final_hidden(teacher, ids)
        marks.append(time.perf_counter())
        hs = final_hidden(student, ids)
        marks.append(time.perf_counter())
        h = hs.detach().requires_grad_()
        head(h, ht).backward()
        marks.append(time.perf_counter())
        hs.backward(h.grad)
        marks.append(time.perf_counter())
        opt.step()
        opt.zero_grad(set_to_none=True)
        marks.append(time.perf_counter())
        return [b - a for a, b in zip(marks, marks[1:])]

    n_rows, vocab = ids.shape[0] * (ids.shape[1] - 1), w_s.shape[0]
    p_t, p_s = body_params(teacher), body_params(student)
    flops = dict(zip(PHASES, (2 * n_rows * p_t, 2 * n_rows * p_s,
                              2 * n_rows * vocab * (w_t.shape[1] + 3 * w_s.shape[1]), 4 * n_rows * p_s, 0.0)))
    steps = {k: (lambda k=k: step(heads[k])) for k in HEADS}
    if trainer_cfg is not None:
        steps["trainer"] = trainer_step(trainer_cfg, teacher, student_dir, ids, kw)
    rounds: dict[str, list[list[float]]] = {k: [] for k in steps}
    for r in range(repeats + 1):
        for k in list(steps) if r % 2 == 0 else list(steps)[::-1]:
            t = steps[k]()
            if r > 0:
                rounds[k].append(t)
    out = {k: {"phases": dict(zip(PHASES, (statistics.median(col) for col in zip(*rounds[k])))),
               "repeats": repeats, "flops": flops} for k in HEADS}
    if trainer_cfg is not None:
        out["trainer"] = {"phases": dict(zip(TRAINER_PHASES, (statistics.median(c) for c in zip(*rounds["trainer"])))),
                          "repeats": repeats}
    return out


def trainer_step(cfg: Any, teacher: torch.nn.Module, student_dir: Path, ids: torch.Tensor,
                 load_kw: dict[str, Any]) -> Callable[[], list[float]]:
    """One `sapling distill` step on `ids` (labels = the ids, as the benchmark's blocks have), timed in three parts."""
    from transformers import AutoModelForCausalLM

    from sapling.distill.step import count_valid, loss_on_batch
    from sapling.train.engine import LocalEngine

    engine = LocalEngine(AutoModelForCausalLM.from_pretrained(student_dir, **load_kw).train(), cfg.trainer)

    def step() -> list[float]:
        marks = [time.perf_counter()]
        batch = {"input_ids": ids, "labels": ids}
        loss, _ = loss_on_batch(engine.module, teacher, batch, cfg.distill, num_valid_tokens=count_valid(ids))
        marks.append(time.perf_counter())
        engine.backward(loss)
        marks.append(time.perf_counter())
        engine.step()
        marks.append(time.perf_counter())
        return [b - a for a, b in zip(marks, marks[1:])]

    return step


def body_params(model: torch.nn.Module) -> int:
    """Parameters of the decoder's matmuls (embeddings and norms left out): 2 x this x tokens is its forward."""
    from sapling.models import decoder_and_head

    decoder = decoder_and_head(model)[0]
    return sum(p.numel() for n, p in decoder.named_parameters() if p.ndim == 2 and "embed" not in n)


def render_phases(shape: str, prof: dict[str, dict], vocab: int) -> list[str]:
    """A markdown table of `phase_times` for one shape, and what the head alone can change."""
    seq, batch = (int(x) for x in shape.split("x"))
    fu, fl = prof["fused"]["phases"], prof["full"]["phases"]
    tot_fu, tot_fl = sum(fu.values()), sum(fl.values())
    head = PHASES[2]
    rest = tot_fl - fl[head]
    logits_gib = batch * (seq - 1) * vocab * 4 / 2**30
    lines = [f"{shape} ({prof['fused']['repeats']} timed steps of each head, medians):", "",
             "| phase | matmul GFLOP | fused head (Sapling) s | GFLOP/s | full-logit head (naive, TRL's loss) s | GFLOP/s |",
             "|---|---|---|---|---|---|"]
    flops = prof["fused"]["flops"]

    def rate(p: str, t: float) -> str:
        return f"{flops[p] / t / 1e9:.0f}" if flops[p] else "-"

    lines += [f"| {p} | {flops[p] / 1e9:.0f} | {fu[p]:.2f} | {rate(p, fu[p])} | {fl[p]:.2f} | {rate(p, fl[p])} |"
              for p in PHASES]
    lines += [f"| whole step | | {tot_fu:.2f} | | {tot_fl:.2f} | |", ""]
    if "trainer" in prof:
        lines += trainer_lines(fu, prof["trainer"]["phases"])
    lines += [
              "The head's matmuls are the same four in both heads (the teacher's and the student's logits, the "
              "gradients of the student's hidden states and lm_head weight): at the model's own GFLOP/s they are "
              "its floor on this machine; what either head spends above it is softmax, divergence and memory traffic.",
              "",
              f"The head is {fl[head] / tot_fl:.0%} of the full-logit step and {fu[head] / tot_fu:.0%} of the fused "
              f"one; the other phases ({rest:.2f} s) are the same model code in every system, so with a head that "
              f"took no time at all a step would still be {rest / tot_fl:.2f}x the full-logit one. One float32 "
              f"[tokens x V] tensor here is {logits_gib:.2f} GiB; the full-logit head holds several at once (the "
              "student's logits and log-probabilities, the teacher's, their gradient), the fused one a 256 MiB "
              "chunk at a time.", ""]
    return lines


def trainer_lines(fused: dict[str, float], trainer: dict[str, float]) -> list[str]:
    """Sapling's own step beside the fused profile's phases it is made of, and the difference."""
    groups = [sum(fused[p] for p in PHASES[:3]), fused[PHASES[3]], fused[PHASES[4]]]
    lines = ["Sapling's own step in the same rounds (`loss_on_batch` + `LocalEngine`, as `sapling distill` runs them), "
             "against the fused profile's phases that make it up:", "",
             "| part of Sapling's step | s | the fused profile's phases | s |", "|---|---|---|---|"]
    parts = ["teacher + student forward + head", "student backward", "AdamW step (no clipping, no schedule)"]
    for name, t, part, g in zip(TRAINER_PHASES, trainer.values(), parts, groups):
        lines.append(f"| {name} | {t:.2f} | {part} | {g:.2f} |")
    total, ref = sum(trainer.values()), sum(groups)
    lines += [f"| whole step | {total:.2f} | | {ref:.2f} |", "",
              f"Sapling's step costs {total - ref:+.2f} s ({total / ref - 1:+.1%}) beyond the fused phases in the same "
              "process.", ""]
    return lines
