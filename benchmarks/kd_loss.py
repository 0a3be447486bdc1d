"""Fused linear KD loss benchmark: naive torch vs ours (torch path, Triton on CUDA) vs Liger-Kernel.

    python benchmarks/kd_loss.py [--device cpu|cuda] [--n 1024 4096] [--repeats K]
                                 [--shapes design|gemma2|smollm2|smollm2_width] [--softcap CAP]
                                 [--out benchmarks/results/kd_loss_cpu.md]

The quantity is the same for every row: forward KL(p_t || p_s) at T = 1, no hard-label CE, mean over the
N tokens, for a student lm_head ``[V, Hs]`` (inputs and weight get gradients) and a frozen dense teacher
``[V, Ht]``. Rows:

- ``naive torch``: full ``[N, V]`` logits of both models in float32, ``F.kl_div(log_target=True)``, autograd.
- ``ours (torch)``: ``sapling.kernels.fused_linear_kd_loss`` with the torch chunk function.
- ``ours (Triton)``: the same with the Triton chunk kernel (CUDA only).
- ``Liger (compiled)``: ``liger_kernel.chunked_loss.LigerFusedLinearJSDLoss`` (optional ``bench`` extra) with
  ``beta=0`` (Liger's generalised JSD at beta=0 is ``kl_div(log p_s, log p_t)`` = KL(p_t || p_s)),
  ``weight_soft_loss=1``, ``weight_hard_loss=0`` (its CE is then not even computed), ``temperature=1`` (Liger
  applies no T^2; irrelevant at T = 1), labels all valid (it divides by their count = N), its defaults
  otherwise (``compiled=True``, ``chunk_size=1024``). torch.compile warm-up happens before any timing.

``--shapes smollm2`` / ``smollm2_width``: the real SmolLM2-135M teacher's head (Hs=Ht=576, V=49,152) teaching a
depth-pruned student of the same width, or a width-pruned one (Hs=432); `benchmarks/peers/loss.py` runs them
beside the DESIGN shapes.

``--softcap CAP`` (``--shapes gemma2``: Gemma 2's 2B student / 9B teacher widths, V=256000, CAP=30) makes
both models' logits ``CAP * tanh(z / CAP)``, as Gemma 2/3 compute them: the naive row applies it to its full
logits, ours passes ``LogitTransform(softcap=CAP)`` for student and teacher, the float64 reference includes
it, and Liger is skipped (its fused loss takes no logit transform: it would compute another model's loss).

Columns: median fwd+bwd time over ``--repeats`` calls after warm-up (variants interleaved in one process,
order rotated per repeat; the time ratio is the median of the per-repeat ratios against naive, which is
robust to load from other processes), peak memory (each variant in a fresh process, after its warm-up:
CPU = peak RSS growth over the baseline after inputs and warm-up, with ``MALLOC_MMAP_THRESHOLD_=65536`` so
freed tensors go back to the OS; CUDA = ``max_memory_allocated`` minus the baseline), and the max relative
error ``||x - ref|| / ||ref||`` over {loss, d hidden, d weight} against a float64 computation on the same
(rounded) inputs. On CUDA also achieved TFLOP/s with ``(2*Ht + 6*Hs)*N*V`` FLOPs per call, as % of a bf16
matmul measured in the same run and of the H100 SXM datasheet (989 TFLOP/s dense bf16).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

CPU_SHAPES = dict(hs=512, ht=1024, vocab=32000, n=[1024, 4096], dtype="float32")
GPU_SHAPES = dict(hs=2048, ht=4096, vocab=128256, n=[1024, 2048, 4096, 8192], dtype="bfloat16")
# Gemma 2: 2B (hidden 2304) student, 9B (hidden 3584) teacher, 256k vocabulary, final logits softcapped at 30
GEMMA2_SHAPES = dict(hs=2304, ht=3584, vocab=256000, softcap=30.0)
# SmolLM2-135M (hidden 576, V=49,152) teaching a depth-pruned student (same width) or a width-pruned one (432)
REAL_SHAPES = {"smollm2": dict(hs=576, ht=576, vocab=49152), "smollm2_width": dict(hs=432, ht=576, vocab=49152)}
H100_BF16_TFLOPS = 989.0
VARIANTS = ("naive", "ours_torch", "ours_triton", "liger")
LABELS = {
    "naive": "naive torch (fp32 logits + torch KL)",
    "ours_torch": "ours (torch path)",
    "ours_triton": "ours (Triton)",
    "liger": "Liger `LigerFusedLinearJSDLoss` (compiled, beta=0)",
}
REF_CHUNK = 256
RESULT_TAG = "RESULT "
from machine import cpu_model  # noqa: E402  (benchmarks/, the script's own folder)

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------
# inputs and the variants
# ----------------------------------------------------------------------------------------------------


def make_inputs(n: int, hs: int, ht: int, vocab: int, dtype: torch.dtype, device: str, seed: int = 0):
    """Hidden states ~ N(0, 1), weights scaled so that logits have std ~2 (peaked but not one-hot)."""
    g = torch.Generator().manual_seed(seed)
    h_s = torch.randn(n, hs, generator=g)
    w_s = torch.randn(vocab, hs, generator=g) * (2.0 / hs**0.5)
    h_t = torch.randn(n, ht, generator=g)
    w_t = torch.randn(vocab, ht, generator=g) * (2.5 / ht**0.5)
    labels = torch.randint(0, vocab, (n,), generator=g)
    out = [x.to(device=device, dtype=dtype) for x in (h_s, w_s, h_t, w_t)]
    out[0].requires_grad_(True)
    out[1].requires_grad_(True)
    return (*out, labels.to(device))


def naive_loss(h_s, w_s, h_t, w_t, labels, softcap: float | None = None):
    z_s = (h_s @ w_s.t()).float()
    with torch.no_grad():
        z_t = (h_t @ w_t.t()).float()
    if softcap is not None:  # as Gemma 2/3 compute their logits
        z_s = torch.tanh(z_s / softcap) * softcap
        z_t = torch.tanh(z_t / softcap) * softcap
    lp_s = F.log_softmax(z_s, dim=-1)
    lp_t = F.log_softmax(z_t, dim=-1)
    return F.kl_div(lp_s, lp_t, reduction="batchmean", log_target=True)  # sum KL(p_t || p_s) / N


@contextlib.contextmanager
def _torch_chunk_path():
    """Force the torch chunk function (ours (torch) on CUDA, where the Triton kernel is the default)."""
    from sapling.kernels import fused_kd_loss

    saved = fused_kd_loss._triton_chunk_fn
    fused_kd_loss._triton_chunk_fn = lambda: None
    try:
        yield
    finally:
        fused_kd_loss._triton_chunk_fn = saved


def build_variant(name: str, device: str, softcap: float | None = None):
    """A callable ``fn(h_s, w_s, h_t, w_t, labels) -> loss``; raises RuntimeError('skipped: ...') if n/a."""
    if name == "naive":
        return lambda *inputs: naive_loss(*inputs, softcap=softcap)
    if name in ("ours_torch", "ours_triton"):
        from sapling.kernels import LogitTransform, fused_linear_kd_loss

        xf = None if softcap is None else LogitTransform(softcap=softcap)

        if name == "ours_triton":
            if device != "cuda":
                raise RuntimeError(
                    "skipped: needs CUDA (on CPU the Triton kernel only runs under TRITON_INTERPRET=1, "
                    "far too slow at these shapes)"
                )
            from sapling.kernels.fused_kd_loss import _triton_chunk_fn

            if _triton_chunk_fn() is None:
                raise RuntimeError("skipped: Triton chunk kernel not importable")

        def ours(h_s, w_s, h_t, w_t, labels):
            ctx = _torch_chunk_path() if name == "ours_torch" else contextlib.nullcontext()
            with ctx:
                return fused_linear_kd_loss(h_s, w_s, h_t, w_t, divergence="forward_kl", temperature=1.0,
                                            student_logit_transform=xf, teacher_logit_transform=xf)

        return ours
    if name == "liger":
        if softcap is not None:
            raise RuntimeError("skipped: Liger's fused loss takes no logit softcap (it would be another model's loss)")
        try:
            from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
        except Exception as e:  # not installed (benchmark-only extra) or broken import
            raise RuntimeError(f"skipped: liger-kernel not importable ({type(e).__name__}: {e})") from None
        mod = LigerFusedLinearJSDLoss(
            weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.0, temperature=1.0, compiled=True
        )

        def liger(h_s, w_s, h_t, w_t, labels):
            return mod(h_s, w_s, h_t, w_t, labels)

        return liger
    raise ValueError(name)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def fwd_bwd(fn, inputs, device: str):
    h_s, w_s = inputs[0], inputs[1]
    h_s.grad = None
    w_s.grad = None
    loss = fn(*inputs)
    loss.backward()
    _sync(device)
    return loss


# ----------------------------------------------------------------------------------------------------
# float64 reference (chunked, analytic forward-KL gradient: d/dz_s sum KL(p_t || p_s) = p_s - p_t)
# ----------------------------------------------------------------------------------------------------


def reference64(h_s, w_s, h_t, w_t, softcap: float | None = None):
    n = h_s.shape[0]
    w_s64 = w_s.detach().double()
    w_t64 = w_t.detach().double()
    loss = torch.zeros((), dtype=torch.float64, device=h_s.device)
    grad_h = torch.empty(h_s.shape, dtype=torch.float64, device=h_s.device)
    grad_w = torch.zeros(w_s.shape, dtype=torch.float64, device=h_s.device)
    for start in range(0, n, REF_CHUNK):
        hc = h_s.detach()[start : start + REF_CHUNK].double()
        z_s = hc @ w_s64.t()
        z_t = h_t[start : start + REF_CHUNK].double() @ w_t64.t()
        if softcap is not None:
            z_s, z_t = torch.tanh(z_s / softcap) * softcap, torch.tanh(z_t / softcap) * softcap
        lp_s = torch.log_softmax(z_s, dim=-1)
        lp_t = torch.log_softmax(z_t, dim=-1)
        p_t = lp_t.exp()
        loss += (p_t * (lp_t - lp_s)).sum()
        g = lp_s.exp_().sub_(p_t).div_(n)
        if softcap is not None:  # through the softcap: d z'/d z = 1 - (z'/cap)^2
            g.mul_(1.0 - (z_s / softcap) ** 2)
        grad_h[start : start + REF_CHUNK] = g @ w_s64
        grad_w.addmm_(g.t(), hc)
        del lp_s, lp_t, p_t, g
    return loss / n, grad_h, grad_w


def rel_errors(loss, grad_h, grad_w, ref) -> dict[str, float]:
    out = {}
    for key, x, r in (("loss", loss, ref[0]), ("grad_h", grad_h, ref[1]), ("grad_w", grad_w, ref[2])):
        out[key] = float((x.detach().double() - r).norm() / r.norm())
    return out


# ----------------------------------------------------------------------------------------------------
# workers (each in a fresh process)
# ----------------------------------------------------------------------------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (ru_maxrss / VmHWM) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def worker_mem(args) -> dict:
    """Peak memory of one fwd+bwd of one variant, after a warm-up call (compile, lazy inits)."""
    device, shapes = args.device, _shapes(args)
    fn = build_variant(args.variant, device, shapes.get("softcap"))
    inputs = make_inputs(args.n[0], shapes["hs"], shapes["ht"], shapes["vocab"], _dtype(shapes), device)
    loss = fwd_bwd(fn, inputs, device)  # warm-up
    del loss
    inputs[0].grad = None
    inputs[1].grad = None
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss = fwd_bwd(fn, inputs, device)
        peak = torch.cuda.max_memory_allocated() - base
        how = "torch.cuda.max_memory_allocated - baseline"
    else:
        reset_ok = _reset_peak_rss()
        base = _rss_bytes()
        loss = fwd_bwd(fn, inputs, device)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
        how = "ru_maxrss - statm RSS baseline" + ("" if reset_ok else " (HWM reset failed: includes warm-up)")
    del loss
    return {"peak_bytes": int(peak), "how": how}


def worker_time(args) -> dict:
    """All variants interleaved in one process: warm-up + errors vs float64, then timed repeats."""
    device, shapes = args.device, _shapes(args)
    inputs = make_inputs(args.n[0], shapes["hs"], shapes["ht"], shapes["vocab"], _dtype(shapes), device)
    ref = reference64(*inputs[:4], softcap=shapes.get("softcap"))
    fns, out = {}, {}
    for name in args.variant_list:
        try:
            fns[name] = build_variant(name, device, shapes.get("softcap"))
            t0 = time.perf_counter()
            loss = fwd_bwd(fns[name], inputs, device)  # warm-up (includes torch.compile for Liger)
            warm = time.perf_counter() - t0
            for _ in range(args.warmup - 1):
                loss = fwd_bwd(fns[name], inputs, device)
            err = rel_errors(loss, inputs[0].grad, inputs[1].grad, ref)
            out[name] = {"warmup_s": warm, "errors": err, "max_rel_err": max(err.values()), "times": []}
            del loss
        except Exception as e:
            fns.pop(name, None)
            msg = str(e) if str(e).startswith("skipped") else f"failed: {type(e).__name__}: {e}"
            out[name] = {"error": msg.splitlines()[0][:300]}
            if not msg.startswith("skipped"):
                traceback.print_exc()
        inputs[0].grad = None
        inputs[1].grad = None
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()  # e.g. after an out-of-memory naive run
    del ref
    names = list(fns)
    for r in range(args.repeats):
        order = names[r % len(names) :] + names[: r % len(names)] if names else []
        for name in order:
            t0 = time.perf_counter()
            loss = fwd_bwd(fns[name], inputs, device)
            out[name]["times"].append(time.perf_counter() - t0)
            del loss
            inputs[0].grad = None
            inputs[1].grad = None
    return out


def worker_peak(args) -> dict:
    """Practical bf16 matmul peak on this GPU: best of a few 8192^3 matmuls."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(10):
        t0 = time.perf_counter()
        for _ in range(5):
            a @ b
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / 5)
    return {"tflops": 2 * 8192**3 / best / 1e12, "name": torch.cuda.get_device_name()}


