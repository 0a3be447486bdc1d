"""FLOP counts of a distillation step for HF decoder configs, accelerator peaks, and MFU.

Counted: the matmul FLOPs (2 per multiply-add) of Llama-family decoders (Llama, Mistral, Qwen2, Qwen3,
Gemma: separate q/k/v/o projections, a gated MLP, an untied-or-tied lm_head). Norms, rotary embeddings,
activations, softmax, biases and the embedding lookup are O(H) per token against the O(H^2) matmuls and
are left out, as in the PaLM / Megatron / nanoGPT MFU convention. Per token, one forward, with
``H`` hidden, ``I`` intermediate, ``V`` vocab, ``d`` head_dim, ``nq`` / ``nkv`` attention / KV heads::

    projections   q + k + v + o = 2*H*nq*d + 2 * 2*H*nkv*d + 2*nq*d*H = 4*H*d*(nq + nkv)
    MLP           gate + up + down = 3 * 2*H*I = 6*H*I
    attention     Q K^T and P V    = 2 * 2*nq*d*ctx = 4*nq*d*ctx
    layer         projections + MLP + attention          (times num_hidden_layers)
    lm_head       2*H*V

``ctx`` is the number of keys a query is scored against. ``causal=False`` (default) counts the full
``L x L`` score matrix, ``ctx = L`` = ``seq_len``: the usual MFU convention, what eager / SDPA-math
attention executes and what ``torch.utils.flop_counter`` counts. ``causal=True`` counts only the lower
triangle, ``ctx = (L + 1) / 2`` on average: what a causal flash-attention kernel executes. Sliding-window
attention is counted as full attention.

A training step (forward + backward) is 3x the forward: each matmul ``y = x W`` costs one more matmul of
the same size for ``dx`` and one for ``dW`` (every projection input needs ``dx``: the embeddings are
trained). Activation checkpointing (one checkpoint per decoder layer, as HF's
``activation_checkpointing_enable``) runs each layer's forward again in the backward: ``recompute="full"``
counts all of it (``4 * layers + 3 * lm_head``; reentrant checkpointing, DeepSpeed's); ``"early_stop"``
counts what torch's non-reentrant checkpoint executes (HF's default): it stops once the last tensor saved for
the backward is rebuilt, so each layer's final matmul (``down_proj``, ``2*H*I``) is not rerun. Recompute
FLOPs are hardware FLOPs: PaLM's MFU counts model FLOPs only (``recompute="none"``); with recompute it is HFU.

The distillation step (``sapling.distill.step``) runs the student's decoder (trained), the teacher's
decoder (forward only, no lm_head) and the fused KD head, whose four matmuls per valid row are the student
logits ``2*Hs*V``, the teacher logits ``2*Ht*V``, ``d hidden = g W_s`` ``2*Hs*V`` and ``d W_s += g^T h``
``2*Hs*V``: ``(2*Ht + 6*Hs) * V`` per row (``6*Hs*V`` with a cached top-k teacher). The decoders see
``B * L`` tokens, the head ``B * (L - 1)`` rows (the positions that predict a next token), fewer with
ignored labels.

MFU = achieved FLOP/s over the datasheet dense peak of the devices (``peak_flops``): NVIDIA's dense
(no 2:4 sparsity) tensor-core figures; float32 uses the TF32 peak unless
``torch.get_float32_matmul_precision() == "highest"``. CPUs have no table entry: pass the peak
(config ``trainer.peak_flops``) as ``override``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from sapling.errors import ConfigError, ModelSourceError
from sapling.models.families import is_moe, moe_width_field

__all__ = [
    "DecoderDims",
    "StepFlops",
    "RECOMPUTE_MODES",
    "ce_step_flops",
    "distill_step_flops",
    "forward_flops_per_token",
    "kd_head_flops_per_row",
    "mfu",
    "peak_flops",
    "peak_flops_for_name",
    "train_flops_per_token",
]


@dataclass(frozen=True)
class DecoderDims:
    """The shape fields of a Llama-family decoder config that the FLOP count needs."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    router_experts: int = 0  # MoE: the router's [experts, hidden] matmul; `intermediate` is top-k x expert width

    @classmethod
    def from_config(cls, config: Any) -> DecoderDims:
        """Read an HF config (``head_dim`` defaults to ``hidden_size // num_attention_heads``)."""
        heads = int(config.num_attention_heads)
        kv = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        intermediate, experts = int(config.intermediate_size), 0
        if is_moe(config):  # a token runs the router and its top-k experts: their widths add up
            experts = int(config.num_experts)
            intermediate = min(int(config.num_experts_per_tok), experts) * int(getattr(config, moe_width_field(config)))
        elif getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None):
            raise ModelSourceError(f"{type(config).__name__}: mixture-of-experts configs of this family are not "
                                   "supported; fix: use Qwen3-MoE, Mixtral, OLMoE or a dense model")
        return cls(
            hidden=int(config.hidden_size),
            intermediate=intermediate,
            layers=int(config.num_hidden_layers),
            heads=heads,
            kv_heads=int(kv),
            head_dim=int(head_dim),
            vocab=int(config.vocab_size),
            router_experts=experts,
        )


