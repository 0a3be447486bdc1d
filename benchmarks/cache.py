"""Teacher-logit cache benchmark: size, fidelity and read speed of the top-k records, and a demo student
distilled from the cache vs from the online teacher.

    python benchmarks/cache.py [--steps 300] [--quick] [--out benchmarks/results/cache_cpu.md]

Table 1, bytes per token. For k in {16, 64} and V in {32000, 128256}: the index width ceil(log2 V); the record
size measured by encoding synthetic top-k distributions (one 2048-token sequence, 2047 records) with
`encode_records` and dividing the array's bytes by the records (checked equal to `RecordLayout.record_bytes`);
the on-disk size per predicted token at seq_len 2048, from the shard geometry the reader checks every shard
against (token ids: 2 bytes when V < 65536, else 4; a 4-byte CRC-32 per sequence), i.e. the manifest's
`bytes_per_token` = shard bytes / (sequences x (L-1)); the naive layout (fp32 log-probs + int64 indices,
12k bytes, no token ids); on-disk / naive, and whether it is <= 1/3 (the goal is at k=64). Below it the
measured `bytes_per_token` of the real demo cache written by this run (V = 2048, seq_len 128).

Table 2, fidelity, on the demo teacher's own distributions over every validation position (the demo vocabulary
is 2048 tokens, so k=64 keeps 3% of it). q = the decoded cache entry: `decode_records(encode_records(
teacher_topk(...)))` (12-bit values) on its k tokens, the decoded tail mass spread uniformly over the other
V-k tokens. Reported per k: the teacher's mean top-k mass, mean KL(p_full || q) in float64, and the same KL
with exact (unquantized) top-k log-probs and tail, i.e. the truncation alone. Table 2b, value width at k=64:
the quantization-only KL over the k+1 buckets (exact top-k probabilities and exact tail vs their decoded
values), the full KL at that width, and the record size at V=128256 against the naive layout.

Table 3, read throughput: tokens/s of iterating the trainer's `ResumableLoader` (micro batch 16, shuffled, so
every batch reads 16 random sequences) over the demo cache's `CachedTeacherBlocks` (memory-mapped read, CRC-32
check and decode included; the cache was just written, so its pages are likely in the page cache), timed over
--read-batches batches after a warm-up; against the cached distillation run's consumption on this machine, the
median `tokens_per_s` of its `train` records (log windows of 10 steps, the first excluded; the trainer's
tokens = sequences x L, the unit used here too). Goal: >= 20x. For reference, the `decode_records` rate of
synthetic k=64, V=128256 records (16 x 2047 per call, median of 5 calls).

Table 4, demo quality: `sapling distill experiment=demo hooks.pre=[prune]` on the trained demo teacher for
--steps steps, (a) from the online teacher, (b) with `teacher.cache=<cache>` (k=64, written here by
`run_cache_teacher` from the same teacher, corpus and data settings: the data fingerprint is checked) and
`teacher.path` for the pruning; once with the demo's loss (`distill.ce_weight` from conf/experiment/demo.yaml,
the goal's row) and once more per extra --ce-weights value (default 0: pure logit distillation, where the
top-k loss's unconstrained tail shows most). Same pruned student (the validation loss right after pruning is shown), same data
order (trainer.seed 0). Validation loss is the mean next-token NLL (nats/token) over the whole held-out split;
goal: the cached student within 2% of the online one. Wall time of each run (pruning, training and evaluation)
and the one-time cost of writing the cache. Every run goes through the Python API (`sapling.recipes`), so the
benchmark measures what users run. Below it, where any difference comes from, measured on the saved students
(and the teacher) over the validation split: NLL on the positions whose next token is in the teacher's top-k
and on the others, mean KL(teacher || model) over the full vocabulary and over the k+1 buckets the cached loss
sees, and the model's mass on the teacher's top-k. A last section lists each goal, met or not.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_assets import (  # noqa: E402  (benchmarks/ is not a package)
    TARGET_KEYS,
    DemoAssets,
    Reference,
    add_demo_arguments,
    compose_cfg,
    demo_overrides,
    distill_overrides,
    events,
    quick_defaults,
    reference,
    start_benchmark,
)
from machine import cpu_model, git_commit  # noqa: E402

from sapling.data import ResumableLoader
from sapling.distill.teacher_cache import ShardGeometry, TeacherCache, teacher_topk
from sapling.distill.topk_format import (
    DEFAULT_VALUE_BITS,
    RecordLayout,
    decode_codes,
    decode_records,
    dequantize_nll,
    encode_records,
    naive_bytes_per_token,
)
from sapling.models import decoder_and_head, final_hidden
from sapling.recipes.cache_teacher import run_cache_teacher
from sapling.recipes.distill import run_distill

BYTES_K = (16, 64)
BYTES_V = (32000, 128256)
LONG_SEQ = 2048  # seq_len of the on-disk figures in table 1
FIDELITY_K = (16, 64)
VALUE_BITS = (8, 10, 12, 16)
CACHE_K = 64  # the demo cache's k (the goals' k)
BYTES_GOAL = 1 / 3
READ_GOAL = 20.0
QUALITY_GOAL = 0.02
READ_MICRO_BATCH = 16


# ---------------------------------------------------------------------------------------------------- table 1


def synthetic_topk(n: int, k: int, vocab: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n plausible top-k entries: sorted log-probs with a random tail mass, k distinct indices per row."""
    z = np.sort(rng.normal(0.0, 2.0, size=(n, k)), axis=1)[:, ::-1]
    log_tail = np.log(rng.uniform(0.01, 0.5, size=n))
    lse = np.log(np.exp(z - z[:, :1]).sum(axis=1, keepdims=True)) + z[:, :1]
    logp = z - lse + np.log1p(-np.exp(log_tail))[:, None]
    idx = np.stack([rng.choice(vocab, size=k, replace=False) for _ in range(n)])
    return logp.astype(np.float32), idx.astype(np.int64), log_tail.astype(np.float32)


