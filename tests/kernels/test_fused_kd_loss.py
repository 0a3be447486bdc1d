"""Tests of the memory-efficient fused KD loss (torch path) and its per-chunk analytic gradient."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from sapling.kernels import (
    DIVERGENCES,
    LogitTransform,
    chunk_torch,
    fused_linear_kd_loss,
    kd_chunk_loss_and_grad,
    kd_loss_reference,
)
from sapling.kernels.fused_kd_loss import default_chunk_size

DIV_CASES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.1), ("jsd", 0.5), ("jsd", 0.9)]
IGNORE = -100
LOG_TINY = math.log(torch.finfo(torch.float32).tiny)


# ----------------------------------------------------------------------------------------------------
# independent float64 math (log space, with the reference's LOG_TINY floors), differentiable
# ----------------------------------------------------------------------------------------------------


def _floor(lp: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isneginf(lp), torch.full_like(lp, LOG_TINY), lp)


def _kl64(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    return (lp.exp() * (lp - lq)).sum(-1)


def _div64(lp_s: torch.Tensor, lp_t: torch.Tensor, divergence: str, beta: float) -> torch.Tensor:
    if divergence == "forward_kl":
        return _kl64(lp_t, lp_s)
    if divergence == "reverse_kl":
        return _kl64(lp_s, lp_t)
    log_m = torch.logaddexp(lp_t + math.log(beta), lp_s + math.log1p(-beta))
    return beta * _kl64(lp_t, log_m) + (1 - beta) * _kl64(lp_s, log_m)


def kd_rows64(
    z_s: torch.Tensor,
    z_t: torch.Tensor | None = None,
    topk: tuple[torch.Tensor, torch.Tensor] | None = None,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
) -> torch.Tensor:
    """T**2 * D per row, float64, from student logits (teacher: dense logits or top-k log-probs)."""
    z_s = z_s.double()
    lp = torch.log_softmax(z_s / temperature, -1)
    if topk is None:
        lp_s = _floor(lp)
        lp_t = torch.log_softmax(z_t.double() / temperature, -1).clamp(min=LOG_TINY)
    else:
        lpt, idx = topk
        s_top = _floor(lp.gather(1, idx))
        rest = lp.scatter(1, idx, float("-inf"))
        s_tail = torch.logaddexp(torch.logsumexp(rest, 1, keepdim=True), torch.tensor(LOG_TINY).double())
        t_top = lpt.double().clamp(min=LOG_TINY)
        t_tail = (1 - t_top.exp().sum(1, keepdim=True)).clamp(min=math.exp(LOG_TINY)).log()
        lp_s, lp_t = torch.cat([s_top, s_tail], 1), torch.cat([t_top, t_tail], 1)
    return temperature**2 * _div64(lp_s, lp_t, divergence, beta)


def loss64(
    x: dict,
    *,
    teacher: str = "dense",
    divergence: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
    use_labels: bool = True,
    bias: bool = True,
    topk: tuple[torch.Tensor, torch.Tensor] | None = None,
    num_valid: float | None = None,
    xs: LogitTransform | None = None,
    xt: LogitTransform | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Float64 loss and its float64 leaves (h_s, w_s[, b_s]); `xs` / `xt` transform the student's / the dense
    teacher's logits."""
    leaves64 = [x["h_s"].double().requires_grad_(), x["w_s"].double().requires_grad_()]
    z_s = leaves64[0] @ leaves64[1].T
    if bias and "b_s" in x:
        leaves64.append(x["b_s"].double().requires_grad_())
        z_s = z_s + leaves64[2]
    if xs is not None:
        z_s = xs(z_s)
    labels = x["labels"] if use_labels else torch.zeros(z_s.shape[0], dtype=torch.long)
    valid = labels != IGNORE
    per = torch.zeros(z_s.shape[0], dtype=torch.float64)
    if kd_weight:
        z_t = teacher_logits(x).double() if topk is None else None
        if xt is not None and z_t is not None:
            z_t = xt(z_t)
        per = per + kd_weight * kd_rows64(z_s, z_t, topk, divergence, beta, temperature)
    if ce_weight:
        safe = torch.where(valid, labels, 0)
        per = per - ce_weight * torch.log_softmax(z_s, -1).gather(1, safe[:, None]).squeeze(1)
    total = torch.where(valid, per, 0.0).sum()
    return total / (float(valid.sum()) if num_valid is None else float(num_valid)), leaves64


# ----------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------