def _dims(config: Any) -> DecoderDims:
    return config if isinstance(config, DecoderDims) else DecoderDims.from_config(config)


def _layers_forward(d: DecoderDims, seq_len: int, causal: bool) -> float:
    """Forward FLOPs per token of all decoder layers at sequence length ``seq_len``."""
    ctx = (seq_len + 1) / 2 if causal else float(seq_len)
    proj = 4 * d.hidden * d.head_dim * (d.heads + d.kv_heads)
    mlp = 6 * d.hidden * d.intermediate + 2 * d.hidden * d.router_experts
    attn = 4 * d.heads * d.head_dim * ctx
    return d.layers * (proj + mlp + attn)


def forward_flops_per_token(
    config: Any, seq_len: int, *, causal: bool = False, lm_head: bool = True
) -> float:
    """Forward matmul FLOPs per token: decoder layers (+ lm_head ``2*H*V`` when ``lm_head``)."""
    d = _dims(config)
    return _layers_forward(d, seq_len, causal) + (2 * d.hidden * d.vocab if lm_head else 0)


RECOMPUTE_MODES: tuple[str, ...] = ("none", "full", "early_stop")


def train_flops_per_token(
    config: Any, seq_len: int, *, recompute: str = "none", causal: bool = False, lm_head: bool = True
) -> float:
    """Forward + backward FLOPs per token: 3x forward + the recomputed layer forward (``RECOMPUTE_MODES``)."""
    if recompute not in RECOMPUTE_MODES:
        raise ValueError(f"recompute must be one of {', '.join(RECOMPUTE_MODES)}, got {recompute!r}")
    d = _dims(config)
    layers = _layers_forward(d, seq_len, causal)
    head = 2 * d.hidden * d.vocab if lm_head else 0
    extra = 0.0
    if recompute == "full":
        extra = layers
    elif recompute == "early_stop":
        extra = layers - d.layers * 2 * d.hidden * d.intermediate  # down_proj is not rerun
    return 3 * (layers + head) + extra


def kd_head_flops_per_row(student_config: Any, teacher_config: Any | None) -> int:
    """Fused KD head FLOPs per row: ``(2*Ht + 6*Hs) * V``; ``6*Hs*V`` with no dense teacher (top-k cache)."""
    s = _dims(student_config)
    ht = 0 if teacher_config is None else _dims(teacher_config).hidden
    return (2 * ht + 6 * s.hidden) * s.vocab


@dataclass(frozen=True)
class StepFlops:
    """FLOPs of one step, by part (for one micro-batch of ``batch_size`` sequences)."""

    student: float  # decoder layers, forward + backward (+ recompute)
    teacher: float  # decoder layers, forward
    head: float  # the fused KD head (distillation) or the lm_head's forward + backward (CE step)

    @property
    def total(self) -> float:
        return self.student + self.teacher + self.head


