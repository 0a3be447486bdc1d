"""Memory-efficient fused linear KD loss: ``[N x V]`` logits never exist.

Same arguments, semantics and results (up to float32 rounding) as ``kd_loss_reference``. The forward
pass walks the valid rows ``chunk_size`` at a time; per chunk it computes the student (and teacher)
logits in the input dtype, calls the chunk function (loss per row + analytic ``d loss / d logits`` in
float32, see ``chunk_torch.py``) and turns that gradient into ``grad_hidden[chunk] = grad @ W_s`` and
``grad_weight += grad^T @ h_s`` (``grad_weight`` / ``grad_bias`` accumulate in float32 and are cast to the
weight dtype at the end). The backward pass only multiplies the saved gradients by ``grad_output``.

Extra memory: O(chunk_size x V) float32 temporaries + ``grad_hidden [N, Hs]`` + ``grad_weight [V, Hs]``.
For a dense teacher with forward KL in float32 on CPU (the common training case) the temporaries are three
``[chunk, V]`` buffers allocated once per call and reused by every chunk: the logits matmuls write into
them and the chunk function overwrites them in place (its few-pass path, ``chunk_torch._forward_kl_dense``),
and the gradient's scalar factor is folded into the gradient matmuls (``alpha=``). On CUDA, with Triton importable and a dense teacher, the chunk function is the Triton kernel
``chunk_triton.kd_chunk_loss_and_grad_triton``; otherwise the torch one.

Logit transforms (``student_logit_transform`` / ``teacher_logit_transform``: Gemma's softcap, Cohere's and
Granite's multipliers) are applied to each chunk's logits in float32 (in place; 16-bit logits are upcast
first), before anything reads them; the gradient through a softcap is ``1 - (z'/cap)**2`` times that w.r.t. ``z'`` (one extra float32
``[chunk, V]`` factor, kept only for a student softcap), a multiplier folds into the scalar coefficient. The
Triton kernel applies both as it loads the logits.

With ``return_parts=True`` and a teacher, ``parts["top1_agree"]`` counts the valid rows where the student's
and the teacher's argmax agree: two read-only argmax passes per chunk (``chunk_torch.top1_matches``), taken
before the chunk function (which may overwrite the logits); nothing is computed for it otherwise.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .chunk_torch import chunk_loss_scaled, forward_kl_fast_path, top1_matches
from .kd_loss_reference import _validate, _validate_transforms
from .logit_transform import LogitTransform

__all__ = ["CHUNK_BUDGET_BYTES", "CUDA_CHUNK_BUDGET_BYTES", "WORKSPACE_TEMPS", "default_chunk_size", "fused_linear_kd_loss"]

# chunk_size=None: the largest chunk whose float32 [chunk, V] temporaries fit in CHUNK_BUDGET_BYTES: the
# three reused buffers of the CPU forward-KL path (WORKSPACE_TEMPS), or ~_LIVE_TEMPS fresh ones otherwise.
CHUNK_BUDGET_BYTES: int = 256 * 2**20
WORKSPACE_TEMPS: int = 3
_LIVE_TEMPS: int = 8
# On CUDA the chunk's temporaries are the 16-bit logits of both models and the float32 gradient (the Triton
# kernel writes the loss and gradient in one pass), so budget ~4 float32-equivalents of 2 GiB in all: about
# 1000 rows at V=128256, the chunk size GEMMs on an H100-class GPU want. Not yet measured on a GPU.
CUDA_CHUNK_BUDGET_BYTES: int = 2 * 2**30
_CUDA_LIVE_TEMPS: int = 4


def default_chunk_size(vocab: int, n_rows: int, live_temps: int = _LIVE_TEMPS, *, cuda: bool = False) -> int:
    """``budget // (4 bytes * live_temps * V)`` rows, clamped to ``[1, n_rows]``.

    The budget is ``CHUNK_BUDGET_BYTES`` (CPU) or ``CUDA_CHUNK_BUDGET_BYTES`` with ``_CUDA_LIVE_TEMPS``.
    """
    budget = CUDA_CHUNK_BUDGET_BYTES if cuda else CHUNK_BUDGET_BYTES
    if cuda:
        live_temps = _CUDA_LIVE_TEMPS
    rows = budget // (4 * live_temps * max(vocab, 1))
    return max(1, min(rows, n_rows))


@functools.lru_cache(maxsize=1)
def _triton_chunk_fn() -> Callable | None:
    """The Triton chunk function, or None when it cannot be imported (no triton, not written yet, ...)."""
    try:
        from . import chunk_triton
    except Exception:  # any import-time failure means: use the torch path
        return None
    if not getattr(chunk_triton, "TRITON_AVAILABLE", True):
        return None
    return getattr(chunk_triton, "kd_chunk_loss_and_grad_triton", None)


def _uses_workspace(plan: _Plan, h: Tensor) -> bool:
    """Dense teacher, forward KL, float32 on CPU: the chunk loop's preallocated-buffer path."""
    kw = plan.kwargs
    return (
        plan.form == "dense"
        and plan.want_kd
        and h.dtype == torch.float32
        and plan.t_weight is not None
        and plan.t_weight.dtype == torch.float32
        and forward_kl_fast_path(
            kw["divergence"], kw["kd_weight"], kw["temperature"], plan.want_ce, h.is_cuda
        )
    )


