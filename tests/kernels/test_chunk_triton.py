"""Tests of the Triton KD chunk kernel against an independent float64 computation (autograd for grads).

On CPU the kernel runs under Triton's interpreter (``TRITON_INTERPRET=1``, set before Triton is
imported), so shapes are tiny; ``block_v=16`` forces several vocabulary tiles and a ragged last tile.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from sapling.kernels import chunk_triton  # noqa: E402
from sapling.kernels.chunk_triton import TRITON_AVAILABLE, kd_chunk_loss_and_grad_triton  # noqa: E402

IGNORE = -100
LOG_TINY64 = math.log(torch.finfo(torch.float32).tiny)
DIV_CASES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.1), ("jsd", 0.5), ("jsd", 0.9)]

# Interpreted kernel (TRITON_INTERPRET=1 when the module was first imported): CPU tensors; else CUDA.
DEVICE = "cpu" if chunk_triton._INTERPRETED else "cuda"
pytestmark = pytest.mark.skipif(
    DEVICE == "cuda" and not torch.cuda.is_available(),
    reason="sapling.kernels.chunk_triton was imported without TRITON_INTERPRET=1 and there is no GPU",
)


# ----------------------------------------------------------------------------------------------------
# independent float64 reference: explicit probabilities and log(m), autograd for the gradient
# ----------------------------------------------------------------------------------------------------


def ref64(zs, zt, labels, *, divergence, beta, temperature, kd_weight, ce_weight, scale, xs=None, xt=None):
    """Per-row KD and CE and the gradient w.r.t. the raw student logits; `xs` / `xt` transform the logits."""
    t = float(temperature)
    zs, zt = zs.cpu(), (zt.cpu() if zt is not None else None)
    labels = labels.cpu() if labels is not None else None
    z_raw = zs.detach().double().requires_grad_(True)
    z = xs(z_raw) if xs is not None else z_raw
    if zt is not None and xt is not None:
        zt = xt(zt.double())
    c = z.shape[0]
    valid = torch.ones(c, dtype=torch.bool) if labels is None else labels != IGNORE
    lp_s = torch.log_softmax(z / t, dim=-1)
    lp_s = lp_s.masked_fill(torch.isneginf(lp_s), LOG_TINY64)
    kd_rows = torch.zeros(c, dtype=torch.float64)
    if zt is not None:
        lp_t = torch.log_softmax(zt.double() / t, dim=-1).clamp(min=LOG_TINY64)
        p_s, p_t = lp_s.exp(), lp_t.exp()
        if divergence == "forward_kl":
            d = (p_t * (lp_t - lp_s)).sum(-1)
        elif divergence == "reverse_kl":
            d = (p_s * (lp_s - lp_t)).sum(-1)
        else:
            m = beta * p_t + (1 - beta) * p_s
            d = beta * (p_t * (lp_t - m.log())).sum(-1) + (1 - beta) * (p_s * (lp_s - m.log())).sum(-1)
        kd_rows = torch.where(valid, t * t * d, 0.0)
    ce_rows = torch.zeros(c, dtype=torch.float64)
    if labels is not None:
        safe = torch.where(valid, labels, 0)
        ce_rows = torch.where(valid, -torch.log_softmax(z, dim=-1).gather(1, safe[:, None])[:, 0], 0.0)
    loss = float(scale) * (kd_weight * kd_rows + ce_weight * ce_rows).sum()
    (grad,) = torch.autograd.grad(loss, z_raw, allow_unused=True, materialize_grads=True)
    return kd_rows.detach(), ce_rows.detach(), grad


def assert_close(actual, expected, rtol=2e-5, atol=2e-6, what=""):
    assert actual.dtype == torch.float32
    actual = actual.cpu()
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err = (actual.double() - expected).abs().max().item() if actual.numel() else 0.0
    bound = atol + rtol * (expected.abs().max().item() if expected.numel() else 0.0)
    assert err <= bound, f"{what}: max abs error {err:.3g} > {bound:.3g}"


def make_inputs(c, v, *, seed, dtype=torch.float32, spread=3.0, ignore_rows=(), labels=True):
    g = torch.Generator().manual_seed(seed)
    zs = (torch.randn(c, v, generator=g) * spread).to(dtype)
    zt = (torch.randn(c, v, generator=g) * spread + 0.5).to(dtype)
    lab = torch.randint(0, v, (c,), generator=g) if labels else None
    if lab is not None:
        for r in ignore_rows:
            lab[r] = IGNORE
    return zs.to(DEVICE), zt.to(DEVICE), (lab.to(DEVICE) if lab is not None else None)


def check(zs, zt, lab, *, rtol=2e-5, atol=2e-6, block_v=16, **kw):
    kw = {
        "divergence": "forward_kl",
        "beta": 0.5,
        "temperature": 1.0,
        "kd_weight": 1.0,
        "ce_weight": 0.0,
        "scale": 1.0,
        **kw,
    }
    xf = {k: kw.pop(k) for k in ("student_transform", "teacher_transform") if k in kw}
    kd, ce, grad = kd_chunk_loss_and_grad_triton(zs, zt, lab, ignore_index=IGNORE, block_v=block_v, **kw, **xf)
    kd64, ce64, g64 = ref64(zs, zt, lab, **kw, xs=xf.get("student_transform"), xt=xf.get("teacher_transform"))
    assert kd.shape == (zs.shape[0],) and ce.shape == (zs.shape[0],) and grad.shape == zs.shape
    assert_close(kd, kd64, rtol, atol, "kd_rows")
    assert_close(ce, ce64, rtol, atol, "ce_rows")
    assert_close(grad, g64, rtol, atol, "grad")
    return kd, ce, grad


# ----------------------------------------------------------------------------------------------------
# agreement with float64
# ----------------------------------------------------------------------------------------------------


def test_triton_available():
    assert TRITON_AVAILABLE


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("divergence,beta", DIV_CASES)
def test_divergences_match_float64(divergence, beta, temperature):
    """Several tiles with a ragged tail, an ignored row, KD + CE mix and a scale."""
    seed = 100 * DIV_CASES.index((divergence, beta)) + int(10 * temperature)
    zs, zt, lab = make_inputs(5, 130, seed=seed, ignore_rows=(1,))
    _, _, grad = check(
        zs,
        zt,
        lab,
        divergence=divergence,
        beta=beta,
        temperature=temperature,
        kd_weight=0.7,
        ce_weight=0.4,
        scale=0.25,
    )
    assert (grad[1] == 0).all()


@pytest.mark.parametrize("divergence,beta", DIV_CASES)
def test_logit_transforms_match_float64(divergence, beta):
    """Softcap (saturating: logits spread 3, cap 2) and multipliers applied as the tiles load, student and
    teacher independently; the gradient is w.r.t. the raw student logits. A masked (-inf) ragged tail must
    stay masked: the softcap of -inf would be -cap."""
    from sapling.kernels import LogitTransform

    zs, zt, lab = make_inputs(4, 37, seed=7 + DIV_CASES.index((divergence, beta)), ignore_rows=(2,))
    for xs, xt in ((LogitTransform(softcap=2.0), LogitTransform(scale=0.6)),
                   (LogitTransform(scale=1.7, softcap=4.0), LogitTransform(softcap=2.0)),
                   (LogitTransform(scale=0.37), None)):
        check(zs, zt, lab, divergence=divergence, beta=beta, temperature=2.0, kd_weight=0.7, ce_weight=0.4,
              student_transform=xs, teacher_transform=xt)


@pytest.mark.parametrize(
    "c,v,block_v,divergence",
    [(1, 17, 16, "reverse_kl"), (5, 64, 16, "jsd"), (5, 64, None, "forward_kl"), (1, 130, None, "jsd")],
)
def test_shapes_and_tiles(c, v, block_v, divergence):
    zs, zt, lab = make_inputs(c, v, seed=c * 1000 + v)
    check(zs, zt, lab, block_v=block_v, divergence=divergence, beta=0.3, temperature=2.0, ce_weight=1.0)


def test_strided_rows():
    """Row stride larger than V (a view into wider buffers)."""
    zs, zt, lab = make_inputs(3, 40, seed=7)
    zs_wide, zt_wide = zs.new_zeros(3, 57), zt.new_zeros(3, 61)
    zs_wide[:, :40], zt_wide[:, :40] = zs, zt
    check(zs_wide[:, :40], zt_wide[:, :40], lab, divergence="reverse_kl", temperature=0.5, ce_weight=0.5)


def test_ce_only_without_teacher():
    zs, _, lab = make_inputs(5, 64, seed=11, ignore_rows=(0, 3))
    kd, ce, grad = check(zs, None, lab, temperature=2.0, kd_weight=0.0, ce_weight=1.0, scale=0.5)
    assert (kd == 0).all() and (ce[[0, 3]] == 0).all() and (grad[[0, 3]] == 0).all()


def test_kd_only_without_labels():
    zs, zt, _ = make_inputs(5, 64, seed=12, labels=False)
    _, ce, _ = check(zs, zt, None, divergence="jsd", beta=0.5, temperature=2.0)
    assert (ce == 0).all()


@pytest.mark.parametrize(
    "divergence,kd_weight,ce_weight",
    [("forward_kl", 0.0, 1.0), ("jsd", 0.0, 1.0), ("reverse_kl", 1.0, 0.0), ("forward_kl", 0.0, 0.0)],
)
def test_zero_weights_still_report_rows(divergence, kd_weight, ce_weight):
    """A zero weight drops the term from the gradient; its rows are still computed (teacher / labels given)."""
    zs, zt, lab = make_inputs(5, 64, seed=13, ignore_rows=(2,))
    kd, ce, grad = check(zs, zt, lab, divergence=divergence, kd_weight=kd_weight, ce_weight=ce_weight)
    assert (kd[[0, 1, 3, 4]] > 0).all() and (ce[[0, 1, 3, 4]] > 0).all()
    if kd_weight == ce_weight == 0:
        assert (grad == 0).all()


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_jsd_beta_edges_are_zero(beta):
    zs, zt, lab = make_inputs(3, 40, seed=14)
    kd, _, _ = check(zs, zt, lab, divergence="jsd", beta=beta, ce_weight=0.5)
    assert (kd == 0).all()


def test_all_rows_ignored():
    zs, zt, lab = make_inputs(3, 40, seed=15, ignore_rows=(0, 1, 2))
    kd, ce, grad = check(zs, zt, lab, divergence="jsd", ce_weight=1.0)
    assert (kd == 0).all() and (ce == 0).all() and (grad == 0).all()


@pytest.mark.parametrize(
    "dtype,divergence",
    [(torch.bfloat16, "forward_kl"), (torch.float16, "jsd"), (torch.bfloat16, "reverse_kl")],
)
def test_low_precision_inputs(dtype, divergence):
    """bf16/fp16 logits are upcast in the kernel: agreement with float64 of the same values."""
    zs, zt, lab = make_inputs(5, 64, seed=16, dtype=dtype, ignore_rows=(2,))
    check(zs, zt, lab, divergence=divergence, temperature=2.0, ce_weight=0.5)


@pytest.mark.parametrize("temperature", [0.5, 1.0])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_extreme_logits_and_masked_vocab(divergence, temperature):
    """|logits| ~ 1e4, -inf teacher entries (LOG_TINY clamp) and a -inf student column: finite, exact."""
    zs, zt, lab = make_inputs(4, 40, seed=17, spread=1e4, ignore_rows=(3,))
    zt[:, 5:30:3] = float("-inf")
    zt[0, :20] = float("-inf")  # a whole first tile masked
    zs[:, 39] = float("-inf")
    lab[lab == 39] = 0
    _, _, grad = check(
        zs, zt, lab, rtol=1e-5, atol=1e-5, divergence=divergence, temperature=temperature, ce_weight=0.5
    )
    assert (grad[:, 39] == 0).all()


def test_scale_tensor_matches_float():
    zs, zt, lab = make_inputs(3, 40, seed=18)
    kw = {
        "divergence": "jsd",
        "beta": 0.5,
        "temperature": 1.0,
        "kd_weight": 1.0,
        "ce_weight": 0.5,
        "ignore_index": IGNORE,
        "block_v": 16,
    }
    out_f = kd_chunk_loss_and_grad_triton(zs, zt, lab, scale=0.125, **kw)
    out_t = kd_chunk_loss_and_grad_triton(zs, zt, lab, scale=torch.tensor(0.125, device=DEVICE), **kw)
    for a, b in zip(out_f, out_t):
        torch.testing.assert_close(a, b)


def test_rejects_topk_and_bad_arguments():
    zs, zt, lab = make_inputs(2, 16, seed=19)
    kw = {
        "divergence": "forward_kl",
        "beta": 0.5,
        "temperature": 1.0,
        "kd_weight": 1.0,
        "ce_weight": 0.0,
        "ignore_index": IGNORE,
        "scale": 1.0,
    }
    topk = (torch.log_softmax(zt, -1).topk(4).values, torch.arange(4, device=DEVICE).expand(2, 4))
    with pytest.raises(NotImplementedError, match="top-k"):
        kd_chunk_loss_and_grad_triton(zs, None, lab, teacher_topk=topk, **kw)
    with pytest.raises(ValueError, match="needs teacher_logits"):
        kd_chunk_loss_and_grad_triton(zs, None, lab, **kw)
    with pytest.raises(ValueError, match="needs labels"):
        kd_chunk_loss_and_grad_triton(zs, zt, None, **{**kw, "ce_weight": 1.0})
    with pytest.raises(ValueError, match="unknown divergence"):
        kd_chunk_loss_and_grad_triton(zs, zt, lab, **{**kw, "divergence": "tvd"})


# ----------------------------------------------------------------------------------------------------
# agreement with the torch chunk pass
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)])
def test_matches_torch_chunk(divergence, beta):
    chunk_torch = pytest.importorskip("sapling.kernels.chunk_torch")
    fn = getattr(chunk_torch, "kd_chunk_loss_and_grad", None)
    if fn is None:
        pytest.skip("sapling.kernels.chunk_torch has no kd_chunk_loss_and_grad")
    zs, zt, lab = make_inputs(5, 130, seed=20, ignore_rows=(4,))
    zt[:, ::7] = float("-inf")
    kw = {
        "divergence": divergence,
        "beta": beta,
        "temperature": 2.0,
        "kd_weight": 0.8,
        "ce_weight": 0.3,
        "ignore_index": IGNORE,
        "scale": 0.2,
    }
    got = kd_chunk_loss_and_grad_triton(zs, zt, lab, block_v=32, **kw)
    want = fn(zs, zt, lab, **kw)
    for name, a, b in zip(("kd_rows", "ce_rows", "grad"), got, want):
        torch.testing.assert_close(a, b.float(), rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setattr(chunk_triton, "_INTERPRETED", False)
    zs, zt, lab = (x.cpu() for x in make_inputs(2, 16, seed=21))
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        kd_chunk_loss_and_grad_triton(
            zs,
            zt,
            lab,
            divergence="jsd",
            beta=0.5,
            temperature=1.0,
            kd_weight=1.0,
            ce_weight=0.0,
            ignore_index=IGNORE,
            scale=1.0,
        )


def test_imports_without_triton():
    """The module imports (TRITON_AVAILABLE False) when triton is missing; the function then raises."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from sapling.kernels import chunk_triton as m\n"
        "assert not m.TRITON_AVAILABLE\n"
        "try:\n"
        "    m.kd_chunk_loss_and_grad_triton(torch.zeros(1, 4), None, None, divergence='jsd', beta=0.5,\n"
        "        temperature=1.0, kd_weight=0.0, ce_weight=0.0, ignore_index=-100, scale=1.0)\n"
        "except RuntimeError as e:\n"
        "    assert 'needs Triton' in str(e)\n"
        "else:\n"
        "    raise AssertionError('no error')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
