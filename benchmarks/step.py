"""End-to-end training-step benchmark: Sapling's distillation step vs a naive KD step vs plain CE.

    python benchmarks/step.py [--device cpu|cuda] [--repeats K] [--warmup W] [--batch B] [--seq L]
                              [--teacher-layers N] [--student-layers N] [--out benchmarks/results/step_cpu.md]

One student, one AdamW optimizer and one batch of random token ids (every label valid) are shared by all
rows; every row is one full optimizer step on the same shapes (forward, backward, ``optimizer.step()``,
``zero_grad``):

- ``sapling KD``: ``sapling.distill.step.loss_on_batch(student, teacher, batch, distill_cfg,
  num_valid_tokens=...)``: frozen teacher's final hidden states (no grad), student's final hidden states,
  the fused KD loss in the student's lm_head (forward KL, T = 1, ``return_parts=True`` as the trainer calls
  it, so it includes the top-1 agreement count).
- ``naive KD``: HF forward of both models returning full ``[B, L, V]`` logits, float32 log-softmax, torch
  KL(p_t || p_s) summed over the vocabulary, mean over the valid next-token positions.
- ``student CE``: the student's plain training step, HF ``model(input_ids, labels=labels).loss``.
- ``teacher forward`` (timing only, no optimizer): the teacher's decoder under ``no_grad``, the part of the
  KD step that a CE step does not have.

Timing: ``--repeats`` rounds after ``--warmup`` steps of each row, rows interleaved in one process with the
order rotated per round. Each row's time is its fastest round (on a machine shared with other processes the
least disturbed one; the median is printed beside it), and "x CE" / "x naive", tokens/s and the FLOP rate come
from it; the median of per-round ratios against naive is printed as a check. FLOPs per step come from
``sapling.train.flops`` (matmul FLOPs, full ``L x L`` attention convention); on CUDA also MFU against the
datasheet dense bf16 peak (``flops.peak_flops``). The "KD overhead" paragraph compares the measured extra time
of the KD step over the CE step with the time its extra FLOPs (teacher forward + teacher logits in the KD
head) would take at the CE step's achieved FLOP rate: what is left is the cost of the distillation machinery
beyond its arithmetic.

Shapes (``--device cpu``, float32): a Llama teacher with 4 layers, hidden 512, MLP 1536, 8 heads / 4 KV heads,
and a student with 2 layers, hidden 256, MLP 768, 4 / 2 heads (head_dim 64), V = 32000 (Llama-2's vocab),
batch 4 x seq 256 (1024 tokens): ~0.5-2 s per step on 2 cores. ``--device cuda`` (bf16): Llama-3.1-8B
(hidden 4096, MLP 14336, 32 / 8 heads, V = 128256) -> Llama-3.1-Minitron-4B-Width (hidden 3072, MLP 9216,
32 / 8 heads of 128), random weights, each cut to 16 of its 32 layers so that a naive step's full logits fit
next to the models and the student's AdamW state on one 80 GB GPU; batch 2 x seq 2048. Not yet run on a GPU.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import shlex
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from machine import cpu_model, git_commit  # noqa: E402  (benchmarks/, the script's own folder)
from transformers import AutoModelForCausalLM, LlamaConfig

from sapling.config import DistillConfig
from sapling.distill.step import loss_on_batch
from sapling.models import IGNORE_INDEX
from sapling.train import flops

REPO = Path(__file__).resolve().parents[1]

# (teacher, student) decoder shapes; layers and batch/seq can be overridden on the command line
CPU_SHAPES = dict(
    teacher=dict(
        hidden_size=512,
        intermediate_size=1536,
        num_attention_heads=8,
        num_key_value_heads=4,
        num_hidden_layers=4,
    ),
    student=dict(
        hidden_size=256,
        intermediate_size=768,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
    ),
    vocab=32000,
    batch=4,
    seq=256,
    dtype="float32",
)
GPU_SHAPES = dict(
    teacher=dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        num_hidden_layers=16,
    ),  # Llama-3.1-8B has 32
    student=dict(
        hidden_size=3072,
        intermediate_size=9216,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        num_hidden_layers=16,
    ),  # Llama-3.1-Minitron-4B-Width has 32
    vocab=128256,
    batch=2,
    seq=2048,
    dtype="bfloat16",
)
ROWS = ("ours", "naive", "ce", "teacher_fwd")
LABELS = {
    "ours": "sapling KD (`loss_on_batch`, fused loss)",
    "naive": "naive KD (HF logits of both + torch KL)",
    "ce": "student CE (HF forward with labels)",
    "teacher_fwd": "teacher forward only (no grad; part of the KD step)",
}


# ----------------------------------------------------------------------------------------------------
# models, batch and the step functions
# ----------------------------------------------------------------------------------------------------


def make_config(shape: dict, vocab: int, seq: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab, max_position_embeddings=max(seq, 2048), tie_word_embeddings=False, **shape
    )


def build(args, shapes: dict):
    device, dtype = torch.device(args.device), getattr(torch, shapes["dtype"])
    t_cfg = make_config(
        {**shapes["teacher"], "num_hidden_layers": args.teacher_layers}, shapes["vocab"], args.seq
    )
    s_cfg = make_config(
        {**shapes["student"], "num_hidden_layers": args.student_layers}, shapes["vocab"], args.seq
    )
    torch.manual_seed(0)
    with device:  # build the weights directly on the device
        teacher = AutoModelForCausalLM.from_config(t_cfg, dtype=dtype, attn_implementation="sdpa")
        student = AutoModelForCausalLM.from_config(s_cfg, dtype=dtype, attn_implementation="sdpa")
    teacher.eval().requires_grad_(False)
    student.train()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5, fused=device.type == "cuda")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, shapes["vocab"], (args.batch, args.seq), generator=g).to(device)
    batch = {"input_ids": ids, "labels": ids.clone()}
    return teacher, student, opt, batch


def _n_valid(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def step_fns(teacher, student, opt, batch) -> dict[str, Callable[[], None]]:
    """One callable per row, each a whole step (or the teacher's forward)."""
    ids, labels = batch["input_ids"], batch["labels"]
    n_valid = _n_valid(batch)
    cfg = DistillConfig(divergence="forward_kl", temperature=1.0, kd_weight=1.0, ce_weight=0.0)

    def finish(loss: torch.Tensor) -> None:
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def ours() -> None:
        loss, _ = loss_on_batch(student, teacher, batch, cfg, num_valid_tokens=n_valid)
        finish(loss)

    def naive() -> None:
        z_s = student(input_ids=ids, use_cache=False).logits[:, :-1].float()
        with torch.no_grad():
            z_t = teacher(input_ids=ids, use_cache=False).logits[:, :-1].float()
        lp_s = F.log_softmax(z_s, dim=-1)
        lp_t = F.log_softmax(z_t, dim=-1)
        kl = F.kl_div(lp_s, lp_t, reduction="none", log_target=True).sum(-1)  # KL(p_t || p_s) per position
        valid = labels[:, 1:] != IGNORE_INDEX
        finish(torch.where(valid, kl, 0.0).sum() / n_valid)

    def ce() -> None:
        finish(student(input_ids=ids, labels=labels, use_cache=False).loss)

    def teacher_fwd() -> None:
        with torch.no_grad():
            teacher.model(input_ids=ids, use_cache=False)

    return {"ours": ours, "naive": naive, "ce": ce, "teacher_fwd": teacher_fwd}


def row_flops(teacher, student, args) -> dict[str, float]:
    """Matmul FLOPs per step of each row (``sapling.train.flops``, full-attention convention)."""
    t_cfg, s_cfg, b, seq = teacher.config, student.config, args.batch, args.seq
    ce = flops.ce_step_flops(s_cfg, batch_size=b, seq_len=seq).total
    teacher_full = b * seq * flops.forward_flops_per_token(t_cfg, seq)  # with its lm_head
    return {
        "ours": flops.distill_step_flops(s_cfg, t_cfg, batch_size=b, seq_len=seq).total,
        "naive": ce + teacher_full,  # HF computes logits at all L positions (the last one is unused)
        "ce": ce,
        "teacher_fwd": b * seq * flops.forward_flops_per_token(t_cfg, seq, lm_head=False),
        # not a row: the teacher-logits matmul inside the fused KD head
        "kd_teacher_logits": b * (seq - 1) * 2 * t_cfg.hidden_size * t_cfg.vocab_size,
    }


# ----------------------------------------------------------------------------------------------------
# measurement
# ----------------------------------------------------------------------------------------------------


@dataclass
class RowResult:
    times: list[float]
    peak_bytes: int | None = None
    error: str | None = None


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _timed(fn: Callable[[], None], device: str) -> tuple[float, int | None]:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() - base if device == "cuda" else None
    return dt, peak


def measure(args, fns: dict[str, Callable[[], None]]) -> dict[str, RowResult]:
    out: dict[str, RowResult] = {}
    for name in args.rows:
        try:
            for _ in range(args.warmup):
                _timed(fns[name], args.device)
            out[name] = RowResult(times=[])
        except Exception as e:  # e.g. out of memory: report the row, keep the others
            traceback.print_exc()
            out[name] = RowResult(
                times=[], error=f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
            )
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
    live = [n for n in args.rows if out[n].error is None]
    for r in range(args.repeats):
        order = live[r % len(live) :] + live[: r % len(live)] if live else []
        for name in order:
            dt, peak = _timed(fns[name], args.device)
            out[name].times.append(dt)
            if peak is not None:
                out[name].peak_bytes = max(out[name].peak_bytes or 0, peak)
        print(
            f"round {r + 1}/{args.repeats}: "
            + ", ".join(f"{n} {out[n].times[-1] * 1e3:.0f} ms" for n in live),
            flush=True,
        )
    return out


def _median_ratio(a: list[float], b: list[float]) -> float | None:
    if not a or not b:
        return None
    return statistics.median(x / y for x, y in zip(a, b))


# ----------------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------------


def render_table(res: dict[str, RowResult], fl: dict[str, float], args, peak: float | None) -> str:
    """Per row: fastest and median round, throughput and ratios from the fastest round, FLOP rate (MFU)."""
    tokens = args.batch * args.seq
    cuda = args.device == "cuda"
    cols = [
        "step",
        "min ms",
        "median ms",
        "tokens/s",
        "x CE",
        "x naive",
        "x naive (median of per-round)",
        "GFLOP/step",
        "achieved TFLOP/s" if cuda else "achieved GFLOP/s",
    ]
    if cuda:
        cols += ["MFU", "peak GiB"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    fastest = {n: min(r.times) for n, r in res.items() if r.times}
    for name in args.rows:
        r = res[name]
        if r.error:
            lines.append(f"| {LABELS[name]} | {r.error} |" + " |" * (len(cols) - 2))
            continue
        t = fastest[name]
        rate = fl[name] / t
        row = [
            LABELS[name],
            f"{t * 1e3:.1f}",
            f"{statistics.median(r.times) * 1e3:.1f}",
            f"{tokens / t:,.0f}" if name != "teacher_fwd" else "-",
            _fmt(t / fastest["ce"] if "ce" in fastest else None),
            _fmt(t / fastest["naive"] if "naive" in fastest else None),
            _fmt(_median_ratio(r.times, res["naive"].times) if "naive" in res else None),
            f"{fl[name] / 1e9:.1f}",
            f"{rate / 1e12:.1f}" if cuda else f"{rate / 1e9:.1f}",
        ]
        if cuda:
            m = flops.mfu(fl[name], t, 1, peak)
            row += [
                "-" if m is None else f"{100 * m:.1f}%",
                "-" if r.peak_bytes is None else f"{r.peak_bytes / 2**30:.1f}",
            ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def render_overhead(res: dict[str, RowResult], fl: dict[str, float]) -> str:
    """Measured extra time of the KD step over the CE step vs the time of its extra FLOPs at the CE rate.

    Differences of absolute times are more sensitive to other processes than ratios, so this uses each
    row's fastest round (the least disturbed one).
    """
    ours, ce = res.get("ours"), res.get("ce")
    if not ours or not ce or ours.error or ce.error or not ours.times:
        return "KD overhead: not measured (needs the KD and CE rows)"
    t_ce, t_ours = min(ce.times), min(ours.times)
    extra_t = t_ours - t_ce
    ce_rate = fl["ce"] / t_ce
    extra_fl = fl["ours"] - fl["ce"]
    expected = extra_fl / ce_rate
    lines = [
        "KD overhead (KD step - CE step; each row's fastest round, the least disturbed by other processes):",
        f"- measured extra time: {extra_t * 1e3:.1f} ms per step "
        f"({100 * extra_t / t_ce:.0f}% of the CE step)",
        f"- extra FLOPs: {extra_fl / 1e9:.1f} GFLOP (teacher decoder forward "
        f"{fl['teacher_fwd'] / 1e9:.1f} + teacher logits in the KD head, minus the lm_head position the CE "
        f"step also computes); at the CE step's achieved {_rate(ce_rate)} that is {expected * 1e3:.1f} ms",
        f"- overhead beyond those FLOPs: {(extra_t - expected) * 1e3:+.1f} ms per step "
        f"({100 * (extra_t - expected) / t_ours:+.1f}% of the KD step); the extra work ran at "
        f"{_rate(extra_fl / extra_t) if extra_t > 0 else '-'}",
    ]
    tf = res.get("teacher_fwd")
    if tf and not tf.error and tf.times:
        t_tf = min(tf.times)
        tf_rate = fl["teacher_fwd"] / t_tf
        t_logits = fl["kd_teacher_logits"] / tf_rate
        rest = extra_t - t_tf - t_logits
        lines.append(
            f"- of which the teacher's forward, timed alone: {t_tf * 1e3:.1f} ms ({_rate(tf_rate)}); the KD "
            f"head's teacher logits, {fl['kd_teacher_logits'] / 1e9:.1f} GFLOP, would take "
            f"{t_logits * 1e3:.1f} ms at that rate; the remaining {rest * 1e3:+.1f} ms is the fused loss's "
            "net cost over the CE step's lm_head + cross-entropy (softmax passes, top-1 count, chunk loop)"
        )
    return "\n".join(lines)


def _load() -> tuple[float, ...] | None:
    return tuple(round(x, 2) for x in os.getloadavg()) if hasattr(os, "getloadavg") else None


def _rate(flop_per_s: float) -> str:
    return f"{flop_per_s / 1e12:.1f} TFLOP/s" if flop_per_s >= 1e12 else f"{flop_per_s / 1e9:.1f} GFLOP/s"


def render_header(args, shapes: dict, teacher, student, peak: float | None) -> str:
    import transformers

    dev = cpu_model() if args.device == "cpu" else torch.cuda.get_device_name()

    def desc(m) -> str:
        c = m.config
        n = sum(p.numel() for p in m.parameters())
        return (
            f"{c.num_hidden_layers} layers, hidden {c.hidden_size}, MLP {c.intermediate_size}, "
            f"{c.num_attention_heads}/{c.num_key_value_heads} heads of {c.head_dim}, {n / 1e6:.1f}M params"
        )

    lines = [
        "# Training-step benchmark: distillation step vs naive KD vs plain CE",
        "",
        f"- command: `{' '.join(shlex.quote(a) for a in ['python', *sys.argv])}`",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}; "
        f"git commit {git_commit()}",
        f"- device: {args.device} ({dev}); torch threads: {torch.get_num_threads()}; os.cpu_count: "
        f"{os.cpu_count()}; load average at the start: {args.load_start}, at the end: {_load()}",
        f"- torch {torch.__version__}; transformers {transformers.__version__}; "
        f"python {platform.python_version()}",
        f"- teacher: Llama, {desc(teacher)}; student: Llama, {desc(student)}; V={shapes['vocab']}; "
        f"batch {args.batch} x seq {args.seq} = {args.batch * args.seq} tokens; {shapes['dtype']}; "
        "SDPA attention; random weights; every label valid",
        "- every row: forward, backward, AdamW step, zero_grad on one shared student (teacher row: the "
        "teacher's decoder forward only); KD rows: forward KL, T=1, kd_weight=1, ce_weight=0",
        f"- timing: {args.repeats} rounds after {args.warmup} warm-up step(s) per row, rows interleaved in "
        "one process (order rotated per round); times, tokens/s, 'x CE', 'x naive' and FLOP rates from each "
        "row's fastest round (the least disturbed by other processes), medians beside them",
        "- FLOPs: sapling.train.flops matmul FLOPs per step (full L x L attention convention; KD step = "
        "student decoder fwd+bwd + teacher decoder fwd + (2*Ht + 6*Hs)*V per head row)",
    ]
    if args.device == "cuda":
        lines.append(
            f"- MFU against the datasheet dense bf16 peak: "
            f"{'unknown device' if peak is None else f'{peak / 1e12:.0f} TFLOP/s'}"
        )
    else:
        lines.append(
            "- note: other processes may share the 2 cores; compare ratios (measured in the same run), "
            "not absolute times across runs"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--batch", type=int)
    p.add_argument("--seq", type=int)
    p.add_argument("--teacher-layers", type=int)
    p.add_argument("--student-layers", type=int)
    p.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    p.add_argument("--out", help="write the table here (markdown) and the raw numbers beside it (.json)")
    args = p.parse_args(argv)
    args.load_start = _load()
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device")
    shapes = GPU_SHAPES if args.device == "cuda" else CPU_SHAPES
    args.batch = args.batch or shapes["batch"]
    args.seq = args.seq or shapes["seq"]
    args.teacher_layers = args.teacher_layers or shapes["teacher"]["num_hidden_layers"]
    args.student_layers = args.student_layers or shapes["student"]["num_hidden_layers"]

    teacher, student, opt, batch = build(args, shapes)
    fns = step_fns(teacher, student, opt, batch)
    fl = row_flops(teacher, student, args)
    peak = flops.peak_flops(args.device, getattr(torch, shapes["dtype"]))
    print(f"{args.device}: timing {', '.join(args.rows)} ({args.repeats} rounds) ...", flush=True)
    res = measure(args, fns)

    text = (
        "\n\n".join(
            [
                render_header(args, shapes, teacher, student, peak),
                render_table(res, fl, args, peak),
                render_overhead(res, fl),
            ]
        )
        + "\n"
    )
    print("\n" + text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        raw = {
            "argv": sys.argv,
            "shapes": {
                **shapes,
                "batch": args.batch,
                "seq": args.seq,
                "teacher_layers": args.teacher_layers,
                "student_layers": args.student_layers,
            },
            "flops_per_step": fl,
            "peak_flops": peak,
            "results": {
                k: {"times_s": v.times, "peak_bytes": v.peak_bytes, "error": v.error} for k, v in res.items()
            },
        }
        out.with_suffix(".json").write_text(json.dumps(raw, indent=1) + "\n")
        print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