def on_disk_bytes_per_token(layout: RecordLayout, seq_len: int) -> float:
    """Shard bytes per predicted token (token ids, records, CRC-32) for sequences of `seq_len`."""
    dtype = np.dtype(np.uint16 if layout.vocab_size < 2**16 else np.uint32)
    geo = ShardGeometry(seq_len, 1, 1, dtype, layout.record_bytes)
    return geo.shard_bytes(0) / (seq_len - 1)


def bytes_rows(rng: np.random.Generator) -> list[dict[str, Any]]:
    """Table 1: record and on-disk bytes per token, measured on encoded synthetic records."""
    rows = []
    for k in BYTES_K:
        for vocab in BYTES_V:
            layout = RecordLayout(k, vocab)
            n = LONG_SEQ - 1
            lp, idx, tail = synthetic_topk(n, k, vocab, rng)
            records = encode_records(lp, idx, tail, layout)
            measured = records.nbytes / n
            if measured != layout.record_bytes:
                raise RuntimeError(f"k={k} V={vocab}: encoded {measured} bytes/record, layout says {layout.record_bytes}")
            _, got_idx = decode_records(records, layout)
            if not np.array_equal(got_idx.numpy(), idx):
                raise RuntimeError(f"k={k} V={vocab}: indices do not round-trip")
            disk = on_disk_bytes_per_token(layout, LONG_SEQ)
            naive = naive_bytes_per_token(k)
            rows.append({"k": k, "vocab": vocab, "index_bits": layout.index_bits, "record_bytes": measured,
                         "disk_bytes": disk, "naive_bytes": naive, "ratio": disk / naive})
    return rows


def bytes_table(rows: list[dict[str, Any]], manifest: dict[str, Any]) -> str:
    lines = ["| k | V | index bits | record bytes (measured) | on-disk bytes/token at L=2048 | naive bytes/token "
             "(fp32 + int64) | on-disk / naive | <= 1/3 of naive |", "|" + "---|" * 8]
    for r in rows:
        met = "yes" if r["ratio"] <= BYTES_GOAL else "no"
        lines.append(f"| {r['k']} | {r['vocab']:,} | {r['index_bits']} | {r['record_bytes']:.0f} | "
                     f"{r['disk_bytes']:.2f} | {r['naive_bytes']} | {r['ratio']:.3f} | "
                     f"{met if r['k'] == CACHE_K else met + ' (goal is at k=64)'} |")
    lay = manifest["layout"]
    naive = naive_bytes_per_token(int(manifest["top_k"]))
    lines += ["", "On-disk figures include the token ids and checksums; the naive layout counts the top-k alone.",
              "", f"Demo cache written by this run (k={manifest['top_k']}, V={lay['vocab_size']:,}, "
              f"{lay['index_bits']}-bit indices, {lay['value_bits']}-bit values, seq_len {manifest['seq_len']}): "
              f"record {lay['record_bytes']} bytes; manifest bytes_per_token {manifest['bytes_per_token']:.2f} "
              f"(total {manifest['total_bytes']:,} bytes, {len(manifest['shards'])} shards) vs naive {naive}: "
              f"{manifest['bytes_per_token'] / naive:.3f} of naive"]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- table 2


