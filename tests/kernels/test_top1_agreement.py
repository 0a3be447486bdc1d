"""Top-1 teacher-student agreement from the fused KD loss and its reference (``parts["top1_agree"]``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sapling.kernels import fused_kd_loss, fused_linear_kd_loss, kd_loss_reference
from sapling.kernels.chunk_torch import _argmax_block, argmax_rows

IGNORE = -100
N, H, V, K = 48, 16, 96, 5


def make_case(seed: int = 0, device: str = "cpu", vocab: int = V) -> dict:
    """Teacher = perturbed student (same width): about half the rows agree; a quarter of rows ignored."""
    g = torch.Generator().manual_seed(seed)
    h_s = torch.randn(N, H, generator=g)
    w_s = torch.randn(vocab, H, generator=g)
    b_s = torch.randn(vocab, generator=g)
    h_t = h_s + 0.6 * torch.randn(N, H, generator=g)
    w_t = w_s + 0.6 * torch.randn(vocab, H, generator=g)
    b_t = b_s + 0.6 * torch.randn(vocab, generator=g)
    labels = torch.randint(0, vocab, (N,), generator=g)
    labels[torch.randperm(N, generator=g)[: N // 4]] = IGNORE
    case = dict(h_s=h_s, w_s=w_s, b_s=b_s, h_t=h_t, w_t=w_t, b_t=b_t, labels=labels)
    return {k: v.to(device) for k, v in case.items()}


def brute_force(x: dict, rows: torch.Tensor | None = None) -> int:
    """Row-by-row count of argmax(z_s) == argmax(z_t) over the given rows (default: the valid ones)."""
    z_s = x["h_s"].double() @ x["w_s"].double().T + x["b_s"].double()
    z_t = x["h_t"].double() @ x["w_t"].double().T + x["b_t"].double()
    rows = (x["labels"] != IGNORE).nonzero().flatten() if rows is None else rows
    return sum(int(torch.argmax(z_s[i]) == torch.argmax(z_t[i])) for i in rows.tolist())


def teacher_forms(x: dict, shuffle_topk: bool = False) -> dict[str, dict]:
    z_t = F.linear(x["h_t"], x["w_t"], x["b_t"])
    lp_t, idx = torch.topk(F.log_softmax(z_t, dim=-1), K, dim=-1)  # sorted: idx[:, 0] is the argmax
    if shuffle_topk:  # an unsorted cache: the argmax is idx[argmax(lp_t)], not idx[:, 0]
        perm = torch.arange(1, K + 1) % K  # the argmax moves to the last column
        lp_t, idx = lp_t[:, perm], idx[:, perm]
        assert not torch.equal(idx[:, 0], torch.topk(z_t, 1).indices[:, 0])
    return {
        "dense": dict(teacher_hidden=x["h_t"], teacher_weight=x["w_t"], teacher_bias=x["b_t"]),
        "logits": dict(teacher_logits=z_t),
        "topk": dict(teacher_topk=(lp_t, idx)),
    }


def test_case_discriminates():
    """Counting all rows, or none, or every row, would give a different number than the valid-row count."""
    x = make_case()
    want = brute_force(x)
    n_valid = int((x["labels"] != IGNORE).sum())
    assert 0 < want < n_valid
    assert brute_force(x, torch.arange(N)) != want


@pytest.mark.parametrize("form", ["dense", "logits", "topk"])
@pytest.mark.parametrize(
    "divergence, temperature, chunk_size",
    [
        ("forward_kl", 1.0, None),  # dense: the CPU few-pass path that overwrites the logits buffers
        ("forward_kl", 1.0, 7),  # several chunks, the last one partial
        ("jsd", 2.0, 5),  # general path; the temperature does not move an argmax
    ],
)
def test_top1_agree_equals_brute_force(form, divergence, temperature, chunk_size):
    x = make_case()
    want = brute_force(x)
    h_s, w_s, b_s = (x[k].clone().requires_grad_(True) for k in ("h_s", "w_s", "b_s"))
    kw = dict(
        labels=x["labels"],
        divergence=divergence,
        temperature=temperature,
        ce_weight=0.3,
        student_bias=b_s,
        return_parts=True,
        **teacher_forms(x)[form],
    )
    loss, parts = fused_linear_kd_loss(h_s, w_s, chunk_size=chunk_size, **kw)
    assert parts["top1_agree"].dtype == torch.int64 and parts["top1_agree"].dim() == 0
    assert int(parts["top1_agree"]) == want
    _, ref_parts = kd_loss_reference(
        x["h_s"], x["w_s"], chunk_size=chunk_size, **{**kw, "student_bias": x["b_s"]}
    )
    assert int(ref_parts["top1_agree"]) == want
    loss.backward()  # bitwise-unchanged gradients: test_return_parts_false_is_unchanged_and_skips_the_count
    assert h_s.grad is not None and torch.isfinite(h_s.grad).all()
    with torch.no_grad():  # the no-grad path counts the same
        _, parts_ng = fused_linear_kd_loss(
            x["h_s"], x["w_s"], chunk_size=chunk_size, **{**kw, "student_bias": x["b_s"]}
        )
    assert int(parts_ng["top1_agree"]) == want


def test_top1_agree_large_vocab():
    """V = 16000: the blockwise CPU argmax (blocks of 128) on the overwritten-buffers forward-KL path."""
    x = make_case(seed=1, vocab=16000)
    want = brute_force(x)
    assert 0 < want < int((x["labels"] != IGNORE).sum())
    h_s = x["h_s"].clone().requires_grad_(True)
    kw = dict(labels=x["labels"], student_bias=x["b_s"], return_parts=True, chunk_size=20)
    _, parts = fused_linear_kd_loss(h_s, x["w_s"], **kw, **teacher_forms(x)["dense"])
    assert int(parts["top1_agree"]) == want


def test_unsorted_topk_uses_argmax_of_cached_logprobs():
    x = make_case()
    kw = dict(labels=x["labels"], student_bias=x["b_s"], return_parts=True, **teacher_forms(x, True)["topk"])
    _, parts = fused_linear_kd_loss(x["h_s"], x["w_s"], **kw)
    _, ref_parts = kd_loss_reference(x["h_s"], x["w_s"], **kw)
    assert int(parts["top1_agree"]) == int(ref_parts["top1_agree"]) == brute_force(x)


def test_all_rows_valid_and_kd_weight_zero():
    x = make_case(seed=3)
    kw = dict(student_bias=x["b_s"], return_parts=True, **teacher_forms(x)["dense"])
    _, parts = fused_linear_kd_loss(x["h_s"], x["w_s"], **kw)  # labels=None: every row counts
    assert int(parts["top1_agree"]) == brute_force(x, torch.arange(N))
    _, parts = fused_linear_kd_loss(
        x["h_s"], x["w_s"], labels=x["labels"], kd_weight=0.0, ce_weight=1.0, **kw
    )
    assert int(parts["top1_agree"]) == brute_force(x)  # reported even when the KD term has no weight


def test_no_valid_row_and_no_teacher():
    x = make_case()
    none_valid = torch.full_like(x["labels"], IGNORE)
    kw = dict(labels=none_valid, return_parts=True, **teacher_forms(x)["logits"])
    for fn in (fused_linear_kd_loss, kd_loss_reference):
        _, parts = fn(x["h_s"], x["w_s"], **kw)
        assert int(parts["top1_agree"]) == 0 and parts["num_valid"] == 0
        _, parts = fn(x["h_s"], x["w_s"], labels=x["labels"], kd_weight=0.0, ce_weight=1.0, return_parts=True)
        assert "top1_agree" not in parts  # no teacher, nothing to agree with


def test_return_parts_false_is_unchanged_and_skips_the_count(monkeypatch):
    """Same loss and gradients bitwise with and without parts; without them the argmax is never taken."""
    x = make_case()
    kw = dict(labels=x["labels"], ce_weight=0.2, **teacher_forms(x)["dense"])

    def run(return_parts: bool):
        h, w = x["h_s"].clone().requires_grad_(True), x["w_s"].clone().requires_grad_(True)
        out = fused_linear_kd_loss(h, w, return_parts=return_parts, chunk_size=9, **kw)
        loss = out[0] if return_parts else out
        loss.backward()
        return loss, h.grad, w.grad

    with_parts = run(True)

    def fail(*args, **kwargs):
        raise AssertionError("top1_matches called without return_parts")

    monkeypatch.setattr(fused_kd_loss, "top1_matches", fail)
    without = run(False)
    assert isinstance(fused_linear_kd_loss(x["h_s"], x["w_s"], **kw), torch.Tensor)
    for a, b in zip(with_parts, without):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_top1_agree_cuda_bf16():
    """Triton chunk path: the count comes from torch argmax on the chunk's bf16 logits before the kernel."""
    x = make_case(device="cuda")
    bf = {k: (v.bfloat16() if v.is_floating_point() else v) for k, v in x.items()}
    h_s = bf["h_s"].clone().requires_grad_(True)
    _, parts = fused_linear_kd_loss(
        h_s,
        bf["w_s"],
        labels=bf["labels"],
        student_bias=bf["b_s"],
        return_parts=True,
        chunk_size=16,
        **teacher_forms(bf)["dense"],
    )
    z_s = F.linear(bf["h_s"], bf["w_s"], bf["b_s"])
    z_t = F.linear(bf["h_t"], bf["w_t"], bf["b_t"])
    valid = bf["labels"] != IGNORE
    assert int(parts["top1_agree"]) == int(((z_s.argmax(-1) == z_t.argmax(-1)) & valid).sum())


@pytest.mark.parametrize("vocab", [32000, 32064, 8209])  # blocks of 128 / 192; 8209 is prime: torch.argmax
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_argmax_rows_is_torch_argmax(vocab, dtype):
    b = _argmax_block(vocab) or 128
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, vocab, generator=g).to(dtype)
    x[1] = 0.0  # all equal: first index
    x[2, [5 * b + 3, 2 * b + 7, vocab - 1]] = 50.0  # tie across blocks: the first one
    x[3, 3 * b] = float("nan")  # NaN counts as the maximum
    x[4, [7 * b + 1, 2 * b + 9]] = float("nan")
    x[5] = float("-inf")
    x[5, -1] = -1e30  # maximum in the last column
    x[6, b - 1 : b + 1] = 9.0  # tie straddling a block boundary
    x[7, 2 * b + 1] = 9.0  # tie in one block, after a larger entry-free block
    x[7, 2 * b + 5] = 9.0
    for y in (x, x[::2], torch.cat([x, x], 1)[:, :vocab]):  # row-strided views too
        assert torch.equal(argmax_rows(y), y.argmax(dim=-1))
