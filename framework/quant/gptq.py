"""GPTQ (Frantar et al., 2022): quantize a linear's weight column by column, each column's rounding error
compensated on the columns not yet quantized, using the inverse Hessian of the layer's output error.

For a linear `y = W x` with calibration inputs X, the layer-wise objective ||W X - Q X||^2 has Hessian
H = 2 X X^T (the constant does not matter). This implementation follows the paper's recipe:

- dead inputs (diag(H) == 0) get H_ii = 1 and their weights are zeroed;
- damping: H += damp * mean(diag(H)) * I (1% by default);
- the upper Cholesky factor of H^-1 gives the per-column update rows;
- columns are processed in blocks of `block_size` with the trailing columns updated lazily once per block;
- group scales (absmax, or with `observer="mse"` the clipped scale of least rounding error) are computed when
  the group's first column is reached (from the already-updated weights),
  or, with `act_order` (columns by decreasing diag(H)), for all groups up front from the original weights
  ("static groups"), so the export keeps contiguous groups and needs no column permutation (g_idx).

Distillation-guided GPTQ passes one Hessian per group of output rows (`hessian [G, in, in]`): rows
`g * out/G ... (g+1) * out/G` are quantized against H_g (see guided.py).
"""

from __future__ import annotations

import math

import torch

from sapling.quant.numerics import OBSERVERS, QuantSpec, quantize_with_scales


def _prepare_hessian(h: torch.Tensor, w: torch.Tensor, damp: float) -> torch.Tensor:
    h = h.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    return h


def _upper_inverse_cholesky(h: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of H^-1 (rows of it drive GPTQ's error propagation)."""
    try:
        lower = torch.linalg.cholesky(h)
    except torch.linalg.LinAlgError as e:  # pragma: no cover - damping makes H positive definite in practice
        raise ValueError("GPTQ: the damped Hessian is not positive definite; raise quant.damp") from e
    return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)


def _gptq_rows(w: torch.Tensor, h: torch.Tensor, spec: QuantSpec, block_size: int, damp: float,
               act_order: bool, observer: str = "minmax") -> tuple[torch.Tensor, torch.Tensor]:
    group_scales = OBSERVERS[observer]
    rows, cols = w.shape
    gsize = spec.columns_per_group(cols)
    w = w.double().clone()
    h = _prepare_hessian(h, w, damp)
    # Scales for every group; with act_order all are fixed now (static groups), otherwise each group's
    # scale is recomputed from the updated weights when its first column comes up.
    scales = group_scales(w, spec)
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(cols, device=w.device)
    w = w[:, perm]
    hinv = _upper_inverse_cholesky(h[perm][:, perm])
    q = torch.zeros(rows, cols, dtype=torch.int8, device=w.device)
    # Without act-order a group must not straddle two blocks (its scale is taken from one block's columns).
    block = block_size if act_order else max(gsize, math.ceil(block_size / gsize) * gsize)
    for start in range(0, cols, block):
        end = min(start + block, cols)
        w_blk = w[:, start:end].clone()
        err_blk = torch.zeros_like(w_blk)
        hinv_blk = hinv[start:end, start:end]
        for i in range(end - start):
            col = int(perm[start + i])
            grp = col // gsize
            if not act_order and col % gsize == 0:
                scales[:, grp] = group_scales(w_blk[:, i:i + gsize], spec)[:, 0]
            s = scales[:, grp].double()
            column = w_blk[:, i]
            qcol = quantize_with_scales(column, s, spec)
            q[:, start + i] = qcol
            err = (column - qcol.double() * s) / hinv_blk[i, i]
            w_blk[:, i:] -= err[:, None] * hinv_blk[i, i:][None, :]
            err_blk[:, i] = err
        w[:, end:] -= err_blk @ hinv[start:end, end:]
    inverse = torch.argsort(perm)
    return q[:, inverse], scales


@torch.no_grad()
def gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    spec: QuantSpec,
    *,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    observer: str = "minmax",
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ-quantize `weight [out, in]` given `hessian [in, in]` (or `[G, in, in]`, one per row group).

    Returns `(q int8 [out, in], scale [out, groups] in spec.scale_dtype)`; `dequantize(q, scale)` is the
    quantized weight. Arithmetic is float64 (the Hessian inverse is ill-conditioned in low precision).
    `observer`: how each group's scale is chosen, `minmax` (its absmax) or `mse` (the absmax shrunk to minimise
    the group's rounding error; see numerics.mse_group_scales).
    """
    if observer not in OBSERVERS:
        raise ValueError(f"observer {observer!r}: expected one of {sorted(OBSERVERS)}")
    rows, cols = weight.shape
    if not spec.fits(cols):
        raise ValueError(f"input width {cols} is not a multiple of the group size {spec.group_size}")
    hs = hessian if hessian.dim() == 3 else hessian[None]
    if hs.shape[1:] != (cols, cols):
        raise ValueError(f"Hessian shape {tuple(hessian.shape)} does not match a weight with {cols} input columns")
    groups = hs.shape[0]
    if rows % groups:
        raise ValueError(f"{rows} output rows cannot be split into {groups} equal saliency groups")
    per = rows // groups
    qs, scales = [], []
    for g in range(groups):
        q, s = _gptq_rows(weight[g * per:(g + 1) * per], hs[g], spec, block_size, damp, act_order, observer)
        qs.append(q)
        scales.append(s)
    return torch.cat(qs), torch.cat(scales)