def _kl_rows(logp_full: torch.Tensor, lp: torch.Tensor, idx: torch.Tensor, log_tail: torch.Tensor) -> torch.Tensor:
    """Per-row KL(p_full || q), q = exp(lp) on idx and exp(log_tail) spread uniformly over the other tokens."""
    vocab, k = logp_full.shape[1], idx.shape[1]
    logq = (log_tail.double() - math.log(vocab - k))[:, None].expand(-1, vocab).clone()
    logq.scatter_(1, idx, lp.double())
    return (logp_full.exp() * (logp_full - logq)).sum(dim=1)


def _decoded(lp: torch.Tensor, idx: torch.Tensor, log_tail: torch.Tensor,
             layout: RecordLayout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log-probs, indices, log tail) as a student reads them back from the cache's records."""
    records = encode_records(lp, idx, log_tail, layout)
    dlp, didx = decode_records(records, layout)
    dtail = torch.from_numpy(dequantize_nll(decode_codes(records, layout)[2], layout))
    return dlp, didx, dtail


def _bucket_kl(lp: torch.Tensor, log_tail: torch.Tensor, dlp: torch.Tensor, dtail: torch.Tensor) -> torch.Tensor:
    """Per-row KL over the k+1 buckets (top-k entries, tail): exact teacher (renormalised) vs `dlp`, `dtail`
    (the decoded record, or a student's log-probs gathered into the same buckets)."""
    exact = torch.cat([lp.double(), log_tail.double()[:, None]], dim=1)
    exact = exact - exact.logsumexp(dim=1, keepdim=True)  # float32 top-k: renormalise in float64
    dec = torch.cat([dlp.double(), dtail.double()[:, None]], dim=1)
    return (exact.exp() * (exact - dec)).sum(dim=1)


@torch.no_grad()
def fidelity(ref: Reference, temperature: float, max_batches: int | None) -> dict[str, Any]:
    """Table 2: mean KLs between the teacher's full distribution and its cached form, over validation positions."""
    teacher = ref.teacher.eval()
    _, head = decoder_and_head(teacher)
    vocab = head.out_features
    sums: dict[str, float] = {}
    count = 0

    def add(key: str, values: torch.Tensor) -> None:
        sums[key] = sums.get(key, 0.0) + float(values.sum())

    n_batches = math.ceil(len(ref.val) / ref.micro_batch_size)
    for b in range(n_batches if max_batches is None else min(n_batches, max_batches)):
        rows = range(b * ref.micro_batch_size, min(len(ref.val), (b + 1) * ref.micro_batch_size))
        ids = torch.stack([ref.val[i] for i in rows]).to(ref.device)
        logits = torch.nn.functional.linear(final_hidden(teacher, ids), head.weight, head.bias).double()
        logp_full = torch.log_softmax(logits / temperature, dim=-1).cpu()
        count += logp_full.shape[0]
        for k in FIDELITY_K:
            lp, idx, tail = (x.cpu() for x in teacher_topk(teacher, ids, k, temperature))
            add(f"mass_{k}", lp.double().exp().sum(dim=1))
            add(f"trunc_{k}", _kl_rows(logp_full, lp, idx, tail))
            for bits in VALUE_BITS if k == CACHE_K else (DEFAULT_VALUE_BITS,):
                dlp, didx, dtail = _decoded(lp, idx, tail, RecordLayout(k, vocab, bits))
                add(f"full_{k}_{bits}", _kl_rows(logp_full, dlp, didx, dtail))
                add(f"quant_{k}_{bits}", _bucket_kl(lp, tail, dlp, dtail))
    return {"vocab": vocab, "positions": count, **{key: s / count for key, s in sums.items()}}


