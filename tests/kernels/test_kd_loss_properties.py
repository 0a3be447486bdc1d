"""Property tests (hypothesis) of ``fused_linear_kd_loss`` (torch path) against independent float64 math.

Random shapes (N in [1, 40], V in [2, 150], Hs/Ht in [1, 24]), chunk sizes in [1, N + 3] (mostly not
dividing N), random ignore masks (all-ignored included), drawn divergence / beta / temperature /
kd_weight / ce_weight, optional biases, dense teacher or precomputed teacher logits, and sometimes logits
scaled up to ~1e4. Always: loss and gradients finite. Accuracy, as ``||x - ref|| / max(||ref||, floor)``
against float64 math on the same (rounded) inputs: <= 1e-5 for float32 inputs, <= 1e-2 for bfloat16 ones.

The float64 math here is written independently of ``sapling.kernels`` (log_softmax in float64, explicit
KL / JSD formulas, autograd for the gradients). It follows the documented contract of the loss: teacher
log-probs are clamped from below at ``LOG_TINY = log(2**-126)`` (this is part of the definition, and it
matters for reverse KL / JSD when the teacher gives a token less than 2**-126 that the student does not).

Why a floor under ``||ref||``: a float32 (bfloat16) evaluation has an *absolute* error proportional to the
scale of the numbers it works with -- the log-probs, ``|lp| <~ max|z| / T + log V`` -- not to the size of
the result. When the result is much smaller than that scale (a KL between two nearly equal distributions,
a gradient of a nearly matched row, everything zero because every row is ignored), a pure relative error
measures rounding of cancelled terms, not a bug. ``floor`` is a fixed fraction of that scale (see
``_floors``), so the check is a plain relative error whenever the result is not tiny compared with its
own inputs, and an absolute error of ``rtol * floor`` otherwise.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sapling.kernels import fused_linear_kd_loss

IGNORE = -100
LOG_TINY = math.log(2.0**-126)  # the smallest normal float32, as a log-prob floor (the loss's contract)
HUGE_LOGIT = 1.0e4

# Fraction of the natural scale used as the floor under ||ref|| (see the module docstring). float32: the
# absolute error of log-prob-level quantities is a few eps32 (6e-8) times the scale; 1e-5 * 0.05 = 5e-7
# leaves ~10x headroom. bfloat16: logits are rounded to 8 bits (relative 2**-9 ~ 2e-3) by the matmul
# before any float32 math, so the absolute error is ~2e-3 times the scale; 1e-2 * 0.5 = 5e-3 covers it.
FLOOR_FRACTION = {torch.float32: 0.05, torch.bfloat16: 0.5}
RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}

SETTINGS = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


# ----------------------------------------------------------------------------------------------------
# independent float64 math
# ----------------------------------------------------------------------------------------------------


def _kl(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row, from log-probs."""
    return (lp.exp() * (lp - lq)).sum(-1)


def divergence64(lp_s: torch.Tensor, lp_t: torch.Tensor, divergence: str, beta: float) -> torch.Tensor:
    if divergence == "forward_kl":
        return _kl(lp_t, lp_s)
    if divergence == "reverse_kl":
        return _kl(lp_s, lp_t)
    # generalised JSD with m = beta * p_t + (1 - beta) * p_s
    if beta == 0.0 or beta == 1.0:  # m is one of the two distributions: D == 0
        return torch.zeros(lp_s.shape[0], dtype=lp_s.dtype) + 0.0 * lp_s.sum(-1)
    log_m = torch.log(beta * lp_t.exp() + (1.0 - beta) * lp_s.exp())
    return beta * _kl(lp_t, log_m) + (1.0 - beta) * _kl(lp_s, log_m)