def _linear_into(out: Tensor, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """``F.linear(x, w, b)`` written into ``out``."""
    if b is None:
        return torch.mm(x, w.t(), out=out)
    return torch.addmm(b, x, w.t(), out=out)


@dataclass
class _Plan:
    """Everything besides the differentiable student tensors, prepared once per call."""

    form: str | None
    want_kd: bool
    want_ce: bool
    rows: dict[str, Tensor]  # row-aligned inputs (teacher detached)
    t_weight: Tensor | None
    t_bias: Tensor | None
    valid_idx: Tensor | None  # None: every row is valid
    n_valid: int
    denom: Tensor | float
    chunk_size: int
    kwargs: dict  # divergence, beta, temperature, kd_weight, ce_weight, ignore_index, scale
    want_top1: bool = False  # count student/teacher argmax agreement (return_parts with a teacher)
    student_xf: LogitTransform | None = None  # None: the lm_head output is the logit
    teacher_xf: LogitTransform | None = None  # dense teacher only


def _run(
    h: Tensor, w: Tensor, b: Tensor | None, plan: _Plan, needs: tuple[bool, bool, bool]
) -> tuple[Tensor, Tensor, Tensor, Tensor, tuple[Tensor | None, Tensor | None, Tensor | None]]:
    """Loop over chunks: (loss, kd part, ce part, top-1 matches, (grad_h, grad_w, grad_b) or Nones).

    The top-1 count (0 unless ``plan.want_top1``) is taken on each chunk's logits before the chunk function,
    which may overwrite them (CPU forward-KL path); on CUDA the Triton kernel leaves them intact, the count is
    two torch argmax passes over the 16-bit logits all the same.
    """
    need_h, need_w, need_b = needs
    need_grad = need_h or need_w or need_b
    n_loop = plan.n_valid if plan.want_kd or plan.want_ce else 0
    grad_h = grad_w = grad_b = None
    if need_h:
        # every row is written by the loop only when all rows are valid and there is a term to compute
        # (kd_weight == ce_weight == 0 runs no chunk); otherwise unwritten rows must read as zero
        alloc = torch.empty if plan.valid_idx is None and n_loop > 0 else torch.zeros
        grad_h = alloc(h.shape, dtype=h.dtype, device=h.device)
    if need_w:
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
    if need_b:
        grad_b = torch.zeros(b.shape, dtype=torch.float32, device=b.device)
    kd_sum = torch.zeros((), dtype=torch.float32, device=h.device)
    ce_sum = torch.zeros((), dtype=torch.float32, device=h.device)
    top1 = torch.zeros((), dtype=torch.int64, device=h.device)
    kw = plan.kwargs

    triton_fn = _triton_chunk_fn() if h.is_cuda and plan.form != "topk" else None
    step = plan.chunk_size
    # dense forward KL on CPU in float32: student logits, teacher logits and the gradient live in three
    # [chunk, V] buffers reused by every chunk (the chunk function overwrites the logits in place)
    workspace = None
    if need_grad and n_loop > 0 and _uses_workspace(plan, h):
        workspace = torch.empty((3, min(step, n_loop), w.shape[0]), dtype=torch.float32, device=h.device)
    for start in range(0, n_loop, step):
        stop = min(start + step, plan.n_valid)
        if plan.valid_idx is None:
            sel = None
            rows = {k: v[start:stop] for k, v in plan.rows.items()}
        else:
            sel = plan.valid_idx[start:stop]
            rows = {k: v.index_select(0, sel) for k, v in plan.rows.items()}
        h_c = h[start:stop] if sel is None else h.index_select(0, sel)
        z_t = scratch = None
        if workspace is not None:
            z_s = _linear_into(workspace[0, : stop - start], h_c, w, b)
            z_t = _linear_into(workspace[1, : stop - start], rows["h_t"], plan.t_weight, plan.t_bias)
            scratch = workspace[2, : stop - start]
        else:
            z_s = F.linear(h_c, w, b)
        if plan.form == "dense" and plan.want_kd and z_t is None:
            z_t = F.linear(rows["h_t"], plan.t_weight, plan.t_bias)
        elif plan.form == "logits" and plan.want_kd:
            z_t = rows["z_t"]
        topk = (rows["lp_t"], rows["idx"]) if plan.form == "topk" and plan.want_kd else None
        labels = rows.get("labels")
        factor, xf_coef = None, 1.0  # d z'/d z = xf_coef * factor (the student's logit transform)
        if triton_fn is None:  # the Triton kernel transforms as it loads
            if plan.student_xf is not None:  # in float32, as the reference (and the Triton kernel) do
                z_s = z_s.float()
                factor = plan.student_xf.apply_(z_s, want_factor=need_grad)
                xf_coef = plan.student_xf.scale
            if plan.teacher_xf is not None and plan.form == "dense" and z_t is not None:
                z_t = z_t.float()
                plan.teacher_xf.apply_(z_t, want_factor=False)
        if plan.want_top1:  # before the chunk function overwrites the logits
            top1 += top1_matches(z_s, z_t, topk)  # (raw logits on the Triton path: a transform keeps the argmax)
        coef = 1.0  # the chunk's gradient is coef * g
        if triton_fn is not None:
            kd_r, ce_r, g = triton_fn(z_s, z_t, labels, **kw, student_transform=plan.student_xf,
                                      teacher_transform=plan.teacher_xf)  # CE rows whenever labels are given
        else:
            kd_r, ce_r, g, coef = chunk_loss_scaled(
                z_s, z_t, labels, **kw, teacher_topk=topk, need_grad=need_grad, scratch=scratch
            )
        del z_s, z_t
        kd_sum += kd_r.sum()
        ce_sum += ce_r.sum()
        if not need_grad:
            continue
        if factor is not None:
            g.mul_(factor)
            del factor
        coef *= xf_coef
        g_lp = g.to(h.dtype)
        if grad_h is not None:
            out = torch.mm(g_lp, w, out=grad_h[start:stop]) if sel is None else g_lp @ w
            if coef != 1.0:
                out.mul_(coef)
            if sel is not None:
                grad_h.index_copy_(0, sel, out)
        if grad_w is not None:
            if g_lp.dtype == torch.float32:
                grad_w.addmm_(g_lp.t(), h_c, alpha=coef)
            else:
                grad_w.add_(g_lp.t() @ h_c, alpha=coef)
        if grad_b is not None:
            grad_b.add_(g.sum(0), alpha=coef)
        del g, g_lp

    loss_sum = torch.zeros((), dtype=torch.float32, device=h.device)
    if plan.want_kd and kw["kd_weight"] != 0:
        loss_sum = loss_sum + kw["kd_weight"] * kd_sum
    if plan.want_ce and kw["ce_weight"] != 0:
        loss_sum = loss_sum + kw["ce_weight"] * ce_sum
    loss = loss_sum / plan.denom
    if grad_w is not None:
        grad_w = grad_w.to(w.dtype)
    if grad_b is not None:
        grad_b = grad_b.to(b.dtype)
    return loss, kd_sum / plan.denom, ce_sum / plan.denom, top1, (grad_h, grad_w, grad_b)


class _FusedLinearKD(torch.autograd.Function):
    """Forward computes loss and gradients chunk by chunk; backward scales the saved gradients."""

    @staticmethod
    def forward(ctx, h: Tensor, w: Tensor, b: Tensor | None, plan: _Plan):  # type: ignore[override]
        needs = tuple(bool(x) for x in ctx.needs_input_grad[:3])
        loss, kd, ce, top1, grads = _run(h, w, b, plan, needs)  # type: ignore[arg-type]
        ctx.save_for_backward(*grads)
        ctx.mark_non_differentiable(kd, ce, top1)
        return loss, kd, ce, top1

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: Tensor, *_grad_parts: Tensor):  # type: ignore[override]
        grads = [None if g is None else g * grad_loss for g in ctx.saved_tensors]
        return grads[0], grads[1], grads[2], None