def fidelity_tables(fid: dict[str, Any]) -> tuple[str, str]:
    bits = DEFAULT_VALUE_BITS
    lines = [f"| k | teacher's mean top-k mass | mean KL(p_full \\|\\| q), {bits}-bit values (nats/token) | "
             "mean KL with exact top-k + tail (truncation only) | difference (quantization) |", "|" + "---|" * 5]
    for k in FIDELITY_K:
        full, trunc = fid[f"full_{k}_{bits}"], fid[f"trunc_{k}"]
        lines.append(f"| {k} | {fid[f'mass_{k}']:.4f} | {full:.4e} | {trunc:.4e} | {full - trunc:+.1e} |")
    big = RecordLayout(CACHE_K, BYTES_V[-1])
    width = ["| value bits | quantization step (nats) | quantization-only KL over the k+1 buckets | "
             f"mean KL(p_full \\|\\| q) | record bytes at V={big.vocab_size:,} | on-disk / naive at V={big.vocab_size:,}, "
             f"L={LONG_SEQ} |", "|" + "---|" * 6]
    for b in VALUE_BITS:
        lay = RecordLayout(CACHE_K, big.vocab_size, b)
        ratio = on_disk_bytes_per_token(lay, LONG_SEQ) / naive_bytes_per_token(CACHE_K)
        mark = " (default)" if b == bits else ""
        width.append(f"| {b}{mark} | {lay.step:.2e} | {fid[f'quant_{CACHE_K}_{b}']:.3e} | "
                     f"{fid[f'full_{CACHE_K}_{b}']:.3e} | {lay.record_bytes} | {ratio:.3f} |")
    return "\n".join(lines), "\n".join(width)


# ---------------------------------------------------------------------------------------------------- table 3


def read_throughput(cache_dir: Path, batches: int, warmup: int, seed: int) -> dict[str, float]:
    """Tokens/s of the trainer's shuffled loader over the cache (read, CRC, decode), after a warm-up."""
    blocks = TeacherCache(cache_dir, verify=False).packed_data().train
    it = iter(ResumableLoader(blocks, READ_MICRO_BATCH, seed=seed))
    for _ in range(warmup):
        blocks.decode(next(it))
    tokens, t0 = 0, time.perf_counter()
    for _ in range(batches):
        batch = blocks.decode(next(it))  # what the training loop does (on CPU here)
        tokens += batch["input_ids"].numel()
    wall = time.perf_counter() - t0
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall, "batches": batches}


def decode_rate(rng: np.random.Generator, repeats: int = 5) -> dict[str, float]:
    """`decode_records` tokens/s on synthetic k=64, V=128256 records, 16 x 2047 per call."""
    layout = RecordLayout(CACHE_K, BYTES_V[-1])
    n = READ_MICRO_BATCH * (LONG_SEQ - 1)
    records = encode_records(*synthetic_topk(n, CACHE_K, layout.vocab_size, rng), layout)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        decode_records(records, layout)
        times.append(time.perf_counter() - t0)
    return {"records": n, "tokens_per_s": n / statistics.median(times), "record_bytes": layout.record_bytes}


def train_tokens_per_s(out: Path) -> float:
    """Median trainer tokens/s over the log windows of a run, the first window (warm-up) excluded."""
    rates = [e["tokens_per_s"] for e in events(out) if e.get("event") == "train"]
    return statistics.median(rates[1:] if len(rates) > 1 else rates)


def read_table(read: dict[str, float], dec: dict[str, float], train_rate: float) -> str:
    ratio = read["tokens_per_s"] / train_rate
    return "\n".join([
        "| measurement | tokens/s | multiple of the training step's consumption | goal |",
        "|---|---|---|---|",
        f"| cache read: ResumableLoader over CachedTeacherBlocks, micro batch {READ_MICRO_BATCH}, shuffled "
        f"({read['batches']} batches, {read['wall_s']:.2f} s) | {read['tokens_per_s']:,.0f} | {ratio:.1f}x | "
        f">= {READ_GOAL:.0f}x: {'met' if ratio >= READ_GOAL else 'NOT met'} |",
        f"| training step, cached distillation run (median tokens_per_s) | {train_rate:,.0f} | 1.0x | |",
        f"| decode_records alone, synthetic k={CACHE_K} V={BYTES_V[-1]:,} ({dec['record_bytes']}-byte records, "
        f"{dec['records']:,} per call) | {dec['tokens_per_s']:,.0f} | {dec['tokens_per_s'] / train_rate:.1f}x | |",
    ])


