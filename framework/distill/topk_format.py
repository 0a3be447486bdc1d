"""The packed on-disk form of a teacher's top-k distribution, one fixed-width record per token.

A record holds the k most likely tokens of the teacher's distribution at temperature T and the mass
of everything else:

    k entries, each:  vocab index  (index_bits = ceil(log2 V) bits)
                      quantized -log p  (value_bits bits)
    then the tail:    quantized -log(tail mass)  (value_bits bits)

packed least-significant bit first into ``record_bytes = ceil(bits / 8)`` bytes (byte-aligned per
token, so any token can be read without its neighbours).

Quantization: ``q = round(min(-log p, max_nll) / step)`` with ``step = max_nll / (2**value_bits - 1)``.
With the defaults (12 bits, max_nll 32) the step is 0.0078 nats, an error of at most 0.4% in any
probability, and probabilities below e^-32 (1.3e-14) are raised to it. ``benchmarks/cache.py`` measures
what each width costs in KL against the full distribution; 12 bits is where that stops mattering
(the top-k truncation dominates) and keeps k=64 records under 1/3 of fp32 values + int64 indices even
at V=128k (16-bit values would not).

Decoding (:func:`decode_records`) returns log-probs renormalised so that the k entries and the stored
tail mass sum to one: the fused loss derives the tail bucket as 1 - sum(top-k), and the stored tail is
far more accurate than that difference of quantized values.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

DEFAULT_VALUE_BITS = 12
DEFAULT_MAX_NLL = 32.0


@dataclass(frozen=True)
class RecordLayout:
    """Field widths and sizes of one token's record (see the module docstring)."""

    top_k: int
    vocab_size: int
    value_bits: int = DEFAULT_VALUE_BITS
    max_nll: float = DEFAULT_MAX_NLL

    def __post_init__(self) -> None:
        if not 1 <= self.top_k <= self.vocab_size:
            raise ValueError(f"top_k must be in [1, vocab_size={self.vocab_size}], got {self.top_k}")
        if not 2 <= self.value_bits <= 24:
            raise ValueError(f"value_bits must be in [2, 24], got {self.value_bits}")
        if not self.max_nll > 0:
            raise ValueError(f"max_nll must be > 0, got {self.max_nll}")
        if self.entry_bits + 7 > 64:
            raise ValueError(f"vocab_size={self.vocab_size} with value_bits={self.value_bits} needs "
                             f"{self.entry_bits}-bit entries; at most 57 are supported")

    @property
    def index_bits(self) -> int:
        return max(1, math.ceil(math.log2(self.vocab_size)))

    @property
    def entry_bits(self) -> int:
        return self.index_bits + self.value_bits

    @property
    def record_bits(self) -> int:
        return self.top_k * self.entry_bits + self.value_bits

    @property
    def record_bytes(self) -> int:
        return (self.record_bits + 7) // 8

    @property
    def step(self) -> float:
        """Quantization step of -log p, in nats."""
        return self.max_nll / (2**self.value_bits - 1)

    def to_dict(self) -> dict:
        return {**asdict(self), "index_bits": self.index_bits, "record_bytes": self.record_bytes}


def naive_bytes_per_token(top_k: int) -> int:
    """The obvious layout: fp32 log-probs and int64 indices."""
    return top_k * (4 + 8)


# ---------------------------------------------------------------------------------------------- quantization


def quantize_nll(logp: np.ndarray, layout: RecordLayout) -> np.ndarray:
    """Log-probs (<= 0; -inf allowed) -> integer codes in [0, 2**value_bits - 1]."""
    nll = np.clip(-np.asarray(logp, dtype=np.float64), 0.0, layout.max_nll)
    return np.rint(nll / layout.step).astype(np.uint64)


def dequantize_nll(codes: np.ndarray, layout: RecordLayout) -> np.ndarray:
    """Integer codes -> log-probs (float32)."""
    return (codes.astype(np.float64) * -layout.step).astype(np.float32)


# ---------------------------------------------------------------------------------------------- bit packing


def pack_fields(fields: np.ndarray, widths: list[int], record_bytes: int) -> np.ndarray:
    """Pack [n, F] unsigned ints, field j ``widths[j]`` bits wide, into [n, record_bytes] uint8 records.

    Fields are laid out in order, least-significant bit first; bits past the last field are zero.
    ValueError when a value does not fit its width. Each field is shifted into the little-endian 64-bit
    word that starts at its first byte and OR-ed into the record; fields are written in groups whose
    words do not overlap, so one vectorised OR per group suffices.
    """
    fields = np.ascontiguousarray(fields, dtype=np.uint64)
    n, f = fields.shape
    if f != len(widths):
        raise ValueError(f"{f} fields but {len(widths)} widths")
    offsets = np.concatenate([[0], np.cumsum(widths)]).astype(np.int64)
    if offsets[-1] > record_bytes * 8:
        raise ValueError(f"{offsets[-1]} bits do not fit in {record_bytes} bytes")
    if max(widths) + 7 > 64:
        raise ValueError(f"fields are at most 57 bits wide, got {max(widths)}")
    limits = np.array([(1 << w) - 1 for w in widths], dtype=np.uint64)
    if n and bool((fields > limits).any()):
        j = int(np.argwhere(fields > limits)[0, 1])
        raise ValueError(f"field {j} holds {int(fields[:, j].max())}, more than its {widths[j]} bits allow")
    first_byte = offsets[:-1] // 8
    shifts = (offsets[:-1] % 8).astype(np.uint64)
    out = np.zeros((n, record_bytes + 8), dtype=np.uint8)  # 8 spare bytes: the last word may run past the end
    # Greedy groups: a field joins the current group if its word starts at or after the previous one's end.
    groups: list[list[int]] = []
    for j in range(f):
        for g in groups:
            if first_byte[j] >= first_byte[g[-1]] + 8:
                g.append(j)
                break
        else:
            groups.append([j])
    for g in groups:
        cols = np.array(g)
        words = fields[:, cols] << shifts[cols]  # [n, m]
        window = (first_byte[cols][:, None] + np.arange(8)).reshape(-1)  # distinct byte positions
        out[:, window] |= np.ascontiguousarray(words, dtype="<u8").view(np.uint8).reshape(n, -1)
    return out[:, :record_bytes]