def _shapes(args) -> dict:
    """The shapes of `--shapes` on this device (DESIGN's CPU or GPU shapes, or Gemma 2's), `--softcap` applied."""
    base = GPU_SHAPES if args.device == "cuda" else CPU_SHAPES
    if args.shapes == "gemma2":
        base = {**base, **GEMMA2_SHAPES, "n": [1024, 4096]}
    elif args.shapes in REAL_SHAPES:
        base = {**base, **REAL_SHAPES[args.shapes], "n": [1024, 4096] if args.device == "cpu" else [4096, 8192]}
    softcap = args.softcap if args.softcap is not None else base.get("softcap")
    return {**base, "softcap": softcap}


def _dtype(shapes: dict) -> torch.dtype:
    return getattr(torch, shapes["dtype"])


# ----------------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------------


def _spawn(argv: list[str], env_extra: dict[str, str] | None = None, timeout: float = 3600) -> dict:
    env = {**os.environ, **(env_extra or {})}
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG) :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    return {"error": f"failed: worker exit {proc.returncode}: {tail[0][:300]}"}


def _liger_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("liger-kernel")
    except Exception:
        return None


def _fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def run(args) -> int:
    shapes = _shapes(args)
    ns = args.n or shapes["n"]
    variants = [v for v in VARIANTS if v in args.variants]
    dev_args = ["--device", args.device, "--shapes", args.shapes]
    if args.softcap is not None:
        dev_args += ["--softcap", str(args.softcap)]
    peak = None
    if args.device == "cuda":
        peak = _spawn(["--_worker", "peak", *dev_args])
        print(f"measured bf16 matmul peak: {peak}", flush=True)
    results: dict[int, dict] = {}
    for n in ns:
        print(f"N={n}: timing {', '.join(variants)} (interleaved, {args.repeats} repeats) ...", flush=True)
        t_res = _spawn(
            [
                "--_worker",
                "time",
                *dev_args,
                "--n",
                str(n),
                "--repeats",
                str(args.repeats),
                "--warmup",
                str(args.warmup),
                "--variants",
                *variants,
            ]
        )
        if "error" in t_res:  # the whole worker died: one error for every variant
            t_res = {v: {"error": t_res["error"]} for v in variants}
        for v in variants:
            if "error" in t_res[v]:
                continue
            print(f"N={n}: peak memory of {v} ...", flush=True)
            m = _spawn(
                ["--_worker", "mem", *dev_args, "--n", str(n), "--variant", v],
                env_extra={"MALLOC_MMAP_THRESHOLD_": "65536"},
            )
            t_res[v]["mem"] = m
        results[n] = t_res
        print(render_table(results, variants, shapes, peak, args.device), flush=True)

    table = render_table(results, variants, shapes, peak, args.device)
    goals = render_goals(results, variants)
    header = render_header(args, shapes, peak)
    text = f"{header}\n{table}\n\n{goals}\n"
    print("\n" + goals)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        out.with_suffix(".json").write_text(
            json.dumps({"shapes": shapes, "peak": peak, "results": results, "argv": sys.argv}, indent=1)
            + "\n"
        )
        print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