# ---------------------------------------------------------------------------------------------------- table 4


def fresh(path: Path) -> Path:
    """`path`, emptied: every measured run starts from nothing (no resume, no cache reuse)."""
    if path.exists():
        shutil.rmtree(path)
    return path


def write_cache(cfg: DictConfig) -> dict[str, Any]:
    """`sapling cache-teacher` through the Python API; its manifest and one-time cost."""
    fresh(Path(cfg.cache.dir))
    fresh(Path(cfg.output_dir))
    print(f"[cache-teacher] top_k={cfg.cache.top_k} -> {cfg.cache.dir}", flush=True)
    t0 = time.perf_counter()
    manifest = run_cache_teacher(cfg)
    wall = time.perf_counter() - t0
    done = [e for e in events(Path(cfg.output_dir)) if e.get("event") == "done"][-1]
    print(f"[cache-teacher] {done['tokens']:,} tokens, {manifest['total_bytes'] / 1e6:.1f} MB, {wall:.0f} s",
          flush=True)
    return {"manifest": manifest, "wall_s": wall, "pass_wall_s": done["wall_s"], "tokens": done["tokens"],
            "tokens_per_s": done["tokens"] / done["wall_s"]}


def distill_run(name: str, cfg: DictConfig, ref: Reference) -> dict[str, Any]:
    """One `sapling distill ... hooks.pre=[prune]` run; losses and speed read back from its metrics.jsonl."""
    out = fresh(Path(cfg.output_dir))
    print(f"[{name}] sapling distill ... {'teacher.cache=' + cfg.teacher.cache if cfg.teacher.cache else ''}",
          flush=True)
    t0 = time.perf_counter()
    result = run_distill(cfg)
    wall = time.perf_counter() - t0
    run_events = events(out)
    prune = [e for e in run_events if e.get("event") == "prune"][-1]
    done = [e for e in run_events if e.get("event") == "done"][-1]
    if result.final_val.get("tokens") != ref.val_tokens:
        raise RuntimeError(f"{name}: validated on {result.final_val.get('tokens')} tokens, the teacher on "
                           f"{ref.val_tokens}: not the same validation split")
    row = {"name": name, "val_loss": result.final_val["loss"], "val_ppl": result.final_val["ppl"],
           "after_prune": prune.get("val_loss"), "student_params": prune.get("student_params"),
           "shape": {k: prune.get(f"student_{k}") for k in TARGET_KEYS}, "steps": result.steps, "wall_s": wall,
           "train_wall_s": done["wall_s"], "tokens_per_s": train_tokens_per_s(out), "output_dir": str(out),
           "model_dir": str(result.model_dir)}
    print(f"[{name}] val loss after pruning {row['after_prune']:.4f}, after {row['steps']} steps "
          f"{row['val_loss']:.4f} ({wall:.0f} s)", flush=True)
    return row


def quality_table(pairs: list[tuple[float, dict[str, Any], dict[str, Any]]], cache: dict[str, Any]) -> str:
    """One pair of rows (online, cached) per CE weight; the first pair is the demo's configuration."""
    lines = ["| distill.ce_weight | student | val loss after pruning | val loss after distillation | val perplexity | "
             "relative to online | run wall s | training wall s | training tokens/s (median) |",
             "|" + "---|" * 9]
    for i, (ce, online, cached) in enumerate(pairs):
        label = f"{ce:g}" + (" (demo)" if i == 0 else "")
        for r in (online, cached):
            rr = (r["val_loss"] - online["val_loss"]) / online["val_loss"]
            lines.append(f"| {label} | {r['name']} | {r['after_prune']:.4f} | {r['val_loss']:.4f} | "
                         f"{r['val_ppl']:.2f} | {rr:+.2%} | {r['wall_s']:.0f} | {r['train_wall_s']:.0f} | "
                         f"{r['tokens_per_s']:,.0f} |")
    lines.append("")
    for i, (ce, online, cached) in enumerate(pairs):
        rel = (cached["val_loss"] - online["val_loss"]) / online["val_loss"]
        verdict = f"goal: within {QUALITY_GOAL:.0%}: {'met' if abs(rel) <= QUALITY_GOAL else 'NOT met'}" if i == 0 \
            else "not the goal's configuration"
        lines.append(f"Cached vs online validation loss at ce_weight {ce:g}: {rel:+.2%} ({verdict}).")
    lines += ["", f"One-time cost of writing the cache (`run_cache_teacher`, k={cache['manifest']['top_k']}): "
              f"{cache['wall_s']:.0f} s in all, teacher pass {cache['pass_wall_s']:.0f} s for {cache['tokens']:,} "
              f"predicted tokens ({cache['tokens_per_s']:,.0f} tokens/s), {cache['manifest']['total_bytes'] / 1e6:.1f} MB."]
    return "\n".join(lines)


