"""benchmarks/kd_loss.py's softcapped row: its float64 reference (analytic gradient through the softcap) is the
definition's autograd gradient, and both our variant and the naive one agree with it."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def kd_bench(load_benchmark):
    return load_benchmark("kd_loss")


def test_softcapped_reference_and_variants(kd_bench):
    g = torch.Generator().manual_seed(0)
    n, hs, ht, v, cap = 24, 16, 24, 101, 2.0
    h_s, w_s = torch.randn(n, hs, generator=g) * 2, torch.randn(v, hs, generator=g)
    h_t, w_t = torch.randn(n, ht, generator=g) * 2, torch.randn(v, ht, generator=g)
    ref = kd_bench.reference64(h_s, w_s, h_t, w_t, softcap=cap)

    h64, w64 = h_s.double().requires_grad_(), w_s.double().requires_grad_()
    z_s = torch.tanh(h64 @ w64.T / cap) * cap
    lp_t = (torch.tanh(h_t.double() @ w_t.double().T / cap) * cap).log_softmax(-1)
    loss = (lp_t.exp() * (lp_t - z_s.log_softmax(-1))).sum(-1).mean()
    loss.backward()
    torch.testing.assert_close(ref[0], loss.detach())
    torch.testing.assert_close(ref[1], h64.grad)
    torch.testing.assert_close(ref[2], w64.grad)
    plain = kd_bench.reference64(h_s, w_s, h_t, w_t)
    assert abs(float(plain[0]) - float(ref[0])) > 0.05  # the cap matters at these logits

    for name in ("naive", "ours_torch"):
        fn = kd_bench.build_variant(name, "cpu", softcap=cap)
        inputs = [h_s.clone().requires_grad_(), w_s.clone().requires_grad_(), h_t, w_t, None]
        out = kd_bench.fwd_bwd(fn, inputs, "cpu")
        errors = kd_bench.rel_errors(out, inputs[0].grad, inputs[1].grad, ref)
        assert max(errors.values()) < 1e-5, (name, errors)
    with pytest.raises(RuntimeError, match="skipped: Liger's fused loss takes no logit softcap"):
        kd_bench.build_variant("liger", "cpu", softcap=cap)
    with pytest.raises(SystemExit):
        kd_bench.main(["--device", "cpu", "--shapes", "gemma2"])