def loss64(case: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float64 loss and d loss / d (h_s, W_s) from the (already rounded) inputs of ``case``."""
    h = case["h_s"].detach().double().requires_grad_()
    w = case["w_s"].detach().double().requires_grad_()
    t = case["temperature"]
    z_s = h @ w.T
    if case["b_s"] is not None:
        z_s = z_s + case["b_s"].double()
    z_t = teacher_logits64(case)
    labels = case["labels"]
    n = z_s.shape[0]
    valid = torch.ones(n, dtype=torch.bool) if labels is None else labels != IGNORE
    lp_s = torch.log_softmax(z_s / t, -1)
    lp_t = torch.log_softmax(z_t / t, -1).clamp(min=LOG_TINY)
    per_row = case["kd_weight"] * t * t * divergence64(lp_s, lp_t, case["divergence"], case["beta"])
    if case["ce_weight"] != 0:
        safe = torch.where(valid, labels, 0)
        ce = -torch.log_softmax(z_s, -1).gather(1, safe[:, None]).squeeze(1)
        per_row = per_row + case["ce_weight"] * ce
    n_valid = int(valid.sum())
    loss = torch.where(valid, per_row, 0.0).sum() / max(n_valid, 1)
    g_h, g_w = torch.autograd.grad(loss, (h, w))
    return loss.detach(), g_h, g_w


def teacher_logits64(case: dict) -> torch.Tensor:
    """Teacher logits in float64 from the (rounded) inputs; precomputed logits are themselves an input."""
    if case["form"] == "logits":
        return case["z_t"].double()
    z_t = case["h_t"].double() @ case["w_t"].double().T
    return z_t if case["b_t"] is None else z_t + case["b_t"].double()


# ----------------------------------------------------------------------------------------------------
# cases
# ----------------------------------------------------------------------------------------------------


@st.composite
def cases(draw, dtype: torch.dtype) -> dict:
    n = draw(st.integers(1, 40))
    vocab = draw(st.integers(2, 150))
    hs = draw(st.integers(1, 24))
    ht = draw(st.integers(1, 24))
    chunk = draw(st.integers(1, n + 3))
    seed = draw(st.integers(0, 2**31 - 1))
    huge = dtype == torch.float32 and draw(st.booleans()) and draw(st.booleans())  # ~1 in 4
    # logit standard deviations; "huge": logits of magnitude up to ~1e4
    std_s = HUGE_LOGIT / 3 if huge else draw(st.sampled_from([0.3, 1.0, 3.0, 10.0]))
    std_t = HUGE_LOGIT / 3 if huge else draw(st.sampled_from([0.3, 1.0, 3.0, 10.0]))
    divergence = draw(st.sampled_from(["forward_kl", "reverse_kl", "jsd"]))
    beta = draw(st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0])) if divergence == "jsd" else 0.5
    temperature = draw(st.sampled_from([0.5, 1.0, 1.0, 2.0, 4.0]))
    mask_kind = draw(st.sampled_from(["none", "all_valid", "random", "all_ignored"]))
    ce_weight = draw(st.sampled_from([0.0, 0.3, 1.0])) if mask_kind != "none" else 0.0
    kd_weight = draw(st.sampled_from([1.0, 1.0, 0.5, 0.0]))
    form = draw(st.sampled_from(["dense", "logits"]))
    bias_s = draw(st.booleans())
    bias_t = form == "dense" and draw(st.booleans())

    g = torch.Generator().manual_seed(seed)
    x = {
        "h_s": torch.randn(n, hs, generator=g),
        "w_s": torch.randn(vocab, hs, generator=g) * (std_s / math.sqrt(hs)),
        "b_s": torch.randn(vocab, generator=g) * 0.5 * std_s if bias_s else None,
        "h_t": torch.randn(n, ht, generator=g),
        "w_t": torch.randn(vocab, ht, generator=g) * (std_t / math.sqrt(ht)),
        "b_t": torch.randn(vocab, generator=g) * 0.5 * std_t if bias_t else None,
    }
    x = {k: None if v is None else v.to(dtype) for k, v in x.items()}  # rounded once: both sides use these
    labels = None
    if mask_kind != "none":
        labels = torch.randint(0, vocab, (n,), generator=g)
        if mask_kind == "random":
            labels[torch.rand(n, generator=g) < draw(st.sampled_from([0.2, 0.5, 0.9]))] = IGNORE
        elif mask_kind == "all_ignored":
            labels[:] = IGNORE
    case = dict(
        x,
        labels=labels,
        chunk_size=chunk,
        divergence=divergence,
        beta=beta,
        temperature=temperature,
        kd_weight=kd_weight,
        ce_weight=ce_weight,
        form=form,
        huge=huge,
        dtype=dtype,
        z_t=None,
    )
    if form == "logits":
        case["z_t"] = F.linear(x["h_t"], x["w_t"])
    return case


def run_fused(case: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    h = case["h_s"].clone().requires_grad_()
    w = case["w_s"].clone().requires_grad_()
    if case["form"] == "dense":
        teacher = dict(teacher_hidden=case["h_t"], teacher_weight=case["w_t"], teacher_bias=case["b_t"])
    else:
        teacher = dict(teacher_logits=case["z_t"])
    loss = fused_linear_kd_loss(
        h,
        w,
        **teacher,
        labels=case["labels"],
        divergence=case["divergence"],
        beta=case["beta"],
        temperature=case["temperature"],
        kd_weight=case["kd_weight"],
        ce_weight=case["ce_weight"],
        ignore_index=IGNORE,
        student_bias=case["b_s"],
        chunk_size=case["chunk_size"],
    )
    loss.backward()
    return loss, h.grad, w.grad


# ----------------------------------------------------------------------------------------------------
# checks
# ----------------------------------------------------------------------------------------------------


def _floors(case: dict) -> tuple[float, float, float]:
    """Natural scales of (loss, grad_h, grad_w) times FLOOR_FRACTION (see the module docstring).

    Log-probs have magnitude <= L = max|z| / T + log V; a row's T^2 * D is bounded by ~T^2 * 2L and its
    CE by ~L at T = 1; d(row loss) / d z has magnitude ~(kd_weight * T + ce_weight) (probabilities are
    <= 1); the gradients are that times ||W|| (grad_h) or ||h_valid|| (grad_w), over n_valid.
    """
    z_s = case["h_s"].double() @ case["w_s"].double().T
    z_t = teacher_logits64(case)
    t, vocab = case["temperature"], z_s.shape[1]
    big = max(float(z_s.abs().max()), float(z_t.abs().max()))
    if case["b_s"] is not None:
        big += float(case["b_s"].double().abs().max())
    labels = case["labels"]
    valid = torch.ones(z_s.shape[0], dtype=torch.bool) if labels is None else labels != IGNORE
    n_valid = max(int(valid.sum()), 1)
    kd_w, ce_w = case["kd_weight"], case["ce_weight"]
    loss_scale = kd_w * t * t * 2 * (big / t + math.log(vocab)) + ce_w * 2 * (big + math.log(vocab))
    dz = (kd_w * t + ce_w) / n_valid
    gh_scale = dz * float(case["w_s"].double().norm()) * math.sqrt(n_valid)
    gw_scale = dz * float(case["h_s"].double()[valid].norm())
    frac = FLOOR_FRACTION[case["dtype"]]
    return frac * loss_scale, frac * gh_scale, frac * gw_scale


def _rel_err(x: torch.Tensor, ref: torch.Tensor, floor: float) -> float:
    err = float((x.double() - ref).norm())
    return err / max(float(ref.norm()), floor, 1e-300)


def check(case: dict) -> None:
    loss, g_h, g_w = run_fused(case)
    for name, val in (("loss", loss), ("grad_h", g_h), ("grad_w", g_w)):
        assert torch.isfinite(val).all(), f"non-finite {name}"
    assert loss.dtype == torch.float32 and g_h.dtype == case["dtype"] and g_w.dtype == case["dtype"]
    if case["labels"] is not None and bool((case["labels"] == IGNORE).all()):
        assert float(loss) == 0.0 and not g_h.any() and not g_w.any()
        return
    ref = loss64(case)
    floors = _floors(case)
    rtol = RTOL[case["dtype"]]
    names = ("loss", "grad_h", "grad_w")
    # Logits of magnitude ~1e4 make the softmaxes (near) one-hot: gradients are then differences of
    # probabilities like exp(-80) that float32 logits (absolute error ~1e4 * eps32 = 1e-3) cannot resolve
    # relative to their own size, so only the loss (absolute error ~ eps32 * scale) is checked there.
    checked = names[:1] if case["huge"] else names
    for name, got, want, floor in zip(names, (loss, g_h, g_w), ref, floors):
        if name in checked:
            err = _rel_err(got, want, floor)
            assert err <= rtol, f"{name}: rel err {err:.3g} > {rtol} (|ref| {float(want.norm()):.3g})"


# ----------------------------------------------------------------------------------------------------
# tests
# ----------------------------------------------------------------------------------------------------


@settings(max_examples=250, **SETTINGS)
@given(case=cases(torch.float32))
def test_fused_float32_matches_float64(case):
    check(case)


@settings(max_examples=120, **SETTINGS)
@given(case=cases(torch.bfloat16))
def test_fused_bfloat16_matches_float64(case):
    check(case)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_floor_is_not_hiding_errors(divergence):
    """Sanity check of the tolerance: on a plain case the floor is far below ||ref||, and a 1e-4
    perturbation of the float32 result is caught."""
    g = torch.Generator().manual_seed(7)
    n, v, hs, ht = 16, 64, 8, 12
    case = dict(
        h_s=torch.randn(n, hs, generator=g),
        w_s=torch.randn(v, hs, generator=g) * (2 / math.sqrt(hs)),
        b_s=None,
        h_t=torch.randn(n, ht, generator=g),
        w_t=torch.randn(v, ht, generator=g) * (2 / math.sqrt(ht)),
        b_t=None,
        labels=None,
        chunk_size=5,
        divergence=divergence,
        beta=0.5,
        temperature=1.0,
        kd_weight=1.0,
        ce_weight=0.0,
        form="dense",
        huge=False,
        dtype=torch.float32,
        z_t=None,
    )
    got = run_fused(case)
    ref = loss64(case)
    for x, r, floor in zip(got, ref, _floors(case)):
        assert floor < 0.5 * float(r.norm())
        assert _rel_err(x, r, floor) <= 1e-5
        assert _rel_err(x * (1 + 1e-4), r, floor) > 1e-5
