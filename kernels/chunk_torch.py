"""KD + CE loss of one chunk of rows and its analytic gradient w.r.t. the student logits (plain PyTorch).

This is the per-chunk step of :func:`sapling.kernels.fused_linear_kd_loss`; the Triton kernel in
``chunk_triton.py`` implements the same function (dense teacher only). The math, including the
``LOG_TINY`` floors and the top-k tail bucket, is exactly that of ``kd_loss_reference`` (see its module
docstring); only the gradient is written out by hand instead of coming from autograd.

Gradients
---------
Let ``u = z / T`` and ``lp_s = log_softmax(u)``. For any per-row function ``F(lp_s)`` with
``g = dF/d lp_s`` (zero where ``lp_s`` was ``-inf`` and got floored at ``LOG_TINY``, as in the
reference), the log-softmax chain rule gives ``dF/du = g - p_s * sum(g)``, and
``d(T**2 * F)/dz = T * (g - p_s * sum(g))``. Per divergence (``p = exp(lp)``)::

    forward_kl  g = -p_t                                 -> T * (p_s * sum(p_t) - p_t) ~ T * (p_s - p_t)
    reverse_kl  g = p_s * (lp_s - lp_t + 1)              -> T * p_s * ((lp_s - lp_t) - KL(p_s || p_t))
    jsd         g = (1 - beta) * p_s * (lp_s - log m)    (the terms through log m cancel, since
                                                          (1-beta) p_s / m * m = (1-beta) p_s)
    CE (T = 1)  dCE/dz = softmax(z) - onehot(y)

Top-k teacher: ``F`` is a function of the (k+1) bucket log-probs ``s_j = lp_s[idx_j]`` and
``s_tail = logsumexp({lp_s[v]: v not in idx} U {LOG_TINY})``; with ``g_j``, ``g_tail`` its partial
derivatives, ``dF/d lp_s[v] = g_j`` at ``v = idx_j`` and ``g_tail * exp(lp_s[v] - s_tail)`` elsewhere,
then the log-softmax rule above.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .kd_loss_reference import LOG_TINY

__all__ = ["argmax_rows", "kd_chunk_loss_and_grad", "top1_matches"]

_TINY: float = torch.finfo(torch.float32).tiny
_FINITE_LOGIT: float = 1e30  # |z| below this: log_softmax(z) is finite in float32


@functools.lru_cache(maxsize=64)
def _argmax_block(vocab: int) -> int:
    """Block width for :func:`argmax_rows`: the smallest divisor of ``vocab`` in [128, 1024], preferring
    multiples of 16 (aligned vector loads); 0 when there is none."""
    for step in (16, 1):
        for b in range(128, 1025, step):
            if vocab % b == 0:
                return b
    return 0


def argmax_rows(x: Tensor) -> Tensor:
    """``x.argmax(-1)`` for a 2-D ``x`` (first index of the maximum, NaN counting as the maximum).

    On CPU ``torch.argmax`` over long rows costs several ``amax`` passes (one thread, 699 x 32000 float32:
    ~20 ms against ~3 ms), so long rows are reduced blockwise: ``amax`` of each block of ``b`` columns (one
    vectorised pass), the first block holding the row maximum, then ``argmax`` inside that block only
    (``b / V`` of the row): ~4 ms in all at ``b = 128``. Same result as ``torch.argmax``, ties and NaN
    included. CUDA, short or strided rows and vocabularies with no divisor in range use ``torch.argmax``.
    """
    c, v = x.shape
    b = _argmax_block(v)
    if x.is_cuda or v < 8192 or c == 0 or b == 0 or x.stride(1) != 1:
        return x.argmax(dim=-1)
    blocks = x.view(c, v // b, b)
    first = blocks.amax(dim=-1).argmax(dim=-1)  # the first block holding the row maximum (or a NaN)
    return first * b + blocks[torch.arange(c, device=x.device), first].argmax(dim=-1)


def top1_matches(
    student_logits: Tensor,
    teacher_logits: Tensor | None = None,
    teacher_topk: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Number of rows (0-d int64 tensor) whose student argmax equals the teacher's argmax.

    Two read-only argmax passes over ``[c, V]`` (student, dense teacher; :func:`argmax_rows`), none over the
    vocabulary for a top-k teacher: its argmax is ``idx[argmax(lp_t)]``, which is ``idx[:, 0]`` for a sorted
    top-k (``torch.topk``'s default) and still right for an unsorted one. The temperature does not move an
    argmax; ties go to the first index (``torch.argmax``). Call it before anything overwrites the logits.
    """
    top_s = argmax_rows(student_logits)
    if teacher_topk is not None:
        lp_t, idx = teacher_topk
        top_t = idx.gather(1, lp_t.argmax(dim=-1, keepdim=True)).squeeze(1)
    elif teacher_logits is not None:
        top_t = argmax_rows(teacher_logits)
    else:
        raise ValueError("top1_matches needs teacher_logits or teacher_topk")
    return (top_s == top_t).sum()