def fused_linear_kd_loss(
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
    """KD (+ optional hard-label CE) loss of an lm_head without materialising ``[N, V]`` logits.

    Arguments, result and ``return_parts`` are those of ``kd_loss_reference`` (see its docstring).
    ``chunk_size`` rows are processed at a time; None picks ``default_chunk_size`` (about
    ``CHUNK_BUDGET_BYTES`` = 256 MiB of float32 ``[chunk, V]`` temporaries). Gradients for ``student_hidden``,
    ``student_weight`` and ``student_bias`` are computed during the forward when autograd needs them.
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
    student_xf, teacher_xf = _validate_transforms(form, student_logit_transform, teacher_logit_transform)
    n, vocab = student_hidden.shape[0], student_weight.shape[0]
    valid_idx: Tensor | None = None
    n_valid = n
    if labels is not None:
        valid_idx = (labels != ignore_index).nonzero().squeeze(1)
        n_valid = int(valid_idx.numel())
        if n_valid == n:
            valid_idx = None  # every row valid: plain slices

    want_kd = form is not None and (kd_weight != 0 or return_parts)
    want_ce = labels is not None and (ce_weight != 0 or return_parts)
    rows: dict[str, Tensor] = {}
    if want_ce:
        rows["labels"] = labels
    if want_kd and form == "dense":
        rows["h_t"] = teacher_hidden.detach()
    elif want_kd and form == "logits":
        rows["z_t"] = teacher_logits.detach()
    elif want_kd and form == "topk":
        rows["lp_t"] = teacher_topk[0].detach()
        rows["idx"] = teacher_topk[1].long()

    if num_valid_tokens is None:
        denom: Tensor | float = float(max(n_valid, 1))
        scale = 1.0 / denom
    elif isinstance(num_valid_tokens, Tensor):
        # A count on the device stays there: the scale is a float64 device scalar (exactly 1.0 / count, as
        # for an int), so the training step reads nothing back from the GPU here.
        count = num_valid_tokens.detach().to(device=student_hidden.device)
        denom = count.to(torch.float32)
        scale = 1.0 / count.to(torch.float64)
    else:
        denom = float(num_valid_tokens)
        scale = 1.0 / denom

    plan = _Plan(
        form=form,
        want_kd=want_kd,
        want_ce=want_ce,
        rows=rows,
        t_weight=teacher_weight.detach() if form == "dense" else None,
        t_bias=teacher_bias.detach() if teacher_bias is not None else None,
        valid_idx=valid_idx,
        n_valid=n_valid,
        denom=denom,
        chunk_size=chunk_size or 0,  # 0: set below
        kwargs=dict(
            divergence=divergence,
            beta=float(beta),
            temperature=float(temperature),
            kd_weight=float(kd_weight),
            ce_weight=float(ce_weight),
            ignore_index=ignore_index,
            scale=scale,
        ),
        want_top1=return_parts and want_kd,
        student_xf=student_xf,
        teacher_xf=teacher_xf if form == "dense" else None,
    )
    if not plan.chunk_size:
        temps = WORKSPACE_TEMPS if _uses_workspace(plan, student_hidden) else _LIVE_TEMPS
        temps += student_xf is not None and student_xf.softcap is not None  # the softcap's gradient factor
        plan.chunk_size = default_chunk_size(vocab, n_valid, temps, cuda=student_hidden.is_cuda)
    params = (student_hidden, student_weight, student_bias)
    if torch.is_grad_enabled() and any(p is not None and p.requires_grad for p in params):
        loss, kd, ce, top1 = _FusedLinearKD.apply(student_hidden, student_weight, student_bias, plan)
    else:
        with torch.no_grad():
            loss, kd, ce, top1, _ = _run(
                student_hidden, student_weight, student_bias, plan, (False, False, False)
            )
    if not return_parts:
        return loss
    parts: dict[str, Tensor | int] = {"kd": kd, "ce": ce, "num_valid": n_valid}
    if plan.want_top1:
        parts["top1_agree"] = top1
    return loss, parts
