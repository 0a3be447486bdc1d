"""Tests of the plain-PyTorch KD loss reference against an independent float64 computation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sapling.kernels import DIVERGENCES, fused_linear_kd_loss, kd_loss_reference

DIV_CASES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.1), ("jsd", 0.5), ("jsd", 0.9)]
TEMPERATURES = [1.0, 2.0, 0.5]
IGNORE = -100


# ----------------------------------------------------------------------------------------------------
# independent float64 reference: explicit probabilities, sum_v p * (log p - log q)
# ----------------------------------------------------------------------------------------------------


def _probs64(z: torch.Tensor) -> torch.Tensor:
    e = torch.exp(z - z.max(dim=-1, keepdim=True).values)
    return e / e.sum(dim=-1, keepdim=True)


def _kl64(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return (p * (torch.log(p) - torch.log(q))).sum(dim=-1)


def _div64(p_s: torch.Tensor, p_t: torch.Tensor, divergence: str, beta: float) -> torch.Tensor:
    if divergence == "forward_kl":
        return _kl64(p_t, p_s)
    if divergence == "reverse_kl":
        return _kl64(p_s, p_t)
    m = beta * p_t + (1 - beta) * p_s
    return beta * _kl64(p_t, m) + (1 - beta) * _kl64(p_s, m)


def ref_loss64(
    h_s: torch.Tensor,
    w_s: torch.Tensor,
    *,
    b_s: torch.Tensor | None = None,
    z_t: torch.Tensor | None = None,
    topk: tuple[torch.Tensor, torch.Tensor] | None = None,
    labels: torch.Tensor | None = None,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
    ignore_index: int = IGNORE,
    num_valid: float | None = None,
) -> torch.Tensor:
    """Loss in float64. h_s / w_s / b_s are used as given (pass double tensors to get double grads)."""
    z_s = h_s @ w_s.T
    if b_s is not None:
        z_s = z_s + b_s
    n = z_s.shape[0]
    valid = torch.ones(n, dtype=torch.bool) if labels is None else labels != ignore_index
    per_tok = torch.zeros(n, dtype=torch.float64)
    if kd_weight != 0:
        p_s = _probs64(z_s / temperature)
        if topk is None:
            p_t = _probs64(z_t.double() / temperature)
        else:
            lp, idx = topk
            pt_top = lp.double().exp()
            p_t = torch.cat([pt_top, 1 - pt_top.sum(-1, keepdim=True)], dim=-1)
            ps_top = p_s.gather(1, idx)
            p_s = torch.cat([ps_top, 1 - ps_top.sum(-1, keepdim=True)], dim=-1)
        per_tok = per_tok + kd_weight * temperature**2 * _div64(p_s, p_t, divergence, beta)
    if ce_weight != 0:
        safe = torch.where(valid, labels, torch.zeros_like(labels))
        per_tok = per_tok - ce_weight * torch.log(_probs64(z_s).gather(1, safe[:, None]).squeeze(1))
    total = torch.where(valid, per_tok, torch.zeros_like(per_tok)).sum()
    denom = float(valid.sum()) if num_valid is None else float(num_valid)
    return total / denom


# ----------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------


def make_inputs(
    seed: int,
    n: int = 24,
    hs: int = 16,
    ht: int = 24,
    v: int = 97,
    ignore_frac: float = 0.25,
    bias: bool = False,
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, v, (n,), generator=g)
    drop = torch.rand(n, generator=g) < ignore_frac
    drop[0] = False  # at least one valid token
    drop[1] = True  # at least one ignored token
    labels[drop] = IGNORE
    out = {
        "h_s": torch.randn(n, hs, generator=g),
        "w_s": torch.randn(v, hs, generator=g) / math.sqrt(hs),
        "h_t": torch.randn(n, ht, generator=g),
        "w_t": 1.5 * torch.randn(v, ht, generator=g) / math.sqrt(ht),
        "labels": labels,
    }
    if bias:
        out["b_s"] = 0.5 * torch.randn(v, generator=g)
        out["b_t"] = 0.5 * torch.randn(v, generator=g)
    return out


def leaves(*ts: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().clone().requires_grad_(True) for t in ts]


def grads(loss: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, params))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5, atol_frac: float = 1e-5):
    """rtol plus an absolute floor relative to the largest expected magnitude (for near-zero entries)."""
    expected = expected.detach().double()
    atol = atol_frac * float(expected.abs().max()) + 1e-12
    torch.testing.assert_close(actual.detach().double(), expected, rtol=rtol, atol=atol)


def teacher_logits32(x: dict[str, torch.Tensor]) -> torch.Tensor:
    z = x["h_t"] @ x["w_t"].T
    return z + x["b_t"] if "b_t" in x else z


def topk_cache(z_t: torch.Tensor, k: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """What a teacher-logit cache stores: fp32 log-probs at temperature T of the top-k tokens."""
    lp = F.log_softmax(z_t.float() / temperature, dim=-1)
    vals, idx = lp.topk(k, dim=-1)
    return vals, idx


# ----------------------------------------------------------------------------------------------------
# dense teacher vs float64
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("variant", ["plain", "full"])
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize(("divergence", "beta"), DIV_CASES)
def test_dense_matches_float64(divergence, beta, temperature, variant, seed):
    full = variant == "full"  # labels with ignored positions, CE mix, biases
    x = make_inputs(seed, bias=full)
    kd_w, ce_w = (0.7, 0.3) if full else (1.0, 0.0)
    labels = x["labels"] if full else None
    h_s, w_s = leaves(x["h_s"], x["w_s"])
    loss = kd_loss_reference(
        h_s,
        w_s,
        teacher_hidden=x["h_t"],
        teacher_weight=x["w_t"],
        labels=labels,
        divergence=divergence,
        beta=beta,
        temperature=temperature,
        kd_weight=kd_w,
        ce_weight=ce_w,
        student_bias=x.get("b_s"),
        teacher_bias=x.get("b_t"),
    )
    assert loss.dtype == torch.float32 and loss.dim() == 0
    h64, w64 = leaves(x["h_s"].double(), x["w_s"].double())
    b_s = x["b_s"].double() if full else None
    z_t = x["h_t"].double() @ x["w_t"].double().T + (x["b_t"].double() if full else 0.0)
    ref = ref_loss64(
        h64,
        w64,
        b_s=b_s,
        z_t=z_t,
        labels=labels,
        divergence=divergence,
        beta=beta,
        temperature=temperature,
        kd_weight=kd_w,
        ce_weight=ce_w,
    )
    assert_close(loss, ref)
    for got, want in zip(grads(loss, [h_s, w_s]), grads(ref, [h64, w64])):
        assert_close(got, want)


# ----------------------------------------------------------------------------------------------------
# top-k teacher
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize(("divergence", "beta"), DIV_CASES)
def test_topk_matches_float64(divergence, beta, temperature, seed):
    x = make_inputs(seed, v=131, bias=True)
    topk = topk_cache(teacher_logits32(x), k=8, temperature=temperature)
    h_s, w_s, b_s = leaves(x["h_s"], x["w_s"], x["b_s"])
    kw = dict(labels=x["labels"], divergence=divergence, beta=beta, temperature=temperature, ce_weight=0.2)
    loss = kd_loss_reference(h_s, w_s, teacher_topk=topk, student_bias=b_s, **kw)
    h64, w64, b64 = leaves(x["h_s"].double(), x["w_s"].double(), x["b_s"].double())
    ref = ref_loss64(h64, w64, b_s=b64, topk=topk, **kw)
    assert_close(loss, ref)
    for got, want in zip(grads(loss, [h_s, w_s, b_s]), grads(ref, [h64, w64, b64])):
        assert_close(got, want)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize(("divergence", "beta"), DIV_CASES)
def test_topk_full_vocab_equals_dense(divergence, beta, temperature):
    x = make_inputs(3, v=61)
    z_t = teacher_logits32(x)
    kw = dict(labels=x["labels"], divergence=divergence, beta=beta, temperature=temperature)
    h1, w1 = leaves(x["h_s"], x["w_s"])
    dense = kd_loss_reference(h1, w1, teacher_logits=z_t, **kw)
    h2, w2 = leaves(x["h_s"], x["w_s"])
    topk = kd_loss_reference(h2, w2, teacher_topk=topk_cache(z_t, k=61, temperature=temperature), **kw)
    assert torch.isfinite(topk)
    assert_close(topk, dense, rtol=1e-4)
    for got, want in zip(grads(topk, [h2, w2]), grads(dense, [h1, w1])):
        assert torch.isfinite(got).all()
        assert_close(got, want, rtol=1e-4, atol_frac=1e-4)


def test_topk_indices_need_not_be_sorted_or_teacher_top():
    """Buckets are defined by the given indices; a permutation of the k columns changes nothing."""
    x = make_inputs(4, v=50)
    lp, idx = topk_cache(teacher_logits32(x), k=5, temperature=1.0)
    perm = torch.randperm(5, generator=torch.Generator().manual_seed(0))
    a = kd_loss_reference(x["h_s"], x["w_s"], teacher_topk=(lp, idx), labels=x["labels"])
    b = kd_loss_reference(x["h_s"], x["w_s"], teacher_topk=(lp[:, perm], idx[:, perm]), labels=x["labels"])
    assert_close(a, b, rtol=1e-6)


# ----------------------------------------------------------------------------------------------------
# equivalent call forms, chunking, normalisation
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_teacher_logits_equals_hidden_weight(divergence, seed):
    x = make_inputs(seed, bias=True)
    kw = dict(
        labels=x["labels"], divergence=divergence, temperature=2.0, ce_weight=0.5, student_bias=x["b_s"]
    )
    h1, w1 = leaves(x["h_s"], x["w_s"])
    a = kd_loss_reference(
        h1, w1, teacher_hidden=x["h_t"], teacher_weight=x["w_t"], teacher_bias=x["b_t"], **kw
    )
    h2, w2 = leaves(x["h_s"], x["w_s"])
    b = kd_loss_reference(h2, w2, teacher_logits=teacher_logits32(x), **kw)
    assert_close(a, b, rtol=1e-6)
    for got, want in zip(grads(a, [h1, w1]), grads(b, [h2, w2])):
        assert_close(got, want, rtol=1e-6)


@pytest.mark.parametrize("chunk_size", [1, 5, 17, 1000])
@pytest.mark.parametrize("form", ["dense", "logits", "topk"])
@pytest.mark.parametrize(("divergence", "beta"), [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)])
def test_chunking_matches_unchunked(divergence, beta, form, chunk_size):
    x = make_inputs(5, n=40, bias=True)
    if form == "dense":
        teacher = dict(teacher_hidden=x["h_t"], teacher_weight=x["w_t"], teacher_bias=x["b_t"])
    elif form == "logits":
        teacher = dict(teacher_logits=teacher_logits32(x))
    else:
        teacher = dict(teacher_topk=topk_cache(teacher_logits32(x), k=6, temperature=1.5))
    kw = dict(labels=x["labels"], divergence=divergence, beta=beta, temperature=1.5, ce_weight=0.4, **teacher)
    h1, w1, b1 = leaves(x["h_s"], x["w_s"], x["b_s"])
    a, parts_a = kd_loss_reference(h1, w1, student_bias=b1, return_parts=True, **kw)
    h2, w2, b2 = leaves(x["h_s"], x["w_s"], x["b_s"])
    b, parts_b = kd_loss_reference(h2, w2, student_bias=b2, return_parts=True, chunk_size=chunk_size, **kw)
    assert_close(b, a, rtol=1e-5)
    assert_close(parts_b["kd"], parts_a["kd"], rtol=1e-5)
    assert_close(parts_b["ce"], parts_a["ce"], rtol=1e-5)
    assert parts_a["num_valid"] == parts_b["num_valid"]
    for got, want in zip(grads(b, [h2, w2, b2]), grads(a, [h1, w1, b1])):
        assert_close(got, want, rtol=1e-5)


def test_chunking_without_grad():
    x = make_inputs(6)
    kw = dict(teacher_logits=teacher_logits32(x), labels=x["labels"], ce_weight=0.5)
    with torch.no_grad():
        a = kd_loss_reference(x["h_s"], x["w_s"], **kw)
        b = kd_loss_reference(x["h_s"], x["w_s"], chunk_size=4, **kw)
    assert_close(b, a, rtol=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_num_valid_tokens_scaling(seed):
    x = make_inputs(seed)
    n_valid = int((x["labels"] != IGNORE).sum())
    kw = dict(teacher_hidden=x["h_t"], teacher_weight=x["w_t"], labels=x["labels"], ce_weight=0.3)
    h1, w1 = leaves(x["h_s"], x["w_s"])
    base = kd_loss_reference(h1, w1, **kw)
    g_base = grads(base, [h1, w1])
    for given in (53, torch.tensor(53), torch.tensor(53.0)):
        h2, w2 = leaves(x["h_s"], x["w_s"])
        scaled, parts = kd_loss_reference(h2, w2, num_valid_tokens=given, return_parts=True, **kw)
        assert_close(scaled, base * n_valid / 53, rtol=1e-6)
        assert parts["num_valid"] == n_valid
        assert_close(scaled, 1.0 * parts["kd"] + 0.3 * parts["ce"], rtol=1e-6)
        for got, want in zip(grads(scaled, [h2, w2]), g_base):
            assert_close(got, want * n_valid / 53, rtol=1e-6)
    # the default normaliser is the number of valid tokens, or N without labels
    h64, w64 = x["h_s"].double(), x["w_s"].double()
    z_t = x["h_t"].double() @ x["w_t"].double().T
    assert_close(base, ref_loss64(h64, w64, z_t=z_t, labels=x["labels"], ce_weight=0.3))
    no_labels = kd_loss_reference(x["h_s"], x["w_s"], teacher_logits=z_t.float())
    assert_close(no_labels, ref_loss64(h64, w64, z_t=z_t))


@pytest.mark.parametrize("form", ["dense", "topk", "none"])
@pytest.mark.parametrize("num_valid_tokens", [None, 7])
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_zero_valid_tokens(form, num_valid_tokens, chunk_size):
    x = make_inputs(7, bias=True)
    labels = torch.full_like(x["labels"], IGNORE)
    teacher = {
        "dense": dict(teacher_hidden=x["h_t"], teacher_weight=x["w_t"]),
        "topk": dict(teacher_topk=topk_cache(teacher_logits32(x), k=4, temperature=1.0)),
        "none": dict(kd_weight=0.0),
    }[form]
    h_s, w_s, b_s = leaves(x["h_s"], x["w_s"], x["b_s"])
    loss, parts = kd_loss_reference(
        h_s,
        w_s,
        labels=labels,
        ce_weight=1.0,
        student_bias=b_s,
        num_valid_tokens=num_valid_tokens,
        chunk_size=chunk_size,
        return_parts=True,
        **teacher,
    )
    assert loss.dtype == torch.float32 and loss.item() == 0.0
    assert parts["num_valid"] == 0 and float(parts["kd"]) == 0.0 and float(parts["ce"]) == 0.0
    loss.backward()
    for p in (h_s, w_s, b_s):
        assert p.grad is not None and not p.grad.any()


# ----------------------------------------------------------------------------------------------------
# masking / ignored positions
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("form", ["dense", "topk"])
def test_ignored_positions_have_zero_grad_and_no_influence(divergence, form):
    x = make_inputs(8, ignore_frac=0.4)
    ignored = x["labels"] == IGNORE
    z_t = teacher_logits32(x)
    teacher = (
        dict(teacher_hidden=x["h_t"], teacher_weight=x["w_t"])
        if form == "dense"
        else dict(teacher_topk=topk_cache(z_t, k=5, temperature=1.0))
    )
    kw = dict(labels=x["labels"], divergence=divergence, ce_weight=0.5, chunk_size=3)
    h_s, w_s = leaves(x["h_s"], x["w_s"])
    loss = kd_loss_reference(h_s, w_s, **teacher, **kw)
    loss.backward()
    assert ignored.any()
    assert not h_s.grad[ignored].any()
    assert h_s.grad[~ignored].abs().sum(-1).gt(0).all()

    # garbage (NaN / huge) in ignored rows of every row-aligned input changes nothing
    h_bad = x["h_s"].clone()
    h_bad[ignored] = float("nan")
    if form == "dense":
        h_t_bad = x["h_t"].clone()
        h_t_bad[ignored] = float("inf")
        teacher_bad = dict(teacher_hidden=h_t_bad, teacher_weight=x["w_t"])
    else:
        lp, idx = teacher["teacher_topk"]
        lp_bad = lp.clone()
        lp_bad[ignored] = float("nan")
        teacher_bad = dict(teacher_topk=(lp_bad, idx))
    h_b, w_b = leaves(h_bad, x["w_s"])
    loss_bad = kd_loss_reference(h_b, w_b, **teacher_bad, **kw)
    loss_bad.backward()
    assert_close(loss_bad, loss, rtol=1e-6)
    assert_close(w_b.grad, w_s.grad, rtol=1e-6)
    assert not h_b.grad[ignored].any()


def test_custom_ignore_index():
    x = make_inputs(9)
    labels = x["labels"].clone()
    labels[labels == IGNORE] = 3  # 3 is now the ignored class
    labels[5] = 3
    kw = dict(teacher_logits=teacher_logits32(x), ce_weight=0.5)
    a = kd_loss_reference(x["h_s"], x["w_s"], labels=labels, ignore_index=3, **kw)
    relabeled = torch.where(labels == 3, torch.full_like(labels, IGNORE), labels)
    b = kd_loss_reference(x["h_s"], x["w_s"], labels=relabeled, **kw)
    assert_close(a, b, rtol=1e-6)


# ----------------------------------------------------------------------------------------------------
# plain CE, parts, JSD edges, dtypes
# ----------------------------------------------------------------------------------------------------


def test_ce_only_without_teacher():
    x = make_inputs(10, bias=True)
    h_s, w_s, b_s = leaves(x["h_s"], x["w_s"], x["b_s"])
    loss = kd_loss_reference(h_s, w_s, labels=x["labels"], kd_weight=0.0, ce_weight=1.0, student_bias=b_s)
    h64, w64, b64 = leaves(x["h_s"].double(), x["w_s"].double(), x["b_s"].double())
    ref = F.cross_entropy(h64 @ w64.T + b64, x["labels"], ignore_index=IGNORE)
    assert_close(loss, ref)
    for got, want in zip(grads(loss, [h_s, w_s, b_s]), grads(ref, [h64, w64, b64])):
        assert_close(got, want)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_return_parts(divergence):
    x = make_inputs(11)
    h_s, w_s = leaves(x["h_s"], x["w_s"])
    kw = dict(teacher_logits=teacher_logits32(x), labels=x["labels"], divergence=divergence, temperature=2.0)
    loss, parts = kd_loss_reference(h_s, w_s, kd_weight=0.6, ce_weight=0.4, return_parts=True, **kw)
    assert set(parts) == {"kd", "ce", "num_valid", "top1_agree"}
    assert not parts["kd"].requires_grad and not parts["ce"].requires_grad
    assert parts["kd"].dtype == parts["ce"].dtype == torch.float32
    assert parts["num_valid"] == int((x["labels"] != IGNORE).sum())
    assert_close(loss, 0.6 * parts["kd"] + 0.4 * parts["ce"], rtol=1e-6)
    kd_only = kd_loss_reference(x["h_s"], x["w_s"], **kw)
    ce_only = kd_loss_reference(x["h_s"], x["w_s"], kd_weight=0.0, ce_weight=1.0, **kw)
    assert_close(parts["kd"], kd_only, rtol=1e-6)
    assert_close(parts["ce"], ce_only, rtol=1e-6)
    # kd_weight=0 with a teacher: kd is still reported, but only CE drives the gradient
    h2, w2 = leaves(x["h_s"], x["w_s"])
    loss0, parts0 = kd_loss_reference(
        h2, w2, kd_weight=0.0, ce_weight=1.0, return_parts=True, chunk_size=5, **kw
    )
    assert_close(parts0["kd"], kd_only, rtol=1e-6)
    assert_close(loss0, ce_only, rtol=1e-6)
    h3, w3 = leaves(x["h_s"], x["w_s"])
    ce_ref = kd_loss_reference(h3, w3, labels=x["labels"], kd_weight=0.0, ce_weight=1.0)
    for got, want in zip(grads(loss0, [h2, w2]), grads(ce_ref, [h3, w3])):
        assert_close(got, want, rtol=1e-6)


@pytest.mark.parametrize("beta", [0.0, 1.0])
@pytest.mark.parametrize("form", ["dense", "topk"])
def test_jsd_beta_edges_are_zero(beta, form):
    x = make_inputs(12)
    z_t = teacher_logits32(x)
    teacher = (
        dict(teacher_logits=z_t)
        if form == "dense"
        else dict(teacher_topk=topk_cache(z_t, k=4, temperature=1.0))
    )
    h_s, w_s = leaves(x["h_s"], x["w_s"])
    loss = kd_loss_reference(h_s, w_s, labels=x["labels"], divergence="jsd", beta=beta, **teacher)
    assert loss.item() == 0.0
    for g in grads(loss, [h_s, w_s]):
        assert torch.isfinite(g).all() and g.abs().max() < 1e-6
    # and the generalised JSD is continuous towards the edges
    near = kd_loss_reference(x["h_s"], x["w_s"], divergence="jsd", beta=abs(beta - 1e-4), **teacher)
    assert 0.0 <= near.item() < 1e-3


def test_divergences_are_nonnegative_and_zero_for_identical_models():
    x = make_inputs(13, bias=True)
    for divergence in DIVERGENCES:
        same = kd_loss_reference(
            x["h_s"],
            x["w_s"],
            teacher_hidden=x["h_s"],
            teacher_weight=x["w_s"],
            student_bias=x["b_s"],
            teacher_bias=x["b_s"],
            divergence=divergence,
            temperature=2.0,
        )
        assert abs(same.item()) < 1e-6
        diff = kd_loss_reference(
            x["h_s"], x["w_s"], teacher_logits=teacher_logits32(x), divergence=divergence, temperature=2.0
        )
        assert diff.item() > 0


def test_bf16_inputs_compute_in_fp32():
    x = make_inputs(14)
    h_s, w_s = leaves(x["h_s"].bfloat16(), x["w_s"].bfloat16())
    loss = kd_loss_reference(
        h_s,
        w_s,
        teacher_hidden=x["h_t"].bfloat16(),
        teacher_weight=x["w_t"].bfloat16(),
        labels=x["labels"],
        ce_weight=0.5,
    )
    assert loss.dtype == torch.float32
    loss.backward()
    assert h_s.grad.dtype == torch.bfloat16 and torch.isfinite(h_s.grad.float()).all()
    z_t = x["h_t"].bfloat16().double() @ x["w_t"].bfloat16().double().T
    ref = ref_loss64(
        x["h_s"].bfloat16().double(), x["w_s"].bfloat16().double(), z_t=z_t, labels=x["labels"], ce_weight=0.5
    )
    assert_close(loss, ref, rtol=3e-2)


# ----------------------------------------------------------------------------------------------------
# numerical safety
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.5])
@pytest.mark.parametrize(("divergence", "beta"), DIV_CASES)
@pytest.mark.parametrize("form", ["dense", "topk"])
def test_extreme_and_masked_logits_are_finite(form, divergence, beta, temperature):
    g = torch.Generator().manual_seed(15)
    n, h, v = 16, 8, 64
    h_s = torch.randn(n, h, generator=g) * 1e4 / math.sqrt(h)  # student logits of magnitude ~1e4
    w_s = torch.randn(v, h, generator=g)
    b_s = torch.zeros(v)
    b_s[:4] = float("-inf")  # student-side masked vocabulary
    z_t = torch.randn(n, v, generator=g) * 1e4
    z_t[torch.rand(n, v, generator=g) < 0.2] = float("-inf")  # teacher-side masked vocabulary
    z_t[:, 3] = z_t.amax(dim=1)  # teacher mass on a token the student masks
    z_t[:, 0] = float("-inf")
    if form == "dense":
        teacher = dict(teacher_logits=z_t)
    else:
        lp, idx = topk_cache(z_t, k=60, temperature=temperature)  # contains -inf log-probs
        assert torch.isneginf(lp).any()
        teacher = dict(teacher_topk=(lp, idx))
    labels = torch.randint(4, v, (n,), generator=g)
    h_s, w_s, b_s = leaves(h_s, w_s, b_s)
    loss = kd_loss_reference(
        h_s,
        w_s,
        labels=labels,
        divergence=divergence,
        beta=beta,
        temperature=temperature,
        ce_weight=0.1,
        student_bias=b_s,
        chunk_size=5,
        **teacher,
    )
    assert torch.isfinite(loss) and loss.item() >= 0
    for g_ in grads(loss, [h_s, w_s, b_s]):
        assert torch.isfinite(g_).all()


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_extreme_finite_student_logits_match_float64(divergence):
    """With finite extreme logits the loss still matches a float64 log-space computation."""
    g = torch.Generator().manual_seed(16)
    n, h, v = 12, 8, 40
    h_s = torch.randn(n, h, generator=g) * 300 / math.sqrt(h)
    w_s = torch.randn(v, h, generator=g)
    z_t = torch.randn(n, v, generator=g) * 10  # teacher log-probs stay well above LOG_TINY
    loss = kd_loss_reference(h_s, w_s, teacher_logits=z_t, divergence=divergence)
    lp_s = torch.log_softmax(h_s.double() @ w_s.double().T, -1)
    lp_t = torch.log_softmax(z_t.double(), -1)
    if divergence == "forward_kl":
        ref = (lp_t.exp() * (lp_t - lp_s)).sum(-1).mean()
    elif divergence == "reverse_kl":
        ref = (lp_s.exp() * (lp_s - lp_t)).sum(-1).mean()
    else:
        lm = torch.logaddexp(lp_t + math.log(0.5), lp_s + math.log(0.5))
        ref = 0.5 * ((lp_t.exp() * (lp_t - lm)).sum(-1) + (lp_s.exp() * (lp_s - lm)).sum(-1)).mean()
    assert torch.isfinite(loss)
    assert_close(loss, ref, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------------


def _base_kwargs() -> dict:
    x = make_inputs(17, n=8, hs=6, ht=10, v=20, bias=True)
    return dict(
        student_hidden=x["h_s"],
        student_weight=x["w_s"],
        teacher_hidden=x["h_t"],
        teacher_weight=x["w_t"],
        labels=x["labels"],
    )


def _topk8() -> tuple[torch.Tensor, torch.Tensor]:
    return topk_cache(torch.randn(8, 20), k=4, temperature=1.0)


BAD_CASES = {
    "hs_mismatch": (dict(student_weight=torch.randn(20, 7)), r"student_weight.*\[V, 6\]"),
    "teacher_n_mismatch": (dict(teacher_hidden=torch.randn(9, 10)), r"teacher_hidden has N=9"),
    "teacher_v_mismatch": (dict(teacher_weight=torch.randn(21, 10)), r"teacher_weight.*V=21"),
    "teacher_ht_mismatch": (dict(teacher_hidden=torch.randn(8, 11)), r"teacher_hidden.*Ht=11"),
    "teacher_half_given": (dict(teacher_weight=None), r"teacher_weight is None"),
    "teacher_logits_shape": (
        dict(teacher_hidden=None, teacher_weight=None, teacher_logits=torch.randn(8, 21)),
        r"teacher_logits",
    ),
    "topk_n_mismatch": (
        dict(
            teacher_hidden=None,
            teacher_weight=None,
            teacher_topk=(torch.randn(9, 4), torch.zeros(9, 4).long()),
        ),
        r"teacher_topk has N=9",
    ),
    "topk_shape_mismatch": (
        dict(
            teacher_hidden=None,
            teacher_weight=None,
            teacher_topk=(torch.randn(8, 4), torch.zeros(8, 3).long()),
        ),
        r"teacher_topk",
    ),
    "topk_index_range": (
        dict(
            teacher_hidden=None, teacher_weight=None, teacher_topk=(torch.randn(8, 4), torch.full((8, 4), 20))
        ),
        r"teacher_topk indices",
    ),
    "topk_float_indices": (
        dict(teacher_hidden=None, teacher_weight=None, teacher_topk=(torch.randn(8, 4), torch.zeros(8, 4))),
        r"teacher_topk indices",
    ),
    "unknown_divergence": (dict(divergence="kl"), r"divergence 'kl'.*forward_kl, reverse_kl, jsd"),
    "temperature_zero": (dict(temperature=0.0), r"temperature"),
    "temperature_negative": (dict(temperature=-1.0), r"temperature"),
    "beta_low": (dict(divergence="jsd", beta=-0.1), r"beta"),
    "beta_high": (dict(beta=1.5), r"beta"),
    "ce_without_labels": (dict(labels=None, ce_weight=0.5), r"ce_weight.*labels"),
    "kd_without_teacher": (dict(teacher_hidden=None, teacher_weight=None), r"kd_weight.*teacher"),
    "two_teacher_forms": (dict(teacher_logits=torch.randn(8, 20)), r"more than one.*teacher_logits"),
    "three_teacher_forms": (dict(teacher_logits=torch.randn(8, 20), teacher_topk=_topk8()), r"teacher_topk"),
    "labels_shape": (dict(labels=torch.zeros(7).long()), r"labels"),
    "labels_dtype": (dict(labels=torch.zeros(8)), r"labels"),
    "student_bias_shape": (dict(student_bias=torch.zeros(19)), r"student_bias"),
    "teacher_bias_shape": (dict(teacher_bias=torch.zeros(19)), r"teacher_bias"),
    "teacher_bias_without_dense": (
        dict(
            teacher_hidden=None,
            teacher_weight=None,
            teacher_logits=torch.randn(8, 20),
            teacher_bias=torch.zeros(20),
        ),
        r"teacher_bias",
    ),
    "student_hidden_3d": (dict(student_hidden=torch.randn(2, 4, 6)), r"student_hidden must be 2-D"),
    "chunk_size_zero": (dict(chunk_size=0), r"chunk_size"),
    "num_valid_tokens_zero": (dict(num_valid_tokens=0), r"num_valid_tokens"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_validation_errors(case):
    changes, match = BAD_CASES[case]
    kwargs = _base_kwargs()
    kwargs.update(changes)
    with pytest.raises(ValueError, match=match):
        kd_loss_reference(**kwargs)


def test_valid_base_kwargs_and_plain_ce_accepted():
    assert torch.isfinite(kd_loss_reference(**_base_kwargs()))
    kw = _base_kwargs()
    kw.update(teacher_hidden=None, teacher_weight=None, kd_weight=0.0, ce_weight=1.0)
    assert torch.isfinite(kd_loss_reference(**kw))


def test_package_exports():
    import sapling.kernels as k

    assert k.fused_linear_kd_loss is fused_linear_kd_loss
    assert set(DIVERGENCES) == {"forward_kl", "reverse_kl", "jsd"}
    assert {"fused_linear_kd_loss", "kd_loss_reference", "DIVERGENCES"} <= set(k.__all__)
