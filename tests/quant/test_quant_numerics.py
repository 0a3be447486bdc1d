"""The shared weight-only numerics (sapling.quant.numerics) against an independent float64 reference.

The reference rounds with `round_to_bits`, written here from frexp/round in float64 (no torch dtype casts:
torch's float64 -> bfloat16/float16 casts themselves go through float32, i.e. round twice). The module
computes two quotients in float32 -- `absmax / half_range` for the scale and `w / scale` for the codes;
both operands are float32 values there, so the float32 division is the float64 quotient rounded once to
24 bits (double rounding 53 -> 24 bits is innocuous for a quotient of 24-bit operands), which is what the
reference does. Separate tests bound how far that float32 step can move the result from the exact math.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from sapling.quant.numerics import (
    QuantSpec,
    dequantize,
    expand_scales,
    export_dtype,
    fake_quantize,
    fake_quantize_ste,
    group_scales,
    quantize_with_scales,
    rtn,
    spec_from_config,
)

PRECISION = {torch.bfloat16: 8, torch.float16: 11, torch.float32: 24}  # significand bits (incl. implicit)
SCALE_DTYPES = list(PRECISION)
SPECS = [(4, 128), (8, None)]  # w4a16 g128, w8a16 per channel


def round_to_bits(x: torch.Tensor, p: int) -> torch.Tensor:
    """float64 `x` rounded to a p-bit significand, ties to even (normal range; 0 stays 0). Exact in float64."""
    m, e = torch.frexp(x.double())  # x = m * 2**e, 0.5 <= |m| < 1
    return torch.round(m * 2.0**p) * torch.exp2((e - p).double())


def ref_rtn(w: torch.Tensor, bits: int, group: int | None, sdtype: torch.dtype):
    """float64 reference RTN of a float32 (or narrower) `w`: (codes int64, scales float64, exact quotients)."""
    w64 = w.double()
    rows, cols = w64.shape
    g = cols if group is None else group
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    half = (qmax - qmin) / 2
    absmax = w64.reshape(rows, cols // g, g).abs().amax(-1)
    scale = round_to_bits(round_to_bits(absmax / half, 24), PRECISION[sdtype])
    scale = torch.where(absmax > 0, scale, torch.ones_like(scale))
    exact = w64 / scale.repeat_interleave(g, dim=1)
    q = torch.round(round_to_bits(exact, 24)).clamp(qmin, qmax)
    return q.long(), scale, exact


def random_weight(rows: int, cols: int) -> torch.Tensor:
    """Rows of very different magnitudes (e^-4 .. e^2) with a few 8x outliers."""
    w = torch.randn(rows, cols) * torch.exp(torch.empty(rows, 1).uniform_(-4.0, 2.0))
    return torch.where(torch.rand(rows, cols) < 0.01, 8 * w, w)


def random_shapes(n: int, group: int | None) -> list[tuple[int, int]]:
    shapes = []
    for _ in range(n):
        rows = int(torch.randint(1, 49, ()))
        cols = 128 * int(torch.randint(1, 5, ())) if group else int(torch.randint(1, 300, ()))
        shapes.append((rows, cols))
    return shapes


@pytest.mark.parametrize("sdtype", SCALE_DTYPES, ids=str)
@pytest.mark.parametrize("bits,group", SPECS)
def test_rtn_matches_float64_reference(bits, group, sdtype):
    torch.manual_seed(1000 + bits + PRECISION[sdtype])
    spec = QuantSpec(bits, group, sdtype)
    for rows, cols in random_shapes(4, group):
        w = random_weight(rows, cols)
        q, scale = rtn(w, spec)
        q_ref, s_ref, _ = ref_rtn(w, bits, group, sdtype)
        assert q.dtype == torch.int8 and q.shape == (rows, cols)
        assert scale.dtype == sdtype and scale.shape == s_ref.shape
        assert torch.equal(scale.double(), s_ref), (rows, cols)
        assert torch.equal(q.long(), q_ref), (rows, cols)
        # the pieces agree with rtn
        assert torch.equal(group_scales(w, spec), scale)
        assert torch.equal(quantize_with_scales(w, expand_scales(scale, cols), spec), q)


@pytest.mark.parametrize("sdtype", SCALE_DTYPES, ids=str)
@pytest.mark.parametrize("bits,group", SPECS)
def test_float32_steps_stay_within_one_ulp_and_one_code_of_exact_math(bits, group, sdtype):
    """The scale is the exact absmax/half_range rounded to the scale dtype up to one ulp (the float32
    intermediate can double-round), and a code differs from round(exact w/scale) only at a near-tie."""
    torch.manual_seed(2000 + bits + PRECISION[sdtype])
    spec = QuantSpec(bits, group, sdtype)
    p = PRECISION[sdtype]
    for rows, cols in random_shapes(4, group):
        w = random_weight(rows, cols)
        q, scale = rtn(w, spec)
        g = spec.columns_per_group(cols)
        absmax = w.double().reshape(rows, cols // g, g).abs().amax(-1)
        correct = round_to_bits(absmax / spec.half_range, p)  # single rounding of the exact quotient
        ulp = torch.exp2(torch.frexp(correct)[1].double() - p)
        assert ((scale.double() - correct).abs() <= ulp).all()
        assert (scale.double() != correct).float().mean() <= 0.01
        _, _, exact = ref_rtn(w, bits, group, sdtype)
        q_exact = torch.round(exact).clamp(spec.qmin, spec.qmax).long()
        diff = q.long() != q_exact
        assert ((q.long() - q_exact).abs() <= 1).all()
        near_tie = ((exact.abs() - exact.abs().floor()) - 0.5).abs() <= 2.0**-20 * exact.abs().clamp(min=1)
        assert not (diff & ~near_tie).any()


@pytest.mark.parametrize("bits,group", SPECS)
def test_code_range_absmax_codes_and_zero_groups(bits, group):
    torch.manual_seed(3000 + bits)
    spec = QuantSpec(bits, group, torch.bfloat16)
    rows, cols = 32, 256
    w = random_weight(rows, cols)
    w[5] = 0.0  # an all-zero row: an all-zero group in both layouts
    if group is not None:
        w[7, 128:] = 0.0  # an all-zero group next to a non-zero one
    q, scale = rtn(w, spec)
    assert int(q.min()) >= spec.qmin and int(q.max()) <= spec.qmax
    assert int(q.min()) == spec.qmin and int(q.max()) == spec.qmax  # the whole range is used
    assert (scale[5] == 1).all() and (q[5] == 0).all()
    if group is not None:
        assert scale[7, 1] == 1 and (q[7, 128:] == 0).all() and scale[7, 0] != 1
    g = spec.columns_per_group(cols)
    wg, qg = w.reshape(rows, -1, g), q.reshape(rows, -1, g).long()
    absmax = wg.abs().amax(-1, keepdim=True)
    at_max = (wg.abs() == absmax) & (absmax > 0)
    # the absmax element sits at absmax / scale ~ +-half_range: positive -> qmax, negative -> qmin or qmin + 1
    pos, neg = at_max & (wg > 0), at_max & (wg < 0)
    assert pos.any() and neg.any()
    assert (qg[pos] == spec.qmax).all()
    assert ((qg[neg] == spec.qmin) | (qg[neg] == spec.qmin + 1)).all()


@pytest.mark.parametrize("sdtype", SCALE_DTYPES, ids=str)
def test_exact_ties_round_half_to_even(sdtype):
    # absmax 7.5 -> scale exactly 1 in every scale dtype, so w / scale hits the .5 ties exactly
    spec = QuantSpec(4, 16, sdtype)
    w = torch.tensor([[7.5, 0.5, 1.5, 2.5, 3.5, 4.5, 5.5, 6.5, -0.5, -1.5, -2.5, -3.5, -6.5, -7.5, 0.0, 1.0]])
    q, scale = rtn(w, spec)
    assert scale.item() == 1.0
    assert q.tolist() == [[7, 0, 2, 2, 4, 4, 6, 6, 0, -2, -2, -4, -6, -8, 0, 1]]
    q8, scale8 = rtn(torch.tensor([[127.5, 126.5, -125.5, -127.5]]), QuantSpec(8, None, sdtype))
    assert scale8.item() == 1.0 and q8.tolist() == [[127, 126, -126, -128]]


@pytest.mark.parametrize("sdtype", SCALE_DTYPES, ids=str)
@pytest.mark.parametrize("bits,group", SPECS)
def test_dequantize_computes_in_the_scale_dtype_within_half_a_step(bits, group, sdtype):
    torch.manual_seed(4000 + bits + PRECISION[sdtype])
    spec = QuantSpec(bits, group, sdtype)
    rows, cols = 24, 384
    w = random_weight(rows, cols)
    q, scale = rtn(w, spec)
    full = expand_scales(scale, cols)
    dq = dequantize(q, scale)
    assert dq.dtype == sdtype
    assert torch.equal(dq, q.to(sdtype) * full)
    # independently: the exact product q * scale rounded once to the scale dtype
    p = PRECISION[sdtype]
    s64 = full.double()
    assert torch.equal(dq.double(), round_to_bits(q.double() * s64, p))
    assert torch.equal(dequantize(q, full), dq)  # already per-column scales
    out32 = dequantize(q, scale, torch.float32)
    assert out32.dtype == torch.float32 and torch.equal(out32, dq.float())
    # error: half a step, plus the scale's rounding (clamped absmax elements) and the product's rounding
    u = 2.0**-p
    exact_err = (w.double() - q.double() * s64).abs()
    assert (exact_err <= s64 * (0.5 + 2 * spec.half_range * u + 2.0**-20)).all()
    err = (w.double() - dq.double()).abs()
    assert (err <= s64 * (0.5 + (3 * spec.half_range + 1) * u + 2.0**-20)).all()
    assert (exact_err / s64).max() > 0.45  # the bound is not vacuous: errors do reach ~half a step


@pytest.mark.parametrize("sdtype", SCALE_DTYPES, ids=str)
@pytest.mark.parametrize("bits,group", SPECS)
def test_fake_quantize_is_the_export_rtn(bits, group, sdtype):
    """fake_quantize = cast the weight to the export dtype, RTN, dequantize in that dtype, cast back."""
    torch.manual_seed(5000 + bits + PRECISION[sdtype])
    spec = QuantSpec(bits, group, sdtype)
    w = random_weight(16, 256)
    fq = fake_quantize(w, spec)
    assert fq.dtype == torch.float32 and fq.shape == w.shape
    p = PRECISION[sdtype]
    w_export = round_to_bits(w.double(), p).float()
    q_ref, s_ref, _ = ref_rtn(w_export, bits, group, sdtype)
    g = spec.columns_per_group(256)
    expected = round_to_bits(q_ref.double() * s_ref.repeat_interleave(g, dim=1), p)
    assert torch.equal(fq.double(), expected)
    assert torch.equal(fake_quantize(w.double(), spec), fq.double())  # returned in w's dtype


@pytest.mark.parametrize("sdtype", SCALE_DTYPES, ids=str)
@pytest.mark.parametrize("bits,group", SPECS)
def test_requantizing_with_fixed_scales_reproduces_the_codes(bits, group, sdtype):
    torch.manual_seed(6000 + bits + PRECISION[sdtype])
    spec = QuantSpec(bits, group, sdtype)
    w = random_weight(32, 256)
    q, scale = rtn(w, spec)
    dq = dequantize(q, scale)
    assert torch.equal(quantize_with_scales(dq, expand_scales(scale, 256), spec), q)
    assert torch.equal(dequantize(quantize_with_scales(dq, expand_scales(scale, 256), spec), scale), dq)


@pytest.mark.parametrize("bits,group", SPECS)
def test_fake_quantize_is_not_idempotent_because_the_scale_shrinks_or_grows(bits, group):
    """fake_quantize(fake_quantize(w)) != fake_quantize(w): after quantization a group's absmax is
    max|q| * scale with max|q| in {qmax, -qmin} (7 or 8 for int4), never half_range (7.5), so the re-derived
    scale is max|q| / half_range times the first one and every non-zero group changes."""
    torch.manual_seed(7000 + bits)
    spec = QuantSpec(bits, group, torch.float32)
    rows, cols = 32, 256
    w = random_weight(rows, cols)
    w[3] = 0.0
    fq1 = fake_quantize(w, spec)
    fq2 = fake_quantize(fq1, spec)
    q1, s1 = rtn(w, spec)
    _, s2 = rtn(fq1, spec)
    g = spec.columns_per_group(cols)
    maxq = q1.long().abs().reshape(rows, -1, g).amax(-1)
    nonzero = maxq > 0
    assert (maxq[nonzero] == spec.qmax).any() and (maxq[nonzero] == -spec.qmin).any()
    assert ((maxq[nonzero] == spec.qmax) | (maxq[nonzero] == -spec.qmin)).all()
    expected_s2 = s1.double() * maxq.double() / spec.half_range
    torch.testing.assert_close(s2.double()[nonzero], expected_s2[nonzero], rtol=4 * 2.0**-24, atol=0)
    changed = (fq2 != fq1).reshape(rows, -1, g).any(-1)
    assert torch.equal(changed, nonzero)
    assert (fq2[3] == 0).all()
    # a hand-checkable group: [7.5, 6, 3, 0] -> scale 1, [7, 6, 3, 0] -> scale 7/7.5, codes [7, 6, 3, 0]
    small = QuantSpec(4, 4, torch.float32)
    once = fake_quantize(torch.tensor([[7.5, 6.0, 3.0, 0.0]]), small)
    assert once.tolist() == [[7.0, 6.0, 3.0, 0.0]]
    s = round_to_bits(torch.tensor(7.0 / 7.5, dtype=torch.float64), 24)
    twice = round_to_bits(torch.tensor([[7.0, 6.0, 3.0, 0.0]], dtype=torch.float64) * s, 24)
    assert torch.equal(fake_quantize(once, small).double(), twice)


@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16], ids=str)
def test_fake_quantize_ste_forward_is_fake_quantize_and_gradient_passes_straight_through(wdtype):
    torch.manual_seed(8000)
    spec = QuantSpec(4, 32, torch.bfloat16)
    w = random_weight(8, 128).to(wdtype).requires_grad_(True)
    out = fake_quantize_ste(w, spec)
    assert out.dtype == wdtype
    assert torch.equal(out.detach(), fake_quantize(w.detach(), spec))
    upstream = torch.randn(8, 128).to(wdtype)
    out.backward(upstream)
    assert w.grad.dtype == wdtype and torch.equal(w.grad, upstream)
    # inside a larger graph the quantizer contributes a factor of exactly 1
    w.grad = None
    c = torch.randn(8, 128).to(wdtype)
    (fake_quantize_ste(w, spec) * c).sum().backward()
    assert torch.equal(w.grad, c)


def test_rtn_rejects_widths_the_groups_do_not_tile_and_fits():
    spec = QuantSpec(4, 128)
    assert spec.fits(256) and spec.fits(128) and not spec.fits(200) and not spec.fits(64)
    assert QuantSpec(8, None).fits(200) and QuantSpec(4, 32).fits(96)
    with pytest.raises(ValueError, match="multiple of the group size"):
        rtn(torch.randn(4, 200), spec)
    with pytest.raises(ValueError):
        rtn(torch.randn(4, 64), spec)
    q, s = rtn(torch.randn(4, 200), QuantSpec(8, None))
    assert q.shape == (4, 200) and s.shape == (4, 1)


def test_quant_spec_properties():
    int4, int8 = QuantSpec(4, 128), QuantSpec(8, None)
    assert (int4.qmin, int4.qmax, int4.half_range) == (-8, 7, 7.5)
    assert (int8.qmin, int8.qmax, int8.half_range) == (-128, 127, 127.5)
    assert int4.columns_per_group(256) == 128 and int8.columns_per_group(300) == 300
    assert int4.label == "w4g128" and int8.label == "w8per-channel"
    assert QuantSpec().scale_dtype == torch.bfloat16


def test_spec_from_config():
    cfg = SimpleNamespace(scheme="w4a16", group_size=64, dtype="bfloat16")
    assert spec_from_config(cfg) == QuantSpec(4, 64, torch.bfloat16)
    cfg8 = SimpleNamespace(scheme="w8a16", group_size=64, dtype="float16")
    assert spec_from_config(cfg8) == QuantSpec(8, None, torch.float16)
    assert spec_from_config(SimpleNamespace(scheme="w4a16", group_size=32, dtype="float32")).scale_dtype == torch.float32
    with pytest.raises(ValueError, match="scheme"):
        spec_from_config(SimpleNamespace(scheme="w3a16", group_size=128, dtype="bfloat16"))
    with pytest.raises(ValueError, match="dtype"):
        spec_from_config(SimpleNamespace(scheme="w4a16", group_size=128, dtype="int8"))
    assert export_dtype("float16") == torch.float16
    with pytest.raises(ValueError):
        export_dtype("fp16")