def kd_chunk_loss_and_grad(
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
    scale: float,
    teacher_topk: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row losses of a chunk of ``c`` rows and ``d loss / d student_logits``.

    ``student_logits [c, V]`` and ``teacher_logits [c, V]`` are raw logits (bias included; any dtype,
    computed in float32). Give ``teacher_logits`` or ``teacher_topk = (lp_t [c, k], idx [c, k])`` for the
    KD term, neither for none. ``labels [c]`` (or None: no CE) enables the CE term; rows whose label is
    ``ignore_index`` contribute nothing. Returns float32 ``(kd_rows [c], ce_rows [c], grad [c, V])`` with
    ``kd_rows = T**2 * D``, ``ce_rows = CE`` (0 on ignored rows) and
    ``grad = d(scale * sum(kd_weight * kd_rows + ce_weight * ce_rows)) / d student_logits``.
    """
    kd_rows, ce_rows, grad, coef = chunk_loss_scaled(
        student_logits,
        teacher_logits,
        labels,
        divergence=divergence,
        beta=beta,
        temperature=temperature,
        kd_weight=kd_weight,
        ce_weight=ce_weight,
        ignore_index=ignore_index,
        scale=scale,
        teacher_topk=teacher_topk,
        need_grad=True,
    )
    assert grad is not None
    return kd_rows, ce_rows, grad.mul_(coef) if coef != 1.0 else grad


def forward_kl_fast_path(
    divergence: str, kd_weight: float, temperature: float, has_labels: bool, is_cuda: bool
) -> bool:
    """Whether :func:`chunk_loss_scaled` takes the few-pass forward-KL path for a dense teacher (CPU)."""
    return (
        not is_cuda
        and divergence == "forward_kl"
        and kd_weight != 0
        and (not has_labels or temperature == 1.0)
    )


def chunk_loss_scaled(
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
    need_grad: bool = True,
    scratch: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None, float]:
    """``(kd_rows, ce_rows, g, coef)`` with the true gradient ``coef * g``.

    Leaving the scalar ``coef`` to the caller lets :func:`fused_linear_kd_loss` fold it into the two
    gradient matmuls (``alpha=``) instead of spending a pass over the ``[c, V]`` gradient on it.

    ``scratch`` (a float32 ``[c, V]`` buffer) hands the logits over to this function: on the forward-KL
    fast path both float32 logits tensors are overwritten and ``g`` is written into ``scratch``, so a
    caller that reuses the three buffers across chunks allocates nothing per chunk. (Fresh allocations
    over glibc's 32 MiB mmap threshold page-fault on every touch, which costs more than the math.)
    """
    fast = (
        need_grad
        and teacher_logits is not None
        and teacher_topk is None
        and forward_kl_fast_path(
            divergence, kd_weight, temperature, labels is not None, student_logits.is_cuda
        )
    )
    if fast:
        out = _forward_kl_dense(
            student_logits,
            teacher_logits,
            labels,
            t=float(temperature),
            kd_weight=float(kd_weight),
            ce_weight=float(ce_weight),
            ignore_index=ignore_index,
            scale=float(scale),
            scratch=scratch,
        )
        if out is not None:
            return out
    kd_rows, ce_rows, grad = _chunk_loss_general(
        student_logits,
        teacher_logits,
        labels,
        divergence=divergence,
        beta=beta,
        temperature=temperature,
        kd_weight=kd_weight,
        ce_weight=ce_weight,
        ignore_index=ignore_index,
        scale=scale,
        teacher_topk=teacher_topk,
        need_grad=need_grad,
    )
    return kd_rows, ce_rows, grad, 1.0


def _log_softmax_(x: Tensor) -> Tensor:
    """``log_softmax(x, -1)`` written over ``x`` (the CPU kernel reads each element before writing it)."""
    return torch.ops.aten._log_softmax.out(x, -1, False, out=x)


def _forward_kl_dense(
    z_s: Tensor,
    z_t: Tensor,
    labels: Tensor | None,
    *,
    t: float,
    kd_weight: float,
    ce_weight: float,
    ignore_index: int,
    scale: float,
    scratch: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, float] | None:
    """Forward KL against a dense teacher (+ CE, at T = 1 only) in few passes over ``[c, V]``.

    Same formulas as the general path (``LOG_TINY`` floor on the teacher, ``sum(p_t)`` kept exact) but
    with the loss as one ``vecdot`` and the whole gradient as one ``addcmul``::

        grad = scale * (T * kd_w * (p_s * S - p_t) + ce_w * (p_s - onehot))     S = sum(p_t)
             = coef * (p_t - p_s * (S + ce_w / (T * kd_w)) + onehot * ce_w / (T * kd_w))
        coef = -scale * T * kd_w

    Returns None, before touching anything, when a student logit is not finite or beyond +-1e30 (where
    a student log-prob could be -inf): the general path then applies the reference's floors.
    """
    owned = scratch is not None
    if z_s.numel() == 0:
        return None
    lo, hi = z_s.aminmax()
    if not (float(lo) > -_FINITE_LOGIT and float(hi) < _FINITE_LOGIT):  # also False for NaN
        return None  # then lp_s may be -inf: the reference's floors apply (general path, inputs intact)
    z = z_s.float()
    if t != 1.0:
        z = z.mul_(1.0 / t) if owned or z is not z_s else z / t
    lp_s = _log_softmax_(z) if owned or z is not z_s else F.log_softmax(z, dim=-1)
    zt = z_t.float()
    if t != 1.0:
        zt = zt.mul_(1.0 / t) if owned or zt is not z_t else zt / t
    lp_t = _log_softmax_(zt) if owned or zt is not z_t else F.log_softmax(zt, dim=-1)
    if float(lp_t.amin()) < LOG_TINY:
        lp_t.clamp_(min=LOG_TINY)
    c = lp_s.shape[0]
    ce_rows = lp_s.new_zeros(c)
    safe = valid = None
    if labels is not None:
        valid = labels != ignore_index
        safe = torch.where(valid, labels, 0).long()[:, None]
        ce_rows = torch.where(valid, -lp_s.gather(1, safe).squeeze(1), 0.0)
    p_t = torch.exp(lp_t, out=scratch) if owned else lp_t.exp()
    kd = torch.linalg.vecdot(p_t, lp_t.sub_(lp_s))  # sum p_t * (lp_t - lp_s)
    mass = p_t.sum(-1, keepdim=True)
    ce_rel = ce_weight / (t * kd_weight) if labels is not None else 0.0
    g = p_t.addcmul_(lp_s.exp_(), mass + ce_rel, value=-1.0)
    if ce_rel != 0.0:
        g.scatter_add_(1, safe, g.new_full((c, 1), ce_rel))
    kd_rows = kd * (t * t)
    if valid is not None and not bool(valid.all()):
        kd_rows = torch.where(valid, kd_rows, 0.0)
        g.masked_fill_(~valid[:, None], 0.0)
    return kd_rows, ce_rows, g, -scale * t * kd_weight


def _chunk_loss_general(
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
    need_grad: bool = True,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Any divergence / teacher form, with the gradient fully scaled."""
    z = student_logits.float()
    c = z.shape[0]
    t = float(temperature)
    valid = None if labels is None else labels != ignore_index
    kd_rows = z.new_zeros(c)
    ce_rows = z.new_zeros(c)
    grad: Tensor | None = None

    lp_t_scaled: Tensor | None = None  # raw log_softmax(z / T), shared with CE when T == 1
    if labels is not None:
        lp1 = F.log_softmax(z, dim=-1)
        safe = labels.long() if valid is None else torch.where(valid, labels, 0).long()
        ce_rows = -lp1.gather(1, safe[:, None]).squeeze(1)
        if need_grad and ce_weight != 0:
            w = scale * float(ce_weight)  # a device scalar stays one (no host sync on a GPU)
            grad = lp1.exp().mul_(w)
            minus_w = (-w).to(grad.dtype).expand(c, 1) if isinstance(w, Tensor) else grad.new_full((c, 1), -w)
            grad.scatter_add_(1, safe[:, None], minus_w)
        if t == 1.0:
            lp_t_scaled = lp1

    if teacher_logits is not None or teacher_topk is not None:
        if lp_t_scaled is None:
            lp_t_scaled = F.log_softmax(z if t == 1.0 else z / t, dim=-1)
        want_grad = need_grad and kd_weight != 0
        if teacher_topk is None:
            d, dlp = _dense(lp_t_scaled, teacher_logits, t, divergence, beta, want_grad)
        else:
            d, dlp = _topk(lp_t_scaled, teacher_topk[0], teacher_topk[1], divergence, beta, want_grad)
        kd_rows = d * (t * t)
        if dlp is not None:
            dlp.mul_(scale * float(kd_weight) * t)  # d(T^2 D)/dz = T * dD/du
            grad = dlp if grad is None else grad.add_(dlp)

    if valid is not None:
        kd_rows = torch.where(valid, kd_rows, 0.0)
        ce_rows = torch.where(valid, ce_rows, 0.0)
        if grad is not None:
            grad.masked_fill_(~valid[:, None], 0.0)
    if need_grad and grad is None:
        grad = z.new_zeros(z.shape)
    return kd_rows, ce_rows, grad


# ----------------------------------------------------------------------------------------------------
# divergences with their derivative w.r.t. the student log-probs
# ----------------------------------------------------------------------------------------------------


def _div_and_grad(
    lp_s: Tensor, lp_t: Tensor, divergence: str, beta: float, need_grad: bool
) -> tuple[Tensor, Tensor | None]:
    """``(D [c], dD/dlp_s [c, K] or None)`` from finite log-probs; same formulas as the reference.

    ``lp_t`` may be overwritten (both callers pass a temporary); ``lp_s`` is left intact.
    """
    if divergence == "forward_kl":
        p_t = lp_t.exp()
        d = lp_t.sub_(lp_s).mul_(p_t).sum(-1)  # lp_t is consumed (callers pass a fresh tensor)
        return d, p_t.neg_() if need_grad else None
    if divergence == "reverse_kl":
        p_s = lp_s.exp()
        diff = lp_s - lp_t
        d = (p_s * diff).sum(-1)
        return d, diff.add_(1.0).mul_(p_s) if need_grad else None
    if divergence != "jsd":
        raise ValueError(f"unknown divergence {divergence!r}")
    if beta in (0.0, 1.0):  # m equals one of the two: D == 0 exactly, and so is its gradient
        return lp_s.new_zeros(lp_s.shape[0]), torch.zeros_like(lp_s) if need_grad else None
    log_m = torch.logaddexp(lp_t + math.log(beta), lp_s + math.log1p(-beta))
    p_s = lp_s.exp()
    s_minus_m = lp_s - log_m
    d = beta * (lp_t.exp() * (lp_t - log_m)).sum(-1) + (1.0 - beta) * (p_s * s_minus_m).sum(-1)
    return d, s_minus_m.mul_(p_s).mul_(1.0 - beta) if need_grad else None


def _neginf_mask(lp: Tensor) -> Tensor | None:
    """Where ``lp`` is -inf; None when nowhere (checked on CPU only, to keep CUDA free of host syncs).

    On CPU one read-only min pass decides first (no [c, V] bool temporary in the usual all-finite case).
    """
    if not lp.is_cuda and lp.numel():
        low = lp.amin()
        if not (bool(torch.isneginf(low)) or bool(torch.isnan(low))):
            return None
    return torch.isneginf(lp)


def _log_softmax_backward_(dlp: Tensor, lp: Tensor) -> Tensor:
    """dF/du from dF/dlp for lp = log_softmax(u), in place (consumes both arguments)."""
    total = dlp.sum(-1, keepdim=True)
    return dlp.sub_(lp.exp_().mul_(total))


def _dense(
    lp: Tensor, z_t: Tensor, t: float, divergence: str, beta: float, need_grad: bool
) -> tuple[Tensor, Tensor | None]:
    """Dense teacher. ``lp`` = raw log_softmax(z / T), consumed. Returns (D, dD/du or None)."""
    neg = _neginf_mask(lp)
    lp_s = lp if neg is None else lp.masked_fill_(neg, LOG_TINY)
    z_t = z_t.float()
    lp_t = F.log_softmax(z_t if t == 1.0 else z_t / t, dim=-1).clamp_(min=LOG_TINY)
    d, g = _div_and_grad(lp_s, lp_t, divergence, beta, need_grad)
    if g is None:
        return d, None
    del lp_t
    p_s = lp_s.exp_()
    if neg is not None:  # no gradient through floored entries; p_s = exp(raw lp) = 0 there
        g.masked_fill_(neg, 0.0)
        p_s.masked_fill_(neg, 0.0)
    return d, g.addcmul_(p_s, g.sum(-1, keepdim=True), value=-1.0)  # g - p_s * sum(g)


def _topk(
    lp: Tensor, lp_t: Tensor, idx: Tensor, divergence: str, beta: float, need_grad: bool
) -> tuple[Tensor, Tensor | None]:
    """Top-k teacher with a tail bucket. ``lp`` = raw log_softmax(z / T), consumed."""
    idx = idx.long()
    k = idx.shape[1]
    s_top = lp.gather(1, idx)
    neg = torch.isneginf(s_top)
    s_top.masked_fill_(neg, LOG_TINY)
    rest = lp.scatter(1, idx, float("-inf"))
    floor_col = lp.new_full((lp.shape[0], 1), LOG_TINY)
    s_tail = torch.logsumexp(torch.cat([rest, floor_col], dim=1), dim=1, keepdim=True)

    t_top = lp_t.float().clamp(min=LOG_TINY)
    t_tail = (-torch.expm1(torch.logsumexp(t_top, dim=1, keepdim=True))).clamp(min=_TINY).log()
    d, g = _div_and_grad(
        torch.cat([s_top, s_tail], dim=1), torch.cat([t_top, t_tail], dim=1), divergence, beta, need_grad
    )
    if g is None:
        return d, None
    g_top = g[:, :k].masked_fill(neg, 0.0)
    dlp = rest.sub_(s_tail).exp_().mul_(g[:, k:])  # tail: g_tail * exp(lp - s_tail), 0 at idx
    dlp.scatter_add_(1, idx, g_top)
    return d, _log_softmax_backward_(dlp, lp)