@torch.no_grad()
def gap_breakdown(ref: Reference, runs: list[dict[str, Any]], k: int, temperature: float) -> list[dict[str, Any]]:
    """Table 4b: each model's validation NLL split by whether the next token is in the teacher's top-k, its
    mean KL from the teacher over the full vocabulary and over the k+1 buckets the cached loss sees, and its
    mass on the teacher's top-k. The teacher's own row is the reference."""
    teacher = ref.teacher.eval()
    models = {"teacher": teacher}
    for r in runs:
        models[r["name"]] = AutoModelForCausalLM.from_pretrained(r["model_dir"], dtype=torch.float32).to(ref.device)
    keys = ("nll_in", "nll_out", "nll", "kl_full", "kl_buckets", "mass")
    sums = {name: dict.fromkeys(keys, 0.0) for name in models}
    n_in = n = 0
    for b in range(math.ceil(len(ref.val) / ref.micro_batch_size)):
        rows = range(b * ref.micro_batch_size, min(len(ref.val), (b + 1) * ref.micro_batch_size))
        ids = torch.stack([ref.val[i] for i in rows]).to(ref.device)
        targets = ids[:, 1:].reshape(-1, 1).cpu()
        lp_t, idx_t, tail_t = (x.cpu() for x in teacher_topk(teacher, ids, k, temperature))
        in_top = (idx_t == targets).any(dim=1)
        n_in, n = n_in + int(in_top.sum()), n + len(targets)
        p_t = None
        for name, model in models.items():
            model.eval()
            _, head = decoder_and_head(model)
            logits = torch.nn.functional.linear(final_hidden(model, ids), head.weight, head.bias).double().cpu()
            nll = -torch.log_softmax(logits, dim=-1).gather(1, targets)[:, 0]
            logp = torch.log_softmax(logits / temperature, dim=-1)
            if p_t is None:  # the teacher comes first
                p_t = logp
            s_top = logp.gather(1, idx_t)
            s_tail = logp.scatter(1, idx_t, float("-inf")).logsumexp(dim=1)
            acc = sums[name]
            acc["nll_in"] += float(nll[in_top].sum())
            acc["nll_out"] += float(nll[~in_top].sum())
            acc["nll"] += float(nll.sum())
            acc["kl_full"] += float((p_t.exp() * (p_t - logp)).sum())
            acc["kl_buckets"] += float(_bucket_kl(lp_t, tail_t, s_top, s_tail).sum())
            acc["mass"] += float(s_top.exp().sum())
    out = []
    for name, acc in sums.items():
        out.append({"name": name, "share_in": n_in / n, "nll_in": acc["nll_in"] / max(1, n_in),
                    "nll_out": acc["nll_out"] / max(1, n - n_in), "nll": acc["nll"] / n,
                    "kl_full": acc["kl_full"] / n, "kl_buckets": acc["kl_buckets"] / n, "mass": acc["mass"] / n})
    return out


def gap_table(rows: list[dict[str, Any]], k: int) -> str:
    share = rows[0]["share_in"]
    lines = [f"| model | val NLL, next token in the teacher's top-{k} ({share:.1%} of positions) | val NLL, next "
             f"token outside it ({1 - share:.1%}) | val NLL, all | mean KL(teacher \\|\\| model), full vocabulary | "
             f"mean KL over the {k}+1 buckets (what the cached loss sees) | mass on the teacher's top-{k} |",
             "|" + "---|" * 7]
    for r in rows:
        lines.append(f"| {r['name']} | {r['nll_in']:.4f} | {r['nll_out']:.4f} | {r['nll']:.4f} | {r['kl_full']:.4f} | "
                     f"{r['kl_buckets']:.4f} | {r['mass']:.4f} |")
    return "\n".join(lines)


