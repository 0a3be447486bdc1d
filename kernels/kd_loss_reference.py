"""Plain-PyTorch reference of Sapling's fused linear knowledge-distillation (KD) loss.

This is the ground truth the Triton kernel is tested against. It materialises logits (one chunk of rows
at a time) and lets autograd do the backward.

Loss
----
Student logits ``z_s = h_s @ W_s^T (+ b_s)``; dense teacher logits ``z_t = h_t @ W_t^T (+ b_t)`` or a
precomputed ``teacher_logits``. The matmuls run in the input dtype; everything after them (softmax,
log-softmax, divergences, cross-entropy) runs in float32. With temperature ``T``::

    p_s = softmax(z_s / T),   p_t = softmax(z_t / T)
    loss = sum_{valid i} (kd_weight * T**2 * D(p_t[i], p_s[i]) + ce_weight * CE(z_s[i], y[i])) / n

``CE`` is the hard-label cross-entropy at ``T = 1``. Valid tokens are ``labels != ignore_index`` (all
rows when ``labels`` is None); other rows contribute nothing and get zero gradient. ``n`` is
``num_valid_tokens`` when given (e.g. a global count across ranks / accumulation steps), otherwise the
local number of valid tokens. The teacher is a constant: no gradient flows to teacher tensors.

Divergences (``D``), per token, over the vocabulary::

    forward_kl   KL(p_t || p_s) = sum p_t * (log p_t - log p_s)
    reverse_kl   KL(p_s || p_t) = sum p_s * (log p_s - log p_t)
    jsd          beta * KL(p_t || m) + (1 - beta) * KL(p_s || m),   m = beta * p_t + (1 - beta) * p_s

``log m`` is ``logaddexp(log(beta) + log p_t, log(1 - beta) + log p_s)``; at ``beta = 0`` (``m = p_s``)
and ``beta = 1`` (``m = p_t``) the JSD is exactly 0 and the zero-weight term is skipped.

Numerical safety: all log-probabilities come from ``log_softmax``. A probability of exactly 0 is treated
as the smallest normal float32, ``TINY = 2**-126`` (``log TINY = LOG_TINY ~ -87.34``): teacher
log-probs are clamped from below at ``LOG_TINY`` and ``-inf`` student log-probs (e.g. from a ``-inf``
bias) are replaced by it. This only changes terms whose probability is below ``TINY`` (their
contribution is ~1e-38), keeps every term finite -- notably reverse KL against a teacher whose masked
vocabulary entries have ``-inf`` logits, which would otherwise be infinite -- and never cuts the
gradient of a finite student log-prob, however negative (logits of magnitude 1e4 are fine).

Logit transforms
----------------
``student_logit_transform`` / ``teacher_logit_transform`` (a ``LogitTransform``: a multiplier and/or a final
softcap, see ``logit_transform.py``) turn ``W·h (+ b)`` into the model's own logits before anything else
(temperature, softmax, CE), for families whose lm_head output is not the logit (Gemma 2/3, Cohere, Granite).
The teacher's transform applies to the dense teacher only: ``teacher_logits`` and ``teacher_topk`` are taken
as the model's final logits / log-probs.

Top-k teacher
-------------
``teacher_topk = (lp_t, idx)``: the teacher's log-probs ``lp_t [N, k]`` *already at temperature T*
(whoever cached them applied T) and their vocabulary indices ``idx [N, k]`` (distinct within a row). The
vocabulary is collapsed into ``k + 1`` buckets: the k cached tokens plus one tail bucket holding all
remaining mass. For each token::

    teacher:  q_j = lp_t[j]                          (j < k)
              q_tail = log(max(1 - sum_j exp(lp_t[j]), TINY))
                     = log(max(-expm1(logsumexp(lp_t)), TINY))
    student:  r = log_softmax(z_s / T)               (full row)
              r_j = r[idx[j]]                         (j < k)
              r_tail = logsumexp({r[v] : v not in idx} U {LOG_TINY})

``r_tail`` masks the k gathered entries to ``-inf`` and takes the logsumexp of the rest of the row,
which is exact even when the top-k holds almost all the mass (``1 - sum`` would cancel); the extra
``LOG_TINY`` term adds TINY of mass so that ``k = V`` (an empty tail) stays finite with a finite
gradient. The teacher tail is clamped at TINY for the same reason (rounding can make ``sum`` exceed 1).
``D`` is then computed between the two (k+1)-bucket distributions with the formulas above; with
``k = V`` it equals the dense loss up to float32 rounding.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .logit_transform import LogitTransform, as_transform

__all__ = ["DIVERGENCES", "LOG_TINY", "kd_loss_reference"]

DIVERGENCES: tuple[str, ...] = ("forward_kl", "reverse_kl", "jsd")

LOG_TINY: float = math.log(torch.finfo(torch.float32).tiny)


# ----------------------------------------------------------------------------------------------------
# divergences on log-probabilities (last dim = buckets / vocabulary), per row
# ----------------------------------------------------------------------------------------------------


def _kl(lp_p: Tensor, lp_q: Tensor) -> Tensor:
    """KL(p || q) per row from finite log-probs; exp() underflow to 0 gives an exact 0 term."""
    return (lp_p.exp() * (lp_p - lp_q)).sum(-1)


def _divergence(lp_s: Tensor, lp_t: Tensor, divergence: str, beta: float) -> Tensor:
    if divergence == "forward_kl":
        return _kl(lp_t, lp_s)
    if divergence == "reverse_kl":
        return _kl(lp_s, lp_t)
    # jsd
    if beta == 0.0:
        log_m = lp_s
    elif beta == 1.0:
        log_m = lp_t
    else:
        log_m = torch.logaddexp(lp_t + math.log(beta), lp_s + math.log1p(-beta))
    out = None
    if beta != 0.0:
        out = beta * _kl(lp_t, log_m)
    if beta != 1.0:
        term = (1.0 - beta) * _kl(lp_s, log_m)
        out = term if out is None else out + term
    return out


def _floor_neginf(lp: Tensor) -> Tensor:
    """Replace -inf log-probs by LOG_TINY (gradient of finite entries untouched)."""
    return lp.masked_fill(torch.isneginf(lp), LOG_TINY)


def _dense_log_probs(z_s: Tensor, z_t: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    lp_s = _floor_neginf(F.log_softmax(z_s / temperature, dim=-1))
    lp_t = F.log_softmax(z_t.float() / temperature, dim=-1).clamp(min=LOG_TINY)
    return lp_s, lp_t


def _topk_log_probs(z_s: Tensor, lp_t: Tensor, idx: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """(k+1)-bucket log-probs of student and teacher; see the module docstring."""
    r = F.log_softmax(z_s / temperature, dim=-1)
    s_top = _floor_neginf(r.gather(1, idx))
    rest = r.scatter(1, idx, float("-inf"))
    floor_col = torch.full((r.shape[0], 1), LOG_TINY, dtype=r.dtype, device=r.device)
    s_tail = torch.logsumexp(torch.cat([rest, floor_col], dim=1), dim=1, keepdim=True)

    t_top = lp_t.float().clamp(min=LOG_TINY)
    t_tail_mass = -torch.expm1(torch.logsumexp(t_top, dim=1, keepdim=True))
    t_tail = t_tail_mass.clamp(min=torch.finfo(torch.float32).tiny).log()
    return torch.cat([s_top, s_tail], dim=1), torch.cat([t_top, t_tail], dim=1)


# ----------------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------------


def _check_2d(name: str, t: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")


def _check_bias(name: str, bias: Tensor | None, vocab: int) -> None:
    if bias is not None and tuple(bias.shape) != (vocab,):
        raise ValueError(
            f"{name} must have shape ({vocab},) to match the vocabulary, got {tuple(bias.shape)}"
        )


def _validate(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor | None,
    teacher_weight: Tensor | None,
    teacher_topk: tuple[Tensor, Tensor] | None,
    labels: Tensor | None,
    divergence: str,
    beta: float,
    temperature: float,
    kd_weight: float,
    ce_weight: float,
    student_bias: Tensor | None,
    teacher_bias: Tensor | None,
    teacher_logits: Tensor | None,
    num_valid_tokens: int | Tensor | None,
    chunk_size: int | None,
) -> str | None:
    """Raise ValueError on bad arguments; return the teacher form ("dense", "logits", "topk" or None)."""
    _check_2d("student_hidden", student_hidden)
    _check_2d("student_weight", student_weight)
    n, hs = student_hidden.shape
    vocab, hs_w = student_weight.shape
    if hs != hs_w:
        raise ValueError(
            f"student_hidden has hidden size Hs={hs} but student_weight has shape "
            f"{tuple(student_weight.shape)} (expected [V, {hs}])"
        )
    _check_bias("student_bias", student_bias, vocab)

    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; valid divergences: {', '.join(DIVERGENCES)}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if not (isinstance(beta, (int, float)) and 0.0 <= beta <= 1.0):
        raise ValueError(f"beta must be in [0, 1], got {beta!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size <= 0):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if isinstance(num_valid_tokens, (int, float)) and not isinstance(num_valid_tokens, bool):
        if num_valid_tokens <= 0:
            raise ValueError(f"num_valid_tokens must be > 0, got {num_valid_tokens!r}")
    elif num_valid_tokens is not None and not isinstance(num_valid_tokens, Tensor):
        raise ValueError(
            f"num_valid_tokens must be an int, a Tensor or None, got {type(num_valid_tokens).__name__}"
        )

    if labels is not None:
        if labels.shape != (n,):
            raise ValueError(
                f"labels must have shape ({n},) to match student_hidden, got {tuple(labels.shape)}"
            )
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    if ce_weight != 0 and labels is None:
        raise ValueError(f"ce_weight={ce_weight} needs labels (hard-label cross-entropy), but labels is None")

    dense = teacher_hidden is not None or teacher_weight is not None
    given = {
        "teacher_hidden/teacher_weight": dense,
        "teacher_logits": teacher_logits is not None,
        "teacher_topk": teacher_topk is not None,
    }
    forms = [name for name, present in given.items() if present]
    if len(forms) > 1:
        raise ValueError(f"give exactly one teacher form, got more than one: {', '.join(forms)}")
    if teacher_bias is not None and not dense:
        raise ValueError("teacher_bias is only used with the dense teacher (teacher_hidden + teacher_weight)")
    if not forms:
        if kd_weight != 0:
            raise ValueError(
                f"kd_weight={kd_weight} needs a teacher: pass teacher_hidden + teacher_weight, "
                "teacher_logits or teacher_topk (or set kd_weight=0 for plain cross-entropy)"
            )
        return None

    if dense:
        if teacher_hidden is None or teacher_weight is None:
            missing = "teacher_hidden" if teacher_hidden is None else "teacher_weight"
            raise ValueError(
                f"the dense teacher needs both teacher_hidden and teacher_weight; {missing} is None"
            )
        _check_2d("teacher_hidden", teacher_hidden)
        _check_2d("teacher_weight", teacher_weight)
        if teacher_hidden.shape[0] != n:
            raise ValueError(
                f"teacher_hidden has N={teacher_hidden.shape[0]} rows but student_hidden has N={n}"
            )
        if teacher_weight.shape[0] != vocab:
            raise ValueError(
                f"teacher_weight has vocabulary size V={teacher_weight.shape[0]} "
                f"but student_weight has V={vocab}"
            )
        if teacher_hidden.shape[1] != teacher_weight.shape[1]:
            raise ValueError(
                f"teacher_hidden has hidden size Ht={teacher_hidden.shape[1]} but teacher_weight has shape "
                f"{tuple(teacher_weight.shape)} (expected [V, {teacher_hidden.shape[1]}])"
            )
        _check_bias("teacher_bias", teacher_bias, vocab)
        return "dense"

    if teacher_logits is not None:
        _check_2d("teacher_logits", teacher_logits)
        if tuple(teacher_logits.shape) != (n, vocab):
            raise ValueError(
                f"teacher_logits must have shape (N, V) = ({n}, {vocab}), got {tuple(teacher_logits.shape)}"
            )
        return "logits"

    if not (isinstance(teacher_topk, (tuple, list)) and len(teacher_topk) == 2):
        raise ValueError("teacher_topk must be a (logprobs [N, k], indices [N, k]) pair")
    lp_t, idx = teacher_topk
    _check_2d("teacher_topk logprobs", lp_t)
    _check_2d("teacher_topk indices", idx)
    if lp_t.shape != idx.shape:
        raise ValueError(
            f"teacher_topk logprobs {tuple(lp_t.shape)} and indices {tuple(idx.shape)} "
            "must have the same shape"
        )
    if lp_t.shape[0] != n:
        raise ValueError(f"teacher_topk has N={lp_t.shape[0]} rows but student_hidden has N={n}")
    if not lp_t.dtype.is_floating_point:
        raise ValueError(f"teacher_topk logprobs must be floating point, got dtype {lp_t.dtype}")
    if idx.dtype.is_floating_point or idx.dtype == torch.bool:
        raise ValueError(f"teacher_topk indices must be an integer tensor, got dtype {idx.dtype}")
    k = lp_t.shape[1]
    if not 1 <= k <= vocab:
        raise ValueError(f"teacher_topk k={k} must be in [1, V={vocab}]")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= vocab):
        raise ValueError(f"teacher_topk indices must be in [0, V={vocab})")
    return "topk"


def _validate_transforms(
    form: str | None, student: LogitTransform | None, teacher: LogitTransform | None
) -> tuple[LogitTransform | None, LogitTransform | None]:
    """The (student, teacher) transforms, None for none or the identity; ValueError on a bad one or a teacher
    transform without a dense teacher (cached logits / top-k are already the model's own)."""
    xs = as_transform(student, "student_logit_transform")
    xt = as_transform(teacher, "teacher_logit_transform")
    if xt is not None and form != "dense":
        raise ValueError(
            "teacher_logit_transform applies to the dense teacher (teacher_hidden + teacher_weight) only; "
            "teacher_logits and teacher_topk must already be the teacher's final logits / log-probs"
        )
    return xs, xt


# ----------------------------------------------------------------------------------------------------
# the loss
# ----------------------------------------------------------------------------------------------------


def kd_loss_reference(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor | None = None,
    teacher_weight: Tensor | None = None,
    teacher_topk: tuple[Tensor, Tensor] | None = None,
    labels: Tensor | None = None,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
    ignore_index: int = -100,
    *,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    teacher_logits: Tensor | None = None,
    num_valid_tokens: int | Tensor | None = None,
    return_parts: bool = False,
    chunk_size: int | None = None,
    student_logit_transform: LogitTransform | None = None,
    teacher_logit_transform: LogitTransform | None = None,
) -> Tensor | tuple[Tensor, dict[str, Tensor | int]]:
    """KD (+ optional hard-label CE) loss of an lm_head, as a float32 scalar. See the module docstring.

    ``chunk_size`` processes the valid rows ``chunk_size`` at a time; with autograd on, each chunk is
    activation-checkpointed, so only one chunk's [chunk_size, V] float32 temporaries are alive at once
    (forward and backward). With ``return_parts=True`` returns ``(loss, parts)`` where ``parts["kd"]`` is
    ``sum T**2 * D / n`` and ``parts["ce"]`` is ``sum CE / n`` (detached, same normaliser ``n`` as the
    loss, so ``loss == kd_weight * kd + ce_weight * ce``) and ``parts["num_valid"]`` the local count of
    valid tokens. ``parts["kd"]`` is computed whenever a teacher is given, even with ``kd_weight=0``.
    With a teacher, ``parts["top1_agree"]`` (0-d int64 tensor) is the number of valid rows where
    ``argmax(z_s) == argmax(z_t)`` (for a top-k teacher ``idx[argmax(lp_t)]``, i.e. ``idx[:, 0]`` when the
    top-k is sorted); ``top1_agree / num_valid`` is the top-1 agreement rate.
    """
    form = _validate(
        student_hidden,
        student_weight,
        teacher_hidden,
        teacher_weight,
        teacher_topk,
        labels,
        divergence,
        beta,
        temperature,
        kd_weight,
        ce_weight,
        student_bias,
        teacher_bias,
        teacher_logits,
        num_valid_tokens,
        chunk_size,
    )
    xs, xt = _validate_transforms(form, student_logit_transform, teacher_logit_transform)
    temperature = float(temperature)
    beta = float(beta)

    n = student_hidden.shape[0]
    if labels is not None:
        valid_idx: Tensor | None = (labels != ignore_index).nonzero().squeeze(1)
        n_valid = int(valid_idx.numel())
    else:
        valid_idx = None
        n_valid = n

    want_kd = form is not None and (kd_weight != 0 or return_parts)
    want_ce = labels is not None and (ce_weight != 0 or return_parts)

    # Row-aligned inputs are sliced per chunk; the teacher is a constant (detached).
    row_inputs: dict[str, Tensor] = {"h_s": student_hidden}
    if want_ce:
        row_inputs["labels"] = labels
    if want_kd and form == "dense":
        row_inputs["h_t"] = teacher_hidden.detach()
    elif want_kd and form == "logits":
        row_inputs["z_t"] = teacher_logits.detach()
    elif want_kd and form == "topk":
        row_inputs["lp_t"] = teacher_topk[0].detach()
        row_inputs["idx"] = teacher_topk[1].long()
    t_weight = teacher_weight.detach() if form == "dense" else None
    t_bias = teacher_bias.detach() if teacher_bias is not None else None

    def chunk_sums(
        rows: dict[str, Tensor], weight: Tensor, bias: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        z_s = F.linear(rows["h_s"], weight, bias).float()
        if xs is not None:
            z_s = xs(z_s)
        zero = z_s.new_zeros(())
        kd_sum = ce_sum = zero
        top1 = torch.zeros((), dtype=torch.int64, device=z_s.device)
        if want_kd:
            ctx = contextlib.nullcontext() if kd_weight != 0 else torch.no_grad()
            with ctx:
                if form == "topk":
                    lp_s, lp_t = _topk_log_probs(z_s, rows["lp_t"], rows["idx"], temperature)
                else:
                    z_t = rows["z_t"] if form == "logits" else F.linear(rows["h_t"], t_weight, t_bias)
                    if xt is not None:
                        z_t = xt(z_t.float())
                    lp_s, lp_t = _dense_log_probs(z_s, z_t, temperature)
                kd_sum = _divergence(lp_s, lp_t, divergence, beta).sum()
            if return_parts:
                with torch.no_grad():
                    if form == "topk":
                        best = rows["lp_t"].argmax(dim=1, keepdim=True)
                        top_t = rows["idx"].gather(1, best).squeeze(1)
                    else:
                        top_t = z_t.argmax(dim=-1)
                    top1 = (z_s.argmax(dim=-1) == top_t).sum()
        if want_ce:
            ctx = contextlib.nullcontext() if ce_weight != 0 else torch.no_grad()
            with ctx:
                ce_sum = F.cross_entropy(z_s, rows["labels"], reduction="sum")
        return kd_sum, ce_sum, top1

    step = n_valid if chunk_size is None else chunk_size
    use_ckpt = chunk_size is not None and torch.is_grad_enabled()
    kd_total: Tensor | None = None
    ce_total: Tensor | None = None
    top1_total = torch.zeros((), dtype=torch.int64, device=student_hidden.device)
    for start in range(0, n_valid, max(step, 1)):
        stop = min(start + step, n_valid)
        if valid_idx is None:
            rows = {k: v[start:stop] for k, v in row_inputs.items()}
        else:
            sel = valid_idx[start:stop]
            rows = {k: v.index_select(0, sel) for k, v in row_inputs.items()}
        if use_ckpt:
            kd_c, ce_c, top1_c = checkpoint(
                chunk_sums, rows, student_weight, student_bias, use_reentrant=False
            )
        else:
            kd_c, ce_c, top1_c = chunk_sums(rows, student_weight, student_bias)
        top1_total = top1_total + top1_c
        kd_total = kd_c if kd_total is None else kd_total + kd_c
        ce_total = ce_c if ce_total is None else ce_total + ce_c

    # Graph-connected zero, so backward works with no valid token (gives zero gradients).
    zero = (student_hidden[:0].sum() + student_weight[:0].sum()).float()
    if student_bias is not None:
        zero = zero + student_bias[:0].sum().float()
    if kd_total is None:
        kd_total = ce_total = zero
    loss_sum = zero
    if want_kd and kd_weight != 0:
        loss_sum = loss_sum + (kd_weight * temperature**2) * kd_total
    if want_ce and ce_weight != 0:
        loss_sum = loss_sum + ce_weight * ce_total

    if num_valid_tokens is not None:
        denom: Tensor | float = (
            num_valid_tokens.to(device=loss_sum.device, dtype=torch.float32)
            if isinstance(num_valid_tokens, Tensor)
            else float(num_valid_tokens)
        )
    else:
        denom = float(max(n_valid, 1))  # n_valid == 0 -> loss_sum is an exact (connected) 0
    loss = loss_sum / denom
    if not return_parts:
        return loss
    parts: dict[str, Tensor | int] = {
        "kd": (temperature**2 * kd_total / denom).detach(),
        "ce": (ce_total / denom).detach(),
        "num_valid": n_valid,
    }
    if form is not None:
        parts["top1_agree"] = top1_total
    return loss, parts