def unpack_fields(records: np.ndarray | torch.Tensor, widths: list[int]) -> torch.Tensor:
    """Inverse of :func:`pack_fields`: [n, record_bytes] uint8 -> [n, F] int64, on the records' device.

    Each field is read from the little-endian word that starts at its first byte (only as many bytes as
    the widest field can span), shifted and masked: one gather per record, no per-bit work, so it runs
    as well on the GPU the records were copied to. Fields must be at most 57 bits wide (int64 words).
    """
    if isinstance(records, np.ndarray):
        records = torch.from_numpy(np.ascontiguousarray(records, dtype=np.uint8))
    n, nbytes = records.shape
    offsets = np.concatenate([[0], np.cumsum(widths)[:-1]]).astype(np.int64)
    span = (7 + max(widths) + 7) // 8  # bytes a field can touch from its first byte
    padded = torch.nn.functional.pad(records, (0, span))
    window = torch.from_numpy((offsets // 8)[:, None] + np.arange(span)).to(records.device)  # [F, span]
    byte_shift = torch.arange(0, 8 * span, 8, device=records.device)
    words = (padded[:, window].long() << byte_shift).sum(dim=-1)  # [n, F]; disjoint bits, so sum == or
    shifts = torch.from_numpy(offsets % 8).to(records.device)
    masks = torch.tensor([(1 << w) - 1 for w in widths], dtype=torch.int64, device=records.device)
    return (words >> shifts) & masks


# ---------------------------------------------------------------------------------------------- records


def field_widths(layout: RecordLayout) -> list[int]:
    return [layout.entry_bits] * layout.top_k + [layout.value_bits]


def encode_records(logp: np.ndarray | torch.Tensor, indices: np.ndarray | torch.Tensor,
                   log_tail: np.ndarray | torch.Tensor, layout: RecordLayout) -> np.ndarray:
    """Top-k log-probs [n, k], their vocab indices [n, k] and log tail mass [n] -> records [n, record_bytes]."""
    logp, indices, log_tail = (x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
                               for x in (logp, indices, log_tail))
    n, k = logp.shape
    if k != layout.top_k or indices.shape != (n, k) or log_tail.shape != (n,):
        raise ValueError(f"expected logp/indices [n, {layout.top_k}] and log_tail [n], got {logp.shape}, "
                         f"{indices.shape}, {log_tail.shape}")
    if n and (indices.min() < 0 or indices.max() >= layout.vocab_size):
        raise ValueError(f"indices outside [0, {layout.vocab_size})")
    entries = indices.astype(np.uint64) | (quantize_nll(logp, layout) << np.uint64(layout.index_bits))
    fields = np.concatenate([entries, quantize_nll(log_tail, layout)[:, None]], axis=1)
    return pack_fields(fields, field_widths(layout), layout.record_bytes)


def decode_codes(records: np.ndarray | torch.Tensor, layout: RecordLayout) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """records -> (value codes [n, k], indices [n, k], tail code [n]) exactly as packed (numpy, uint64)."""
    codes, idx, tail = _decode_fields(records, layout)
    return (codes.cpu().numpy().astype(np.uint64), idx.cpu().numpy().astype(np.uint64),
            tail.cpu().numpy().astype(np.uint64))


def _decode_fields(records: np.ndarray | torch.Tensor, layout: RecordLayout
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    fields = unpack_fields(records, field_widths(layout))
    entries, tail = fields[:, :-1], fields[:, -1]
    return entries >> layout.index_bits, entries & ((1 << layout.index_bits) - 1), tail


def decode_records(records: np.ndarray | torch.Tensor, layout: RecordLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """records -> (log-probs float32 [n, k], indices int64 [n, k]) for the fused loss's top-k path, on the
    records' device (the trainer copies the packed bytes to the GPU and decodes there).

    The log-probs are shifted by one constant per token so that sum(exp(logp)) = 1 - tail (see the
    module docstring); the indices are exact.
    """
    codes, idx, tail = _decode_fields(records, layout)
    logp = codes.float() * -layout.step
    log_tail = tail.float() * -layout.step
    head_mass = (-torch.expm1(log_tail)).clamp(min=1e-30).log()  # log(1 - tail)
    shift = head_mass - torch.logsumexp(logp, dim=1)
    return logp + shift[:, None], idx