def _median_ratio(a: list[float], b: list[float]) -> float | None:
    if not a or not b:
        return None
    return statistics.median(x / y for x, y in zip(a, b))


def render_table(results: dict, variants: list[str], shapes: dict, peak: dict | None, device: str) -> str:
    cols = ["variant", "N", "median ms", "x naive (time)", "peak MiB", "x naive (mem)", "max rel err"]
    if device == "cuda":
        cols += ["TFLOP/s", "% measured bf16 peak", "% of 989 TFLOP/s"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for n, res in results.items():
        base = res.get("naive", {})
        base_mem = base.get("mem", {}).get("peak_bytes")
        for v in variants:
            r = res.get(v, {})
            if "error" in r:
                lines.append(f"| {LABELS[v]} | {n} | {r['error']} |" + " |" * (len(cols) - 3))
                continue
            med = statistics.median(r["times"])
            mem = r.get("mem", {})
            mem_b = mem.get("peak_bytes")
            mem_s = f"{mem_b / 2**20:.0f}" if mem_b is not None else mem.get("error", "-")
            mem_ratio = mem_b / base_mem if mem_b is not None and base_mem else None
            row = [
                LABELS[v],
                str(n),
                f"{med * 1e3:.1f}",
                _fmt_ratio(_median_ratio(r["times"], base.get("times", []))),
                mem_s,
                _fmt_ratio(mem_ratio),
                f"{r['max_rel_err']:.1e}",
            ]
            if device == "cuda":
                flops = (2 * shapes["ht"] + 6 * shapes["hs"]) * n * shapes["vocab"]
                tf = flops / med / 1e12
                pk = peak.get("tflops") if peak else None
                row += [
                    f"{tf:.0f}",
                    f"{100 * tf / pk:.0f}%" if pk else "-",
                    f"{100 * tf / H100_BF16_TFLOPS:.0f}%",
                ]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def render_goals(results: dict, variants: list[str]) -> str:
    out = ["Issue goals (largest N measured):"]
    if not results:
        return out[0] + " nothing measured"
    n = max(results)
    res = results[n]
    ours = res.get("ours_triton") if "times" in res.get("ours_triton", {}) else res.get("ours_torch", {})
    naive, liger = res.get("naive", {}), res.get("liger", {})
    ours_mem = ours.get("mem", {}).get("peak_bytes")
    naive_mem = naive.get("mem", {}).get("peak_bytes")
    if ours_mem is not None and naive_mem:
        r = ours_mem / naive_mem
        verdict = "MET" if r <= 0.25 else "NOT MET"
        out.append(f"- N={n}: our peak memory <= 1/4 of naive: {verdict} (ratio {r:.3f})")
    else:
        out.append(f"- N={n}: our peak memory <= 1/4 of naive: not measured")
    r = _median_ratio(ours.get("times", []), liger.get("times", []))
    if r is not None:
        verdict = "MET" if r <= 1.0 else "NOT MET"
        out.append(
            f"- N={n}: our time <= Liger's compiled chunked loss: {verdict} "
            f"(median per-repeat ratio ours/Liger {r:.2f}; medians {statistics.median(ours['times']) * 1e3:.0f} ms "
            f"vs {statistics.median(liger['times']) * 1e3:.0f} ms)"
        )
    else:
        out.append(f"- N={n}: our time <= Liger's: not measured ({liger.get('error', 'no Liger row')})")
    return "\n".join(out)


def render_header(args, shapes: dict, peak: dict | None) -> str:
    dev = cpu_model() if args.device == "cpu" else (peak or {}).get("name", "cuda")
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    lines = [
        "# Fused linear KD loss benchmark",
        "",
        f"- command: `{' '.join(shlex.quote(a) for a in ['python', *sys.argv])}`",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- device: {args.device} ({dev}); torch threads: {torch.get_num_threads()}; "
        f"os.cpu_count: {os.cpu_count()}; load average at the end: {load}",
        f"- torch {torch.__version__}; liger-kernel {_liger_version() or 'not installed'}; "
        f"python {platform.python_version()}",
        f"- shapes: Hs={shapes['hs']}, Ht={shapes['ht']}, V={shapes['vocab']}, {shapes['dtype']}; forward "
        "KL(p_t || p_s), T=1, no CE, all tokens valid; fwd+bwd, grads for student hidden and weight"
        + ("" if shapes.get("softcap") is None else
           f"; both models' logits softcapped at {shapes['softcap']:g} (`cap * tanh(z / cap)`, Gemma 2/3)"),
        f"- timing: median of {args.repeats} calls after {args.warmup} warm-up call(s), variants interleaved "
        "in one process (order rotated per repeat); 'x naive (time)' is the median of per-repeat ratios",
        "- memory: one call per variant in a fresh process after a warm-up call; "
        + (
            "peak RSS growth (ru_maxrss after resetting the high-water mark via /proc/self/clear_refs) over "
            "the RSS baseline after inputs + warm-up, MALLOC_MMAP_THRESHOLD_=65536; includes the returned grads"
            if args.device == "cpu"
            else "torch.cuda.max_memory_allocated minus the allocated baseline; includes the returned grads"
        ),
        "- error: max over {loss, d h_s, d W_s} of ||x - ref|| / ||ref||, ref = float64 on the same inputs",
        "- Liger semantics (0.8.5 source): beta=0 computes kl_div(log p_s, log p_t, log_target=True) = "
        "KL(p_t || p_s); weight_hard_loss=0 skips the CE; divides by #labels != ignore_index (= N); no T^2; "
        "chunk_size=1024, compiled=True (defaults)",
    ]
    if args.device == "cuda" and peak:
        lines.append(
            f"- bf16 peak: measured {peak.get('tflops', float('nan')):.0f} TFLOP/s (8192^3 matmul, this run); "
            f"H100 SXM datasheet {H100_BF16_TFLOPS:.0f}; FLOPs per call (2*Ht + 6*Hs)*N*V"
        )
    if args.device == "cpu":
        lines.append(
            "- note: other processes (e.g. a 2-process DeepSpeed test) may share the 2 cores; compare ratios "
            "(measured in the same run), not absolute times across runs"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    p.add_argument("--n", type=int, nargs="+", default=None, help="token counts (default: DESIGN shapes)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1, help="warm-up calls per variant before timing")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--shapes", choices=["design", "gemma2", *REAL_SHAPES], default="design",
                   help="design: DESIGN's CPU/GPU shapes; gemma2: Hs=2304, Ht=3584, V=256000, softcap 30; smollm2: "
                        "Hs=Ht=576, V=49152; smollm2_width: Hs=432, Ht=576, V=49152")
    p.add_argument("--softcap", type=float, default=None, help="softcap both models' logits at this value")
    p.add_argument("--out", default=None, help="write the markdown table (+ .json beside it) here")
    p.add_argument("--_worker", choices=["time", "mem", "peak"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    if args.shapes == "gemma2" and args.device == "cpu":
        p.error("--shapes gemma2 needs a GPU (its float32 weights and the float64 reference take ~30 GB); on CPU "
                "use --softcap 30 at the default shapes")
    if args._worker is None:
        return run(args)
    args.variant_list = args.variants
    try:
        res = {"time": worker_time, "mem": worker_mem, "peak": worker_peak}[args._worker](args)
    except Exception as e:
        msg = str(e) if str(e).startswith("skipped") else f"failed: {type(e).__name__}: {e}"
        traceback.print_exc()
        res = {"error": msg.splitlines()[0][:300]}
    print(RESULT_TAG + json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
