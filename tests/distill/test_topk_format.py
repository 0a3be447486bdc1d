"""The packed top-k record format: exact bit-level round trips, quantization bounds, renormalisation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sapling.distill.topk_format import (
    RecordLayout,
    decode_codes,
    decode_records,
    dequantize_nll,
    encode_records,
    naive_bytes_per_token,
    pack_fields,
    quantize_nll,
    unpack_fields,
)


def _bitstring(values: np.ndarray, widths: list[int]) -> str:
    """Reference layout: each field's bits, least-significant first, concatenated."""
    return "".join(format(int(v), f"0{w}b")[::-1] for v, w in zip(values, widths, strict=True))


@pytest.mark.parametrize("seed", range(6))
def test_pack_fields_matches_bit_reference_and_round_trips(seed):
    rng = np.random.default_rng(seed)
    widths = [int(w) for w in rng.integers(1, 58, size=int(rng.integers(1, 24)))]
    record_bytes = (sum(widths) + 7) // 8 + int(rng.integers(0, 3))
    values = np.stack([rng.integers(0, 2**w, size=17, dtype=np.uint64) for w in widths], axis=1)
    values[0] = [2**w - 1 for w in widths]  # all ones: any overlap or lost bit shows
    packed = pack_fields(values, widths, record_bytes)
    assert packed.shape == (17, record_bytes) and packed.dtype == np.uint8
    for row in range(17):
        bits = "".join(format(b, "08b")[::-1] for b in packed[row])
        want = _bitstring(values[row], widths)
        assert bits[: len(want)] == want
        assert set(bits[len(want):]) <= {"0"}  # padding is zero
    np.testing.assert_array_equal(unpack_fields(packed, widths), values)


def test_pack_fields_rejects_values_wider_than_their_field():
    with pytest.raises(ValueError, match="field 1"):
        pack_fields(np.array([[1, 8]], dtype=np.uint64), [3, 3], 1)
    with pytest.raises(ValueError, match="do not fit"):
        pack_fields(np.array([[1, 1]], dtype=np.uint64), [5, 5], 1)


@pytest.mark.parametrize(("vocab", "k", "bits"), [(2048, 64, 12), (32000, 16, 12), (128256, 64, 12), (151936, 8, 16),
                                                  (3, 3, 2), (2, 1, 8)])
def test_records_round_trip_exactly(vocab, k, bits):
    layout = RecordLayout(k, vocab, bits)
    rng = np.random.default_rng(vocab + k)
    n = 257
    idx = np.stack([rng.choice(vocab, k, replace=False) for _ in range(n)])
    logp = -rng.exponential(4.0, size=(n, k))
    logp[0, 0], logp[1, :] = 0.0, -np.inf  # edges: probability 1, and below the quantizer's range
    log_tail = np.log(rng.uniform(1e-9, 0.9, size=n))
    records = encode_records(logp, idx, log_tail, layout)
    assert records.shape == (n, layout.record_bytes)
    codes, got_idx, tail_codes = decode_codes(records, layout)
    np.testing.assert_array_equal(got_idx, idx)
    np.testing.assert_array_equal(codes, quantize_nll(logp, layout))
    np.testing.assert_array_equal(tail_codes, quantize_nll(log_tail, layout))
    # re-encoding the decoded codes reproduces the bytes
    again = encode_records(dequantize_nll(codes, layout), got_idx, dequantize_nll(tail_codes, layout), layout)
    np.testing.assert_array_equal(again, records)


def test_quantization_error_is_at_most_half_a_step():
    layout = RecordLayout(4, 100, 12)
    x = -np.random.default_rng(0).uniform(0, layout.max_nll, size=10_000)
    err = np.abs(dequantize_nll(quantize_nll(x, layout), layout) - x)
    assert err.max() <= layout.step / 2 + 1e-6
    assert layout.step == pytest.approx(32.0 / 4095)
    clipped = dequantize_nll(quantize_nll(np.array([-100.0, -np.inf]), layout), layout)
    np.testing.assert_allclose(clipped, -layout.max_nll)


def test_decoded_logprobs_sum_to_one_minus_the_stored_tail():
    torch.manual_seed(0)
    vocab, k = 500, 20
    logits = torch.randn(64, vocab, dtype=torch.float64) * 3
    lp = torch.log_softmax(logits, dim=-1)
    top, idx = lp.topk(k, dim=-1)
    tail = lp.scatter(1, idx, float("-inf")).logsumexp(dim=-1)
    layout = RecordLayout(k, vocab)
    got_lp, got_idx = decode_records(encode_records(top, idx, tail, layout), layout)
    assert torch.equal(got_idx, idx)
    stored_tail = torch.from_numpy(dequantize_nll(quantize_nll(tail.numpy(), layout), layout)).double().exp()
    head = got_lp.double().exp().sum(dim=-1)
    torch.testing.assert_close(head + stored_tail, torch.ones(64, dtype=torch.float64), atol=1e-6, rtol=0)
    # every value is within a quantization step (plus the small renormalising shift) of the exact log-prob
    assert (got_lp.double() - top).abs().max() < 2 * layout.step


def test_layout_sizes_and_goal_at_k64():
    for vocab, index_bits in ((2048, 11), (32000, 15), (128256, 17)):
        layout = RecordLayout(64, vocab)
        assert layout.index_bits == index_bits
        assert layout.record_bytes == math.ceil((64 * (index_bits + 12) + 12) / 8)
        assert layout.record_bytes <= naive_bytes_per_token(64) / 3
    with pytest.raises(ValueError, match="top_k"):
        RecordLayout(10, 5)
    with pytest.raises(ValueError, match="value_bits"):
        RecordLayout(4, 100, value_bits=40)