def goals(rows: list[dict[str, Any]], read_ratio: float, online: dict[str, Any], cached: dict[str, Any]) -> list[str]:
    """One line per goal of the issue: the figure, the goal, met or not."""
    out = []
    for r in rows:
        if r["k"] == CACHE_K:
            out.append(f"- bytes per token, k={CACHE_K}, V={r['vocab']:,}: {r['disk_bytes']:.2f} on disk vs "
                       f"{r['naive_bytes']} naive = {r['ratio']:.3f} (goal <= 1/3): "
                       f"{'met' if r['ratio'] <= BYTES_GOAL else 'NOT met'}")
    out.append(f"- cache read throughput: {read_ratio:.1f}x the training step's consumption (goal >= "
               f"{READ_GOAL:.0f}x): {'met' if read_ratio >= READ_GOAL else 'NOT met'}")
    rel = (cached["val_loss"] - online["val_loss"]) / online["val_loss"]
    out.append(f"- demo student from the cache (k={CACHE_K}) vs from the online teacher, {cached['steps']} steps: "
               f"val loss {cached['val_loss']:.4f} vs {online['val_loss']:.4f}, {rel:+.2%} (goal within "
               f"{QUALITY_GOAL:.0%}): {'met' if abs(rel) <= QUALITY_GOAL else 'NOT met'}")
    return out


# ---------------------------------------------------------------------------------------------------- main


def demo_target() -> dict[str, int]:
    """The demo's prune target (conf/experiment/demo.yaml)."""
    target = compose_cfg("experiment=demo", "output_dir=/tmp").prune.target
    return {k: target[k] for k in TARGET_KEYS if target.get(k) is not None}


def header(args: argparse.Namespace, assets: DemoAssets, ref: Reference, cfg: DictConfig, target: dict[str, int],
           wall_s: float) -> str:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    d, t = cfg.data, cfg.trainer
    return "\n".join([
        "# Teacher-logit cache benchmark: bytes, fidelity, read throughput, demo quality",
        "",
        f"- command: `{' '.join(shlex.quote(a) for a in ['python', *sys.argv])}`",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}; git commit {git_commit()}",
        f"- machine: {cpu_model()}; os.cpu_count {os.cpu_count()}; torch threads {torch.get_num_threads()}; "
        f"torch {torch.__version__}; python {platform.python_version()}; load average at the end {load}; "
        f"wall time {wall_s / 60:.1f} min (the CPU may have been shared with other work)",
        f"- teacher: demo (conf/experiment/demo.yaml), {ref.params:,} parameters, vocabulary "
        f"{ref.teacher.config.vocab_size:,}, validation loss {ref.val_loss:.4f}; {assets.teacher_note}",
        f"- data: {assets.corpus.name}, seq_len {d.seq_len}, val_fraction {d.val_fraction}, max_tokens "
        f"{d.max_tokens}, data.seed {d.seed}; validation split {ref.val_tokens:,} predicted tokens",
        f"- students: `sapling distill experiment=demo hooks.pre=[prune]`, target {target}, {args.steps} steps, "
        f"micro batch {t.micro_batch_size}, lr {t.lr}, {cfg.distill.divergence} at T={cfg.distill.temperature}, "
        f"ce_weight {cfg.distill.ce_weight} (the demo's; table 4 adds --ce-weights {args.ce_weights}), "
        f"trainer.seed {t.seed}; cached run: `teacher.cache=<k={CACHE_K} cache>` plus `teacher.path` for pruning",
        "- how each table is measured: see the docstring of benchmarks/cache.py",
    ]) + "\n"