def distill_step_flops(
    student_config: Any,
    teacher_config: Any | None,
    *,
    batch_size: int,
    seq_len: int,
    kd_rows: int | None = None,
    recompute: str = "none",
    causal: bool = False,
) -> StepFlops:
    """FLOPs of ``loss_on_batch`` + backward on ``batch_size`` blocks of ``seq_len`` tokens.

    ``kd_rows`` is the number of valid head rows (default ``batch_size * (seq_len - 1)``);
    ``teacher_config=None`` is the cached top-k teacher (no teacher compute).
    """
    tokens = batch_size * seq_len
    rows = batch_size * (seq_len - 1) if kd_rows is None else kd_rows
    student = tokens * train_flops_per_token(
        student_config, seq_len, recompute=recompute, causal=causal, lm_head=False
    )
    teacher = 0.0
    if teacher_config is not None:
        teacher = tokens * forward_flops_per_token(teacher_config, seq_len, causal=causal, lm_head=False)
    return StepFlops(student, teacher, float(rows * kd_head_flops_per_row(student_config, teacher_config)))


def ce_step_flops(
    config: Any, *, batch_size: int, seq_len: int, recompute: str = "none", causal: bool = False
) -> StepFlops:
    """FLOPs of a CE step with HF's ``model(input_ids, labels=...)`` (lm_head on all ``B * L`` tokens)."""
    d = _dims(config)
    tokens = batch_size * seq_len
    layers = tokens * train_flops_per_token(d, seq_len, recompute=recompute, causal=causal, lm_head=False)
    return StepFlops(layers, 0.0, float(tokens * 3 * 2 * d.hidden * d.vocab))


# ----------------------------------------------------------------------------------------------------
# peaks and MFU
# ----------------------------------------------------------------------------------------------------

# Datasheet dense peaks in TFLOP/s: (16-bit: bf16 / fp16, tf32, fp32 without tensor cores), matched in order
# against the lower-cased CUDA device name (e.g. "NVIDIA H100 80GB HBM3" is the SXM part).
_PEAKS_TFLOPS: tuple[tuple[str, tuple[float, float, float]], ...] = (
    (r"\bh100\b.*\bpcie\b", (756.0, 378.0, 51.0)),
    (r"\bh100\b.*\bnvl\b", (835.0, 417.5, 60.0)),
    (r"\bh100\b", (989.0, 494.5, 67.0)),  # SXM5
    (r"\bh200\b.*\bnvl\b", (835.0, 417.5, 60.0)),
    (r"\bg?h200\b", (989.0, 494.5, 67.0)),  # SXM / GH200: the H100 SXM compute
    (r"\ba100\b", (312.0, 156.0, 19.5)),  # SXM4 and PCIe, 40 and 80 GB
)


def peak_flops_for_name(name: str, dtype: torch.dtype) -> float | None:
    """Dense peak FLOP/s of the accelerator named ``name`` for ``dtype`` matmuls; None if not in the table."""
    low = name.lower()
    for pattern, (half, tf32, fp32) in _PEAKS_TFLOPS:
        if re.search(pattern, low):
            if dtype in (torch.bfloat16, torch.float16):
                return half * 1e12
            if dtype == torch.float32:
                return (fp32 if torch.get_float32_matmul_precision() == "highest" else tf32) * 1e12
            return None
    return None


def peak_flops(device: str | torch.device, dtype: torch.dtype, override: float | None = None) -> float | None:
    """Peak FLOP/s of one device: ``override`` when > 0 (``trainer.peak_flops``), else the table.

    CPUs and unknown accelerators give None (MFU is then not reported).
    """
    if override:
        if override < 0:
            raise ConfigError("trainer.peak_flops", override, "must be > 0 FLOP/s",
                              "unset it (known devices are looked up) or give the device's peak, e.g. 989e12")
        return float(override)
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return None
    return peak_flops_for_name(torch.cuda.get_device_name(dev), dtype)


def mfu(flops_per_step: float, step_time_s: float, n_devices: int, peak: float | None) -> float | None:
    """Model FLOPs utilisation: ``flops_per_step / (step_time_s * n_devices * peak)``.

    ``flops_per_step`` counts the whole step on all ``n_devices`` (e.g. per-micro-batch FLOPs x micro-batches
    x data-parallel ranks); ``peak`` is one device's (``peak_flops``). None when ``peak`` is None or the time
    is not positive.
    """
    if peak is None or step_time_s <= 0 or n_devices <= 0:
        return None
    return flops_per_step / (step_time_s * n_devices * peak)