def make_inputs(seed: int, n: int = 24, hs: int = 16, ht: int = 24, v: int = 97, ignore_frac: float = 0.25):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, v, (n,), generator=g)
    drop = torch.rand(n, generator=g) < ignore_frac
    drop[0], drop[1] = False, True
    labels[drop] = IGNORE
    return {
        "h_s": torch.randn(n, hs, generator=g),
        "w_s": torch.randn(v, hs, generator=g) / math.sqrt(hs),
        "b_s": 0.5 * torch.randn(v, generator=g),
        "h_t": torch.randn(n, ht, generator=g),
        "w_t": 1.5 * torch.randn(v, ht, generator=g) / math.sqrt(ht),
        "b_t": 0.5 * torch.randn(v, generator=g),
        "labels": labels,
    }


def teacher_logits(x: dict) -> torch.Tensor:
    return x["h_t"] @ x["w_t"].T + x["b_t"]


def topk_cache(z_t: torch.Tensor, k: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    return F.log_softmax(z_t.float() / temperature, -1).topk(k, dim=-1)


def teacher_kwargs(x: dict, form: str, temperature: float = 1.0, k: int = 6) -> dict:
    if form == "dense":
        return dict(teacher_hidden=x["h_t"], teacher_weight=x["w_t"], teacher_bias=x["b_t"])
    if form == "logits":
        return dict(teacher_logits=teacher_logits(x))
    return dict(teacher_topk=topk_cache(teacher_logits(x), k, temperature))


def run(fn, x: dict, with_bias: bool = True, backward_scale: float = 1.0, **kw):
    """(loss, parts or None, [grad h_s, grad w_s(, grad b_s)]) of fn on fresh leaves."""
    ps = [x["h_s"].clone().requires_grad_(), x["w_s"].clone().requires_grad_()]
    if with_bias:
        ps.append(x["b_s"].clone().requires_grad_())
        kw["student_bias"] = ps[2]
    out = fn(ps[0], ps[1], **kw)
    loss, parts = out if isinstance(out, tuple) else (out, None)
    (loss * backward_scale).backward()
    return loss, parts, [p.grad for p in ps]


def assert_close(actual, expected, rtol: float = 1e-5, atol_frac: float = 1e-5) -> None:
    expected = torch.as_tensor(expected).detach().double()
    atol = atol_frac * float(expected.abs().max()) + 1e-12
    torch.testing.assert_close(torch.as_tensor(actual).detach().double(), expected, rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------------------------------
# fused vs float64 and vs the reference
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("variant", ["plain", "full"])
@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
@pytest.mark.parametrize(("divergence", "beta"), DIV_CASES)
def test_dense_matches_float64_and_reference(divergence, beta, temperature, variant, seed):
    full = variant == "full"  # ignored labels, CE mix, biases (Hs=16 != Ht=24 in both)
    x = make_inputs(seed)
    kw = dict(divergence=divergence, beta=beta, temperature=temperature)
    kw_w = dict(kd_weight=0.7, ce_weight=0.3) if full else {}
    teacher = teacher_kwargs(x, "dense") if full else dict(teacher_hidden=x["h_t"], teacher_weight=x["w_t"])
    if not full:
        x = dict(x, b_t=torch.zeros_like(x["b_t"]))
    labels = dict(labels=x["labels"]) if full else {}
    loss, _, g = run(fused_linear_kd_loss, x, with_bias=full, **kw, **kw_w, **teacher, **labels)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    ref, leaves64 = loss64(x, **kw, **kw_w, use_labels=full, bias=full)
    assert_close(loss, ref)
    for got, want in zip(g, torch.autograd.grad(ref, leaves64)):
        assert_close(got, want)
    ref32, _, g32 = run(kd_loss_reference, x, with_bias=full, **kw, **kw_w, **teacher, **labels)
    assert_close(loss, ref32, rtol=2e-6)
    for got, want in zip(g, g32):
        assert_close(got, want, rtol=2e-5, atol_frac=2e-6)


XF_CASES = {  # (student, teacher): Gemma's softcap (tight, so it saturates), Cohere/Granite multipliers, mixes
    "softcap": (LogitTransform(softcap=1.5), LogitTransform(softcap=2.0)),
    "scale": (LogitTransform(scale=0.37), LogitTransform(scale=1.8)),
    "scaled softcap / none": (LogitTransform(scale=2.5, softcap=3.0), None),
    "none / softcap": (None, LogitTransform(softcap=1.5)),
}


@pytest.mark.parametrize("variant", ["plain", "full"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize(("divergence", "beta"), DIV_CASES)
@pytest.mark.parametrize("xf", list(XF_CASES))
def test_logit_transforms_match_float64_and_reference(xf, divergence, beta, temperature, variant):
    """The model's own logits (softcap / multiplier of W·h), for student and teacher independently: loss and
    gradients w.r.t. the raw lm_head inputs equal float64 autograd through the transform."""
    xs, xt = XF_CASES[xf]
    full = variant == "full"
    x = make_inputs(DIV_CASES.index((divergence, beta)))
    kw = dict(divergence=divergence, beta=beta, temperature=temperature)
    kw_w = dict(kd_weight=0.7, ce_weight=0.3) if full else {}
    labels = dict(labels=x["labels"]) if full else {}
    xkw = dict(student_logit_transform=xs, teacher_logit_transform=xt)
    loss, _, g = run(fused_linear_kd_loss, x, **kw, **kw_w, **teacher_kwargs(x, "dense"), **labels, **xkw,
                     chunk_size=7)
    ref, leaves64 = loss64(x, **kw, **kw_w, use_labels=full, xs=xs, xt=xt)
    assert_close(loss, ref)
    for got, want in zip(g, torch.autograd.grad(ref, leaves64)):
        assert_close(got, want)
    ref32, _, g32 = run(kd_loss_reference, x, **kw, **kw_w, **teacher_kwargs(x, "dense"), **labels, **xkw)
    assert_close(loss, ref32, rtol=2e-6)
    for got, want in zip(g, g32):
        assert_close(got, want, rtol=2e-5, atol_frac=2e-6)
    plain, _, _ = run(fused_linear_kd_loss, x, **kw, **kw_w, **teacher_kwargs(x, "dense"), **labels)
    assert abs(float(plain.detach()) - float(loss.detach())) > 1e-3  # the transform matters at these scales


@pytest.mark.parametrize("form", ["logits", "topk"])
def test_student_transform_with_cached_teacher_and_refusals(form):
    """A student transform works with every teacher form; a teacher transform needs the dense teacher (cached
    logits / log-probs are already the model's own), and a transform must be a LogitTransform."""
    x = make_inputs(3)
    xs = LogitTransform(softcap=1.5)
    teacher = teacher_kwargs(x, form)
    topk = teacher.get("teacher_topk")
    loss, _, g = run(fused_linear_kd_loss, x, **teacher, labels=x["labels"], ce_weight=0.2,
                     student_logit_transform=xs)
    if form == "logits":
        ref, leaves64 = loss64(x, ce_weight=0.2, xs=xs)
    else:
        ref, leaves64 = loss64(x, topk=topk, ce_weight=0.2, xs=xs)
    assert_close(loss, ref)
    for got, want in zip(g, torch.autograd.grad(ref, leaves64)):
        assert_close(got, want)
    for fn in (fused_linear_kd_loss, kd_loss_reference):
        with pytest.raises(ValueError, match="dense teacher"):
            fn(x["h_s"], x["w_s"], **teacher, teacher_logit_transform=LogitTransform(softcap=2.0))
        with pytest.raises(ValueError, match="student_logit_transform must be a LogitTransform"):
            fn(x["h_s"], x["w_s"], **teacher, student_logit_transform=30.0)
    for bad in (dict(scale=0.0), dict(scale=float("nan")), dict(softcap=-1.0), dict(softcap=float("inf"))):
        with pytest.raises(ValueError, match="LogitTransform"):
            LogitTransform(**bad)
    assert LogitTransform().is_identity and not LogitTransform(softcap=30.0).is_identity


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize(("divergence", "beta"), DIV_CASES)
def test_topk_matches_float64_and_reference(divergence, beta, temperature, seed):
    x = make_inputs(seed, v=131)
    topk = topk_cache(teacher_logits(x), k=8, temperature=temperature)
    kw = dict(divergence=divergence, beta=beta, temperature=temperature, ce_weight=0.2)
    loss, _, g = run(fused_linear_kd_loss, x, teacher_topk=topk, labels=x["labels"], chunk_size=7, **kw)
    ref, leaves64 = loss64(x, topk=topk, **kw)
    assert_close(loss, ref)
    for got, want in zip(g, torch.autograd.grad(ref, leaves64)):
        assert_close(got, want)
    ref32, _, g32 = run(kd_loss_reference, x, teacher_topk=topk, labels=x["labels"], **kw)
    assert_close(loss, ref32, rtol=2e-6)
    for got, want in zip(g, g32):
        assert_close(got, want, rtol=2e-5, atol_frac=2e-6)


def test_topk_full_vocab_matches_dense():
    x = make_inputs(3, v=61)
    kw = dict(labels=x["labels"], divergence="reverse_kl", temperature=2.0)
    dense, _, gd = run(fused_linear_kd_loss, x, teacher_logits=teacher_logits(x), **kw)
    full = topk_cache(teacher_logits(x), k=61, temperature=2.0)
    topk, _, gk = run(fused_linear_kd_loss, x, teacher_topk=full, **kw)
    assert_close(topk, dense, rtol=1e-4)
    for got, want in zip(gk, gd):
        assert torch.isfinite(got).all()
        assert_close(got, want, rtol=1e-4, atol_frac=1e-4)


@pytest.mark.parametrize("chunk_size", [1, 7, None, 24])
@pytest.mark.parametrize("form", ["dense", "logits", "topk"])
@pytest.mark.parametrize(("divergence", "beta"), [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)])
def test_chunk_sizes_and_forms_match_reference(divergence, beta, form, chunk_size):
    x = make_inputs(5, n=24)
    kw = dict(
        labels=x["labels"],
        divergence=divergence,
        beta=beta,
        temperature=1.5,
        ce_weight=0.4,
        return_parts=True,
    )
    teacher = teacher_kwargs(x, form, temperature=1.5)
    a, parts_a, ga = run(fused_linear_kd_loss, x, chunk_size=chunk_size, **teacher, **kw)
    b, parts_b, gb = run(kd_loss_reference, x, **teacher, **kw)
    assert set(parts_a) == {"kd", "ce", "num_valid", "top1_agree"}
    assert parts_a["num_valid"] == parts_b["num_valid"] == int((x["labels"] != IGNORE).sum())
    assert int(parts_a["top1_agree"]) == int(parts_b["top1_agree"])
    assert not parts_a["kd"].requires_grad and parts_a["kd"].dtype == torch.float32
    for got, want in [(a, b), (parts_a["kd"], parts_b["kd"]), (parts_a["ce"], parts_b["ce"])]:
        assert_close(got, want, rtol=2e-6)
    assert_close(a, parts_a["kd"] + 0.4 * parts_a["ce"], rtol=1e-6)
    for got, want in zip(ga, gb):
        assert_close(got, want, rtol=2e-5, atol_frac=2e-6)


def test_teacher_forms_agree():
    x = make_inputs(2)
    kw = dict(labels=x["labels"], divergence="jsd", temperature=2.0, ce_weight=0.5)
    a, _, ga = run(fused_linear_kd_loss, x, **teacher_kwargs(x, "dense"), **kw)
    b, _, gb = run(fused_linear_kd_loss, x, **teacher_kwargs(x, "logits"), **kw)
    assert_close(a, b, rtol=1e-6)
    for got, want in zip(ga, gb):
        assert_close(got, want, rtol=1e-6)


def test_parts_with_zero_weights_match_reference():
    """kd_weight=0 with a teacher still reports kd; ce_weight=0 with labels still reports ce."""
    x = make_inputs(11)
    kw = dict(labels=x["labels"], teacher_logits=teacher_logits(x), temperature=2.0, return_parts=True)
    for weights in (dict(kd_weight=0.0, ce_weight=1.0), dict(kd_weight=1.0, ce_weight=0.0)):
        a, pa, ga = run(fused_linear_kd_loss, x, chunk_size=5, **weights, **kw)
        b, pb, gb = run(kd_loss_reference, x, **weights, **kw)
        assert float(pa["kd"]) > 0 and float(pa["ce"]) > 0
        for got, want in [(a, b), (pa["kd"], pb["kd"]), (pa["ce"], pb["ce"])]:
            assert_close(got, want, rtol=2e-6)
        for got, want in zip(ga, gb):
            assert_close(got, want, rtol=2e-5, atol_frac=2e-6)


def test_ce_only_without_teacher_and_without_labels():
    x = make_inputs(10)
    a, _, ga = run(fused_linear_kd_loss, x, labels=x["labels"], kd_weight=0.0, ce_weight=1.0, chunk_size=4)
    ref = F.cross_entropy(x["h_s"].double() @ x["w_s"].double().T + x["b_s"].double(), x["labels"])
    assert_close(a, ref)
    b, _, gb = run(kd_loss_reference, x, labels=x["labels"], kd_weight=0.0, ce_weight=1.0)
    for got, want in zip(ga, gb):
        assert_close(got, want, rtol=2e-5, atol_frac=2e-6)
    # no labels: every row counts
    c, _, _ = run(fused_linear_kd_loss, x, teacher_logits=teacher_logits(x), chunk_size=5)
    ref_c, _ = loss64(x, use_labels=False)
    assert_close(c, ref_c)


@pytest.mark.parametrize("seed", [0, 1])
def test_num_valid_tokens_scaling(seed):
    x = make_inputs(seed)
    n_valid = int((x["labels"] != IGNORE).sum())
    kw = dict(labels=x["labels"], ce_weight=0.3, chunk_size=5, **teacher_kwargs(x, "dense"))
    base, _, g_base = run(fused_linear_kd_loss, x, **kw)
    for given in (53, torch.tensor(53), torch.tensor(53.0)):
        scaled, parts, g = run(fused_linear_kd_loss, x, num_valid_tokens=given, return_parts=True, **kw)
        assert_close(scaled, base * n_valid / 53, rtol=1e-6)
        assert parts["num_valid"] == n_valid
        assert_close(scaled, parts["kd"] + 0.3 * parts["ce"], rtol=1e-6)
        for got, want in zip(g, g_base):
            assert_close(got, want * n_valid / 53, rtol=1e-6)
    ref, leaves64 = loss64(x, ce_weight=0.3, num_valid=53)
    scaled, _, g = run(fused_linear_kd_loss, x, num_valid_tokens=53, **kw)
    assert_close(scaled, ref)
    for got, want in zip(g, torch.autograd.grad(ref, leaves64)):
        assert_close(got, want)


@pytest.mark.parametrize("form", ["dense", "topk", "none"])
@pytest.mark.parametrize("num_valid_tokens", [None, 7])
def test_zero_valid_tokens(form, num_valid_tokens):
    x = make_inputs(7)
    x["labels"] = torch.full_like(x["labels"], IGNORE)
    teacher = dict(kd_weight=0.0) if form == "none" else teacher_kwargs(x, form)
    loss, parts, g = run(
        fused_linear_kd_loss,
        x,
        labels=x["labels"],
        ce_weight=1.0,
        num_valid_tokens=num_valid_tokens,
        chunk_size=4,
        return_parts=True,
        **teacher,
    )
    assert loss.dtype == torch.float32 and loss.item() == 0.0
    assert parts["num_valid"] == 0 and float(parts["kd"]) == 0.0 and float(parts["ce"]) == 0.0
    for grad in g:
        assert grad is not None and not grad.any()


@pytest.mark.parametrize("form", ["dense", "topk"])
def test_ignored_rows_have_zero_grad_and_no_influence(form):
    x = make_inputs(8, ignore_frac=0.4)
    ignored = x["labels"] == IGNORE
    teacher = teacher_kwargs(x, form, k=5)
    kw = dict(labels=x["labels"], divergence="reverse_kl", ce_weight=0.5, chunk_size=3)
    loss, _, g = run(fused_linear_kd_loss, x, **teacher, **kw)
    assert not g[0][ignored].any() and g[0][~ignored].abs().sum(-1).gt(0).all()
    bad = dict(x, h_s=x["h_s"].clone(), h_t=x["h_t"].clone())
    bad["h_s"][ignored] = float("nan")
    bad["h_t"][ignored] = float("inf")
    teacher_bad = teacher_kwargs(bad, form, k=5) if form == "dense" else teacher
    if form == "topk":
        lp, idx = teacher["teacher_topk"]
        lp = lp.clone()
        lp[ignored] = float("nan")
        teacher_bad = dict(teacher_topk=(lp, idx))
    loss_b, _, g_b = run(fused_linear_kd_loss, bad, **teacher_bad, **kw)
    assert_close(loss_b, loss, rtol=1e-6)
    assert_close(g_b[1], g[1], rtol=1e-6)
    assert not g_b[0][ignored].any()


def test_custom_ignore_index():
    x = make_inputs(9)
    labels = x["labels"].clone()
    labels[labels == IGNORE] = 3
    kw = dict(teacher_logits=teacher_logits(x), ce_weight=0.5, chunk_size=4)
    a = fused_linear_kd_loss(x["h_s"], x["w_s"], labels=labels, ignore_index=3, **kw)
    relabeled = torch.where(labels == 3, IGNORE, labels)
    b = kd_loss_reference(x["h_s"], x["w_s"], labels=relabeled, **kw)
    assert_close(a, b, rtol=1e-6)


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_jsd_beta_edges_are_zero(beta):
    x = make_inputs(12)
    loss, _, g = run(fused_linear_kd_loss, x, teacher_logits=teacher_logits(x), divergence="jsd", beta=beta)
    assert loss.item() == 0.0
    for grad in g:
        assert torch.isfinite(grad).all() and grad.abs().max() < 1e-6


# ----------------------------------------------------------------------------------------------------
# gradient plumbing, dtypes, no-grad
# ----------------------------------------------------------------------------------------------------


def test_grad_output_scales_grads():
    x = make_inputs(13)
    kw = dict(labels=x["labels"], ce_weight=0.2, chunk_size=7, **teacher_kwargs(x, "dense"))
    _, _, g1 = run(fused_linear_kd_loss, x, **kw)
    _, _, g3 = run(fused_linear_kd_loss, x, backward_scale=3.0, **kw)
    for a, b in zip(g3, g1):
        assert_close(a, 3 * b, rtol=1e-6)
    _, _, gr = run(kd_loss_reference, x, backward_scale=-0.5, **kw)
    _, _, gf = run(fused_linear_kd_loss, x, backward_scale=-0.5, **kw)
    for a, b in zip(gf, gr):
        assert_close(a, b, rtol=2e-5, atol_frac=2e-6)


def test_bf16_inputs_give_fp32_loss_and_input_dtype_grads():
    x = {k: (v.bfloat16() if v.is_floating_point() else v) for k, v in make_inputs(14).items()}
    kw = dict(labels=x["labels"], ce_weight=0.5, chunk_size=5, **teacher_kwargs(x, "dense"))
    loss, _, g = run(fused_linear_kd_loss, x, **kw)
    assert loss.dtype == torch.float32
    assert all(grad.dtype == torch.bfloat16 and torch.isfinite(grad.float()).all() for grad in g)
    ref, leaves64 = loss64(x, ce_weight=0.5)
    assert_close(loss, ref, rtol=1e-3)
    for got, want in zip(g, torch.autograd.grad(ref, leaves64)):
        assert_close(got, want, rtol=3e-2, atol_frac=2e-2)
    ref32, _, g32 = run(kd_loss_reference, x, **kw)
    assert_close(loss, ref32, rtol=1e-3)
    for got, want in zip(g, g32):
        assert_close(got, want, rtol=3e-2, atol_frac=2e-2)


def test_no_grad_and_partial_requires_grad():
    x = make_inputs(15)
    kw = dict(
        labels=x["labels"], ce_weight=0.5, chunk_size=5, student_bias=x["b_s"], **teacher_kwargs(x, "dense")
    )
    want = kd_loss_reference(x["h_s"], x["w_s"], **kw)
    plain = fused_linear_kd_loss(x["h_s"], x["w_s"], **kw)  # nothing requires grad
    assert not plain.requires_grad
    with torch.no_grad():
        h = x["h_s"].clone().requires_grad_()
        off = fused_linear_kd_loss(h, x["w_s"], **kw)
    assert not off.requires_grad
    assert_close(plain, want, rtol=2e-6)
    assert_close(off, want, rtol=2e-6)
    # frozen head: only the hidden states get a gradient
    h = x["h_s"].clone().requires_grad_()
    fused_linear_kd_loss(h, x["w_s"], **kw).backward()
    h_ref = x["h_s"].clone().requires_grad_()
    kd_loss_reference(h_ref, x["w_s"], **kw).backward()
    assert_close(h.grad, h_ref.grad, rtol=2e-5, atol_frac=2e-6)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
@pytest.mark.parametrize(("divergence", "beta"), DIV_CASES)
@pytest.mark.parametrize("form", ["dense", "topk"])
def test_extreme_and_masked_logits(form, divergence, beta, temperature):
    g = torch.Generator().manual_seed(15)
    n, h, v = 16, 8, 64
    x = {
        "h_s": torch.randn(n, h, generator=g) * 1e4 / math.sqrt(h),  # student logits ~1e4
        "w_s": torch.randn(v, h, generator=g),
        "b_s": torch.zeros(v),
    }
    x["b_s"][:4] = float("-inf")  # student-side masked vocabulary
    z_t = torch.randn(n, v, generator=g) * 1e4
    z_t[torch.rand(n, v, generator=g) < 0.2] = float("-inf")  # teacher-side masked vocabulary
    z_t[:, 3] = z_t.amax(dim=1)  # teacher mass on a token the student masks
    z_t[:, 0] = float("-inf")
    if form == "dense":
        teacher = dict(teacher_logits=z_t)
    else:
        teacher = dict(teacher_topk=topk_cache(z_t, k=60, temperature=temperature))
        assert torch.isneginf(teacher["teacher_topk"][0]).any()
    labels = torch.randint(4, v, (n,), generator=g)
    kw = dict(labels=labels, divergence=divergence, beta=beta, temperature=temperature, ce_weight=0.1)
    loss, _, grads_f = run(fused_linear_kd_loss, x, chunk_size=5, **teacher, **kw)
    assert torch.isfinite(loss) and loss.item() >= 0
    assert all(torch.isfinite(gr).all() for gr in grads_f)
    ref, _, grads_r = run(kd_loss_reference, x, chunk_size=5, **teacher, **kw)
    assert_close(loss, ref, rtol=1e-5)
    for got, want in zip(grads_f, grads_r):
        assert_close(got, want, rtol=1e-4, atol_frac=1e-5)


# ----------------------------------------------------------------------------------------------------
# the chunk function on its own: analytic gradient vs float64 autograd
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.7])
@pytest.mark.parametrize(("divergence", "beta"), DIV_CASES)
@pytest.mark.parametrize("form", ["dense", "topk"])
def test_chunk_grad_matches_float64_autograd(form, divergence, beta, temperature):
    g = torch.Generator().manual_seed(21)
    c, v = 9, 53
    z = 3 * torch.randn(c, v, generator=g)
    z[0, :3] = float("-inf")  # masked student entries
    z_t = 3 * torch.randn(c, v, generator=g)
    z_t[1, 5:9] = float("-inf")
    labels = torch.randint(3, v, (c,), generator=g)
    labels[2] = IGNORE
    labels[4] = 7
    topk = topk_cache(z_t, 5, temperature) if form == "topk" else None
    kw = dict(divergence=divergence, beta=beta, temperature=temperature, ignore_index=IGNORE)
    kd, ce, grad = kd_chunk_loss_and_grad(
        z, None if topk else z_t, labels, kd_weight=0.6, ce_weight=0.4, scale=0.25, teacher_topk=topk, **kw
    )
    assert kd.dtype == ce.dtype == grad.dtype == torch.float32
    assert kd.shape == ce.shape == (c,) and grad.shape == (c, v)
    z64 = z.double().requires_grad_()
    kd64 = kd_rows64(z64, z_t, topk, divergence, beta, temperature)
    ce64 = -torch.log_softmax(z64, -1).gather(1, torch.where(labels == IGNORE, 0, labels)[:, None]).squeeze(1)
    valid = labels != IGNORE
    kd64, ce64 = torch.where(valid, kd64, 0.0), torch.where(valid, ce64, 0.0)
    (grad64,) = torch.autograd.grad(0.25 * (0.6 * kd64 + 0.4 * ce64).sum(), z64)
    assert_close(kd, kd64, rtol=1e-5, atol_frac=1e-6)
    assert_close(ce, ce64, rtol=1e-6)
    assert_close(grad, grad64, rtol=1e-5, atol_frac=1e-6)
    assert not grad[2].any() and kd[2] == 0 and ce[2] == 0
    assert not grad[0, :3].any()


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("with_labels", [False, True])
@pytest.mark.parametrize("extreme", [None, "neg_inf", "huge"])
def test_forward_kl_fast_path_matches_general_path(temperature, with_labels, extreme):
    """The few-pass forward-KL path (logits overwritten in a scratch buffer) equals the general path."""
    g = torch.Generator().manual_seed(5)
    c, v = 7, 41
    z = 4 * torch.randn(c, v, generator=g)
    z_t = 4 * torch.randn(c, v, generator=g)
    z_t[3, :20] = -200.0  # teacher log-probs below LOG_TINY: floored
    if extreme == "neg_inf":
        z[1, 2] = float("-inf")
    elif extreme == "huge":
        z[2, 4] = 3e30
    labels = torch.randint(0, v, (c,), generator=g) if with_labels else None
    if labels is not None:
        labels[5] = IGNORE
    kw = dict(divergence="forward_kl", beta=0.5, temperature=temperature, ignore_index=IGNORE, scale=0.3)
    kw.update(kd_weight=0.7, ce_weight=0.4 if with_labels else 0.0)
    zs_in, zt_in = z.clone(), z_t.clone()
    kd, ce, g_scaled, coef = chunk_torch.chunk_loss_scaled(zs_in, zt_in, labels, **kw, scratch=torch.empty(c, v))
    kd_ref, ce_ref, grad_ref = chunk_torch._chunk_loss_general(z, z_t, labels, **kw)
    fast = chunk_torch.forward_kl_fast_path("forward_kl", 0.7, temperature, with_labels, False)
    assert fast == (temperature == 1.0 or not with_labels)
    if extreme is not None or not fast:  # general path taken: the caller's logits are untouched
        assert coef == 1.0 and torch.equal(zs_in, z) and torch.equal(zt_in, z_t)
    else:
        assert coef != 1.0 and not torch.equal(zs_in, z)  # consumed in place
    torch.testing.assert_close(kd, kd_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ce, ce_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_scaled * coef, grad_ref, rtol=1e-5, atol=1e-7)
    if labels is not None:
        assert not g_scaled[5].any() and kd[5] == 0


def test_in_place_log_softmax_matches_out_of_place():
    x = 10 * torch.randn(33, 1000)
    expected = F.log_softmax(x, -1)
    y = x.clone()
    assert chunk_torch._log_softmax_(y) is y
    assert torch.equal(y, expected)


def test_chunk_without_teacher_or_labels():
    z = torch.randn(4, 10)
    common = dict(divergence="forward_kl", beta=0.5, temperature=1.0, ignore_index=IGNORE, scale=1.0)
    kd, ce, grad = kd_chunk_loss_and_grad(z, None, None, kd_weight=0.0, ce_weight=0.0, **common)
    assert not kd.any() and not ce.any() and not grad.any() and grad.shape == (4, 10)
    kd, ce, grad = kd_chunk_loss_and_grad(z, z.clone(), None, kd_weight=1.0, ce_weight=0.0, **common)
    assert kd.abs().max() < 1e-6 and grad.abs().max() < 1e-6


# ----------------------------------------------------------------------------------------------------
# memory: [N, V] never exists
# ----------------------------------------------------------------------------------------------------


class _NumelRecorder(TorchDispatchMode):
    """Records the numel of every tensor every op produces."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.sizes.append(t.numel())
        return out


def _max_produced(fn, x: dict, **kw) -> int:
    h = x["h_s"].clone().requires_grad_()
    w = x["w_s"].clone().requires_grad_()
    with _NumelRecorder() as rec:
        loss = fn(h, w, **kw)
        loss.backward()
    return max(rec.sizes)


@pytest.mark.parametrize("form", ["dense", "topk"])
def test_never_materialises_n_by_v(form):
    n, v, chunk = 256, 1000, 32
    x = make_inputs(30, n=n, hs=16, ht=24, v=v, ignore_frac=0.0)
    x["labels"][1] = 5  # every row valid: the reference would build one [N, V] tensor
    kw = dict(labels=x["labels"], divergence="jsd", temperature=2.0, ce_weight=0.3, **teacher_kwargs(x, form))
    fused_max = _max_produced(fused_linear_kd_loss, x, chunk_size=chunk, **kw)
    assert fused_max <= 2 * chunk * v + chunk
    assert fused_max < n * v
    ref_max = _max_produced(kd_loss_reference, x, chunk_size=None, **kw)  # proves the check can fail
    assert ref_max >= n * v


# ----------------------------------------------------------------------------------------------------
# API
# ----------------------------------------------------------------------------------------------------


def test_default_chunk_size():
    assert default_chunk_size(32000, 10_000) == 262  # 256 MiB / (8 fp32 temporaries * V)
    assert default_chunk_size(32000, 10_000, live_temps=3) == 699
    assert default_chunk_size(128256, 10_000, cuda=True) == 1046  # 2 GiB / (4 fp32-equivalents * V)
    assert default_chunk_size(32000, 5) == 5
    assert default_chunk_size(10**9, 5) == 1
    assert default_chunk_size(97, 0) == 1


def test_validation_is_the_reference_one():
    x = make_inputs(17)
    with pytest.raises(ValueError, match=r"divergence 'kl'"):
        fused_linear_kd_loss(x["h_s"], x["w_s"], teacher_logits=teacher_logits(x), divergence="kl")
    with pytest.raises(ValueError, match=r"more than one"):
        fused_linear_kd_loss(
            x["h_s"], x["w_s"], teacher_logits=teacher_logits(x), **teacher_kwargs(x, "dense")
        )
    with pytest.raises(ValueError, match=r"chunk_size"):
        fused_linear_kd_loss(x["h_s"], x["w_s"], teacher_logits=teacher_logits(x), chunk_size=0)


def test_package_exports():
    import sapling.kernels as k
    from sapling.kernels.fused_kd_loss import fused_linear_kd_loss as fused

    assert k.fused_linear_kd_loss is fused and fused is not kd_loss_reference
    names = {"fused_linear_kd_loss", "kd_loss_reference", "DIVERGENCES", "kd_chunk_loss_and_grad"}
    assert names <= set(k.__all__)
    assert set(DIVERGENCES) == {"forward_kl", "reverse_kl", "jsd"}
