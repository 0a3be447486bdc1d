"""Triton kernel for one chunk of the fused KD loss: per-row losses and d(loss)/d(student logits).

Same function as the torch chunk pass (``chunk_torch.py``); the math, including the ``LOG_TINY`` clamp,
is in ``kd_loss_reference``'s module docstring. With ``a = z_s / T``, ``b = z_t / T``,
``lp_s = log_softmax(a)`` (-inf -> LOG_TINY), ``lp_t = max(log_softmax(b), LOG_TINY)``,
``p_s = softmax(a)``, ``q = exp(lp_t)``, the gradient of ``T**2 * D`` w.r.t. ``z_s`` is ``T * dD/da``::

    forward_kl   dD/da = p_s * sum(q) - q          (sum and gradient over entries with z_s > -inf)
    reverse_kl   dD/da = g - p_s * sum(g),   g = p_s * (lp_s - lp_t)              (sum(g) = D)
    jsd          dD/da = g - p_s * sum(g),   g = (1 - beta) * p_s * (lp_s - log m)

and the cross-entropy adds ``softmax(z_s) - onehot(y)``.

Design: one program per row, looping over the vocabulary in tiles of ``BLOCK_V``; all row statistics
are float32 scalars, so nothing of size ``V`` is kept besides the gradient row being written. Sweeps
over the vocabulary (s = student tile read, t = teacher tile read, g = gradient tile write):

- ``forward_kl``: 2 sweeps -- (s, t) online max / sum-exp of ``a``, ``b`` (and of ``z_s`` for the CE
  when ``T != 1``; and the teacher mass on entries where ``z_s > -inf``); then (s, t, g) loss terms
  and gradient.
- ``reverse_kl``: 3 sweeps, 5 logit reads -- (t) teacher log-sum-exp; (s, t) student log-sum-exp with
  ``D`` accumulated online (rescaled like the sum-exp; exact, since the teacher clamp is known by
  then); (s, t, g) gradient, which needs ``D``.
- ``jsd``: 3 sweeps -- (s, t) both log-sum-exps; (s, t) ``log m`` needs both normalisers, then
  ``D`` and ``sum(g)``; (s, t, g) gradient.
- no teacher (cross-entropy only): 2 sweeps -- (s); (s, g).

A logit transform (``LogitTransform``: Gemma's softcap, a multiplier) is applied to every logit as it is
loaded, and the gradient row is multiplied by its derivative before it is stored, so the kernel's input is
still ``W·h``. Rows whose label is ``ignore_index`` only write a zero gradient row. No host synchronisation: ``scale``
may be a 0-d tensor (read by the kernel). The top-1 agreement count (``return_parts``) is not computed
here: ``fused_kd_loss`` takes it with two torch argmax passes over the chunk's logits before calling the
kernel (which only reads them). Without Triton the module still imports
(``TRITON_AVAILABLE = False``) and the function raises. CPU tensors need Triton's interpreter:
``TRITON_INTERPRET=1`` set before this module is first imported (Triton decides at decoration time).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .kd_loss_reference import DIVERGENCES, LOG_TINY
from .logit_transform import LogitTransform

try:
    import triton
    import triton.language as tl

    TRITON_AVAILABLE = True
except ImportError:  # pragma: no cover - triton is optional (not on macOS / Windows)
    triton = None
    tl = None
    TRITON_AVAILABLE = False

__all__ = ["TRITON_AVAILABLE", "kd_chunk_loss_and_grad_triton"]

_NEG_BIG = -1.0e30  # running-max start: finite, so exp(m_old - m_new) never sees (-inf) - (-inf)
_DIV_CODE = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2}


if TRITON_AVAILABLE:

    @triton.jit
    def _lse_update(m, z, x):
        """Fold tile ``x`` into a running (max, sum exp(x - max))."""
        m_new = tl.maximum(m, tl.max(x, axis=0))
        z = z * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        return m_new, z

    @triton.jit
    def _log_probs(a, b, lse_a, lse_b, LOG_TINY_C: tl.constexpr):
        """Student (-inf -> LOG_TINY) and clamped teacher log-probs of one tile."""
        lp_s = a - lse_a
        lp_s = tl.where(lp_s == float("-inf"), LOG_TINY_C, lp_s)
        lp_t = tl.maximum(b - lse_b, LOG_TINY_C)
        return lp_s, lp_t

    @triton.jit
    def _log_m(lp_s, lp_t, log_beta, log1m_beta):
        """log(beta * q + (1 - beta) * p_s) from finite log-probs."""
        x = lp_t + log_beta
        y = lp_s + log1m_beta
        mx = tl.maximum(x, y)
        return mx + tl.log(1.0 + tl.exp(tl.minimum(x, y) - mx))

    @triton.jit
    def _xform(x, mul, cap, XF: tl.constexpr):
        """A logit transform of float32 ``x``: XF 0 none, 1 ``x * mul``, 2 ``cap * tanh(mul * x)`` (``mul`` is
        ``scale / cap`` there). ``tanh(y) = 1 - 2 / (exp(2y) + 1)``: exact limits at +-inf, absolute error
        of order float32's epsilon (the logit's own resolution at ``cap``)."""
        if XF == 1:
            x = x * mul
        elif XF == 2:
            x = cap * (1.0 - 2.0 / (tl.exp(2.0 * (x * mul)) + 1.0))
        return x

    @triton.jit
    def _load_logits(row_ptr, cols, mask, mul, cap, OTHER: tl.constexpr, XF: tl.constexpr):
        """A float32 tile of a logits row, transformed; masked columns read ``OTHER`` (untransformed)."""
        x = tl.load(row_ptr + cols, mask=mask, other=OTHER).to(tl.float32)
        if XF != 0:
            x = tl.where(mask, _xform(x, mul, cap, XF), OTHER)
        return x

    @triton.jit
    def _kd_chunk_kernel(
        zs_ptr,
        zt_ptr,
        labels_ptr,
        scale_ptr,
        kd_ptr,
        ce_ptr,
        grad_ptr,
        V,
        stride_s,
        stride_t,
        stride_g,
        inv_t,
        t_sq,
        kd_coef,
        ce_coef,
        beta,
        log_beta,
        log1m_beta,
        ignore_index,
        s_mul,
        s_cap,
        t_mul,
        t_cap,
        DIV: tl.constexpr,
        HAS_KD: tl.constexpr,
        HAS_CE: tl.constexpr,
        KD_GRAD: tl.constexpr,
        CE_GRAD: tl.constexpr,
        HAS_LABELS: tl.constexpr,
        SCALE_IS_PTR: tl.constexpr,
        T_IS_ONE: tl.constexpr,
        LOG_TINY_C: tl.constexpr,
        NEG_BIG: tl.constexpr,
        BLOCK_V: tl.constexpr,
        S_XF: tl.constexpr,
        T_XF: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        zs_row = zs_ptr + row * stride_s
        zt_row = zt_ptr + row * stride_t
        g_row = grad_ptr + row * stride_g
        offs = tl.arange(0, BLOCK_V)

        valid = True
        label = 0
        if HAS_LABELS:
            label = tl.load(labels_ptr + row)
            valid = label != ignore_index

        if valid:
            kd_c = kd_coef
            ce_c = ce_coef
            if SCALE_IS_PTR:
                sc = tl.load(scale_ptr).to(tl.float32)
                kd_c = kd_c * sc
                ce_c = ce_c * sc
            # separate CE statistics only when they differ from those of a = z_s / T
            SEP_CE: tl.constexpr = HAS_CE and (not HAS_KD or not T_IS_ONE)
            STUDENT_IN_P1: tl.constexpr = not (HAS_KD and DIV == 1)

            # ---- sweep 1: online max / sum-exp ----------------------------------------------------
            m_a = tl.full((), NEG_BIG, tl.float32)
            z_a = tl.zeros((), tl.float32)
            m_b = tl.full((), NEG_BIG, tl.float32)
            z_b = tl.zeros((), tl.float32)
            z_bf = tl.zeros((), tl.float32)  # forward KL: teacher mass where z_s is finite
            m_c = tl.full((), NEG_BIG, tl.float32)
            z_c = tl.zeros((), tl.float32)
            for start in range(0, V, BLOCK_V):
                cols = start + offs
                mask = cols < V
                if STUDENT_IN_P1:
                    s = _load_logits(zs_row, cols, mask, s_mul, s_cap, float("-inf"), S_XF)
                    if HAS_KD:
                        m_a, z_a = _lse_update(m_a, z_a, s * inv_t)
                    if SEP_CE:
                        m_c, z_c = _lse_update(m_c, z_c, s)
                if HAS_KD:
                    t = _load_logits(zt_row, cols, mask, t_mul, t_cap, float("-inf"), T_XF)
                    b = t * inv_t
                    m_new = tl.maximum(m_b, tl.max(b, axis=0))
                    alpha = tl.exp(m_b - m_new)
                    e = tl.exp(b - m_new)
                    z_b = z_b * alpha + tl.sum(e, axis=0)
                    if DIV == 0:
                        z_bf = z_bf * alpha + tl.sum(tl.where(s == float("-inf"), 0.0, e), axis=0)
                    m_b = m_new
            lse_b = tl.zeros((), tl.float32)
            q_fin = tl.zeros((), tl.float32)
            if HAS_KD:
                lse_b = m_b + tl.log(z_b)
                q_fin = z_bf / z_b

            # ---- reverse KL, sweep 2: student statistics and D = KL(p_s || p_t), online ---------------
            # With e = exp(a - m): S = sum e * (a - m - lp_t); D = S / Z - log Z; a new max m' rescales
            # S' = exp(m - m') * (S + Z * (m - m')).
            d_rkl = tl.zeros((), tl.float32)
            if HAS_KD and DIV == 1:
                s_acc = tl.zeros((), tl.float32)
                for start in range(0, V, BLOCK_V):
                    cols = start + offs
                    mask = cols < V
                    s = _load_logits(zs_row, cols, mask, s_mul, s_cap, float("-inf"), S_XF)
                    t = _load_logits(zt_row, cols, mask, t_mul, t_cap, 0.0, T_XF)
                    a = s * inv_t
                    lp_t = tl.maximum(t * inv_t - lse_b, LOG_TINY_C)
                    m_new = tl.maximum(m_a, tl.max(a, axis=0))
                    alpha = tl.exp(m_a - m_new)
                    s_acc = alpha * (s_acc + z_a * (m_a - m_new))
                    z_a = alpha * z_a
                    e = tl.exp(a - m_new)
                    term = tl.where(e > 0.0, a - m_new - lp_t, 0.0)  # e == 0: a may be -inf
                    s_acc += tl.sum(e * term, axis=0)
                    z_a += tl.sum(e, axis=0)
                    m_a = m_new
                    if SEP_CE:
                        m_c, z_c = _lse_update(m_c, z_c, s)
                d_rkl = s_acc / z_a - tl.log(z_a)
            lse_a = tl.zeros((), tl.float32)
            if HAS_KD:
                lse_a = m_a + tl.log(z_a)
            lse_c = lse_a
            if SEP_CE:
                lse_c = m_c + tl.log(z_c)

            # ---- JSD, sweep 2: D and sum(g) need log m, hence both normalisers ------------------------
            sum_g = tl.zeros((), tl.float32)
            d_jsd = tl.zeros((), tl.float32)
            if HAS_KD and DIV == 2:
                acc_g = tl.zeros((BLOCK_V,), tl.float32)
                acc_t = tl.zeros((BLOCK_V,), tl.float32)
                for start in range(0, V, BLOCK_V):
                    cols = start + offs
                    mask = cols < V
                    s = _load_logits(zs_row, cols, mask, s_mul, s_cap, 0.0, S_XF)
                    t = _load_logits(zt_row, cols, mask, t_mul, t_cap, 0.0, T_XF)
                    lp_s, lp_t = _log_probs(s * inv_t, t * inv_t, lse_a, lse_b, LOG_TINY_C)
                    log_m = _log_m(lp_s, lp_t, log_beta, log1m_beta)
                    acc_g += tl.where(mask, tl.exp(lp_s) * (lp_s - log_m), 0.0)
                    acc_t += tl.where(mask, tl.exp(lp_t) * (lp_t - log_m), 0.0)
                sum_g = (1.0 - beta) * tl.sum(acc_g, axis=0)
                d_jsd = beta * tl.sum(acc_t, axis=0) + sum_g

            # ---- last sweep: loss terms (forward KL) and the gradient row ------------------------------
            acc_f = tl.zeros((BLOCK_V,), tl.float32)
            for start in range(0, V, BLOCK_V):
                cols = start + offs
                mask = cols < V
                s = _load_logits(zs_row, cols, mask, s_mul, s_cap, 0.0, S_XF)
                grad = tl.zeros((BLOCK_V,), tl.float32)
                if HAS_KD and (KD_GRAD or DIV == 0):
                    t = _load_logits(zt_row, cols, mask, t_mul, t_cap, 0.0, T_XF)
                    a = s * inv_t
                    lp_s, lp_t = _log_probs(a, t * inv_t, lse_a, lse_b, LOG_TINY_C)
                    p_s = tl.exp(a - lse_a)  # exactly 0 (no gradient) where z_s = -inf
                    if DIV == 0:
                        q = tl.exp(lp_t)
                        acc_f += tl.where(mask, q * (lp_t - lp_s), 0.0)
                        if KD_GRAD:
                            # -inf student entries: lp_s is a constant there, so no gradient; q_fin < 1
                            grad = kd_c * tl.where(a == float("-inf"), 0.0, p_s * q_fin - q)
                    elif DIV == 1:
                        grad = kd_c * (p_s * (lp_s - lp_t) - p_s * d_rkl)
                    else:
                        log_m = _log_m(lp_s, lp_t, log_beta, log1m_beta)
                        grad = kd_c * ((1.0 - beta) * p_s * (lp_s - log_m) - p_s * sum_g)
                if CE_GRAD:
                    onehot = tl.where(cols == label, 1.0, 0.0)
                    grad += ce_c * (tl.exp(s - lse_c) - onehot)
                if S_XF == 1:  # the gradient w.r.t. the raw logit: d z'/d z = scale
                    grad = grad * s_mul
                elif S_XF == 2:  # scale * (1 - (z'/cap)**2), z' = s
                    r = s / s_cap
                    grad = grad * ((s_mul * s_cap) * (1.0 - r * r))
                tl.store(g_row + cols, grad, mask=mask)

            if HAS_KD:
                if DIV == 0:
                    kd = tl.sum(acc_f, axis=0)
                elif DIV == 1:
                    kd = d_rkl
                else:
                    kd = d_jsd
                tl.store(kd_ptr + row, t_sq * kd)
            if HAS_CE:
                in_range = (label >= 0) & (label < V)
                z_y = tl.load(zs_row + label, mask=in_range, other=float("nan")).to(tl.float32)
                z_y = _xform(z_y, s_mul, s_cap, S_XF)
                tl.store(ce_ptr + row, lse_c - z_y)
        else:
            for start in range(0, V, BLOCK_V):
                cols = start + offs
                tl.store(g_row + cols, tl.zeros((BLOCK_V,), tl.float32), mask=cols < V)

    # Triton picks the interpreter when a kernel is decorated, i.e. when this module is imported.
    _INTERPRETED = not isinstance(_kd_chunk_kernel, triton.runtime.jit.JITFunction)
else:  # pragma: no cover
    _INTERPRETED = False


def _xform_args(xf: LogitTransform | None) -> tuple[int, float, float]:
    """(XF code, mul, cap) of ``_xform`` for a transform (None: none)."""
    if xf is None or xf.is_identity:
        return 0, 1.0, 1.0
    if xf.softcap is None:
        return 1, float(xf.scale), 1.0
    return 2, float(xf.scale) / float(xf.softcap), float(xf.softcap)


def _default_block_v(vocab: int) -> int:
    cap = 256 if _INTERPRETED else 4096
    return max(16, min(cap, triton.next_power_of_2(vocab)))


def _num_warps(block_v: int) -> int:
    return 4 if block_v <= 1024 else (8 if block_v <= 4096 else 16)


def kd_chunk_loss_and_grad_triton(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    labels: Tensor | None,
    *,
    divergence: str,
    beta: float,
    temperature: float,
    kd_weight: float,
    ce_weight: float,
    ignore_index: int,
    scale: float | Tensor,
    teacher_topk: tuple[Tensor, Tensor] | None = None,
    block_v: int | None = None,
    student_transform: LogitTransform | None = None,
    teacher_transform: LogitTransform | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row ``T**2 * D`` and CE of a chunk, and d(scale * sum(kd_weight*kd + ce_weight*ce))/d z_s.

    Returns ``(kd_rows [c], ce_rows [c], grad [c, V])``, all float32 on the input device. ``kd_rows``
    is computed whenever a teacher is given (zeros without one, and for ``jsd`` with beta 0 or 1),
    ``ce_rows`` whenever labels are (zeros without), whatever the weights. Ignored rows: zeros.
    ``block_v`` overrides the vocabulary tile size (a power of 2). ``student_transform`` /
    ``teacher_transform`` turn the given logits into the models' own as they are loaded (the gradient is
    w.r.t. the untransformed student logits).
    """
    if not TRITON_AVAILABLE:
        raise RuntimeError("kd_chunk_loss_and_grad_triton needs Triton (pip install triton)")
    if teacher_topk is not None:
        raise NotImplementedError("the Triton chunk kernel has no top-k teacher; use the torch chunk pass")
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; valid divergences: {', '.join(DIVERGENCES)}")
    if student_logits.dim() != 2:
        raise ValueError(f"student_logits must be 2-D [c, V], got shape {tuple(student_logits.shape)}")
    if student_logits.device.type == "cpu" and not _INTERPRETED:
        raise RuntimeError(
            "CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1 before sapling.kernels.chunk_triton "
            "is first imported"
        )
    if teacher_logits is None and kd_weight != 0:
        raise ValueError(f"kd_weight={kd_weight} needs teacher_logits")
    if teacher_logits is not None and teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher_logits shape {tuple(teacher_logits.shape)} != student_logits "
            f"shape {tuple(student_logits.shape)}"
        )
    if labels is None and ce_weight != 0:
        raise ValueError(f"ce_weight={ce_weight} needs labels")

    c, vocab = student_logits.shape
    device = student_logits.device
    kd_rows = torch.zeros(c, dtype=torch.float32, device=device)
    ce_rows = torch.zeros(c, dtype=torch.float32, device=device)
    grad = torch.empty((c, vocab), dtype=torch.float32, device=device)

    has_kd = teacher_logits is not None and not (divergence == "jsd" and beta in (0.0, 1.0))
    has_ce = labels is not None
    if c == 0:
        return kd_rows, ce_rows, grad
    if not has_kd and not has_ce:
        return kd_rows, ce_rows, grad.zero_()

    zs = student_logits if student_logits.stride(-1) == 1 else student_logits.contiguous()
    zt = zs
    if has_kd:
        zt = teacher_logits if teacher_logits.stride(-1) == 1 else teacher_logits.contiguous()
    lab = labels.contiguous() if labels is not None else zs

    t = float(temperature)
    kd_coef = float(kd_weight) * t if has_kd else 0.0
    ce_coef = float(ce_weight)
    scale_is_ptr = isinstance(scale, Tensor)
    if scale_is_ptr:
        scale_arg = scale.reshape(())
    else:
        scale_arg = zs
        kd_coef *= float(scale)
        ce_coef *= float(scale)
    b = float(beta)
    log_beta = math.log(b) if b > 0 else 0.0
    log1m_beta = math.log1p(-b) if b < 1 else 0.0

    s_xf, s_mul, s_cap = _xform_args(student_transform)
    t_xf, t_mul, t_cap = _xform_args(teacher_transform if has_kd else None)
    block = block_v if block_v is not None else _default_block_v(vocab)
    if block < 16 or block & (block - 1):
        raise ValueError(f"block_v must be a power of 2 >= 16, got {block}")
    _kd_chunk_kernel[(c,)](
        zs,
        zt,
        lab,
        scale_arg,
        kd_rows,
        ce_rows,
        grad,
        vocab,
        zs.stride(0),
        zt.stride(0),
        grad.stride(0),
        1.0 / t,
        t * t,
        kd_coef,
        ce_coef,
        b,
        log_beta,
        log1m_beta,
        int(ignore_index),
        s_mul,
        s_cap,
        t_mul,
        t_cap,
        DIV=_DIV_CODE[divergence],
        HAS_KD=has_kd,
        HAS_CE=has_ce,
        KD_GRAD=has_kd and kd_weight != 0,
        CE_GRAD=has_ce and ce_weight != 0,
        HAS_LABELS=labels is not None,
        SCALE_IS_PTR=scale_is_ptr,
        T_IS_ONE=t == 1.0,
        LOG_TINY_C=LOG_TINY,
        NEG_BIG=_NEG_BIG,
        BLOCK_V=block,
        S_XF=s_xf,
        T_XF=t_xf,
        num_warps=_num_warps(block),
    )
    return kd_rows, ce_rows, grad