def run(args: argparse.Namespace) -> int:
    t_start = time.perf_counter()
    work, assets, extra = start_benchmark(args, "cache")
    rng = np.random.default_rng(0)
    target = demo_target()
    cache_dir = work / "teacher-cache"
    if args.max_tokens:
        extra.append(f"data.max_tokens={args.max_tokens}")
    # The cached runs' configs are composed once the cache exists (validation checks teacher.cache).
    cache_cfg = compose_cfg(*demo_overrides(assets, "cache-teacher", work / "cache-teacher"), f"cache.dir={cache_dir}",
                            f"cache.top_k={CACHE_K}", *extra)
    online_cfg = compose_cfg(*distill_overrides(assets, work / "online", args.steps, target, *extra))
    if OmegaConf.to_container(cache_cfg.data) != OmegaConf.to_container(online_cfg.data):
        raise RuntimeError("the cache-teacher and distill runs have different data settings")

    ref = reference(online_cfg)
    print(f"teacher: {ref.params:,} params, val loss {ref.val_loss:.4f} ({assets.teacher_note})", flush=True)

    rows = bytes_rows(rng)
    cache = write_cache(cache_cfg)
    table1 = bytes_table(rows, cache["manifest"])
    print("\n" + table1 + "\n", flush=True)

    fid = fidelity(ref, float(online_cfg.distill.temperature), args.fidelity_batches)
    table2, table2b = fidelity_tables(fid)
    print("\n" + table2 + "\n\n" + table2b + "\n", flush=True)

    demo_ce = float(online_cfg.distill.ce_weight)
    pairs = []
    for ce in [demo_ce, *(c for c in args.ce_weights if c != demo_ce)]:
        ce_args = [] if ce == demo_ce else [f"distill.ce_weight={ce}"]
        tag = "" if ce == demo_ce else f"-ce{ce:g}"
        on_cfg = compose_cfg(*distill_overrides(assets, work / f"online{tag}", args.steps, target, *extra, *ce_args))
        ca_cfg = compose_cfg(*distill_overrides(assets, work / f"cached{tag}", args.steps, target, *extra, *ce_args,
                                                f"teacher.cache={cache_dir}"))
        online = distill_run("online teacher", on_cfg, ref)
        cached = distill_run(f"teacher cache (k={CACHE_K})", ca_cfg, ref)
        if cached["shape"] != online["shape"]:
            raise RuntimeError(f"the runs pruned to different shapes: {online['shape']} vs {cached['shape']}")
        pairs.append((ce, online, cached))
    _, online, cached = pairs[0]

    read = read_throughput(cache_dir, args.read_batches, args.read_warmup, int(online_cfg.trainer.seed))
    dec = decode_rate(rng)
    table3 = read_table(read, dec, cached["tokens_per_s"])
    table4 = quality_table(pairs, cache)
    print("\n" + table3 + "\n\n" + table4 + "\n", flush=True)
    runs = []
    for ce, on, ca in pairs:
        runs += [{**on, "name": f"online teacher, ce_weight {ce:g}"}, {**ca, "name": f"cache k={CACHE_K}, ce_weight {ce:g}"}]
    table4b = gap_table(gap_breakdown(ref, runs, CACHE_K, float(online_cfg.distill.temperature)), CACHE_K)
    print(table4b + "\n", flush=True)
    summary = goals(rows, read["tokens_per_s"] / cached["tokens_per_s"], online, cached)
    print("\n".join(summary), flush=True)

    text = "\n".join([
        header(args, assets, ref, online_cfg, target, time.perf_counter() - t_start),
        "## 1. Bytes per token", "", table1, "",
        f"## 2. Fidelity (demo teacher, vocabulary {fid['vocab']:,}, {fid['positions']:,} validation positions)", "",
        table2, "", f"Value width at k={CACHE_K}:", "", table2b, "",
        "## 3. Read throughput vs the training step's consumption", "", table3, "",
        f"## 4. Demo quality: student from the cache (k={CACHE_K}) vs from the online teacher, {args.steps} steps",
        "", table4, "", "Where the difference is (validation split; the trained students' saved checkpoints):", "",
        table4b, "", "## Goals", "", *summary, "",
    ])
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"wrote {out}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300, help="distillation steps of both demo students")
    p.add_argument("--ce-weights", type=float, nargs="*", default=[0.0],
                   help="distill.ce_weight values run besides the demo's (table 4)")
    p.add_argument("--read-batches", type=int, default=300, help="timed loader batches (table 3)")
    p.add_argument("--read-warmup", type=int, default=10, help="untimed loader batches first")
    p.add_argument("--fidelity-batches", type=int, default=None, help="validation batches of table 2 (all: None)")
    p.add_argument("--max-tokens", type=int, default=None, help="data.max_tokens of every run (all of the corpus)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: a 20-step teacher (cached apart from the demo's), 10 steps, 200k tokens")
    p.add_argument("--out", default=None, help="write the markdown here")
    add_demo_arguments(p)
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.read_batches, args.read_warmup = 10, 30, 3
        args.max_tokens = args.max_tokens or 200_000
        quick_defaults(args)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
