"""Write a quantized student as a compressed-tensors checkpoint (pack-quantized) that serving engines load.

The checkpoint is an ordinary HF model directory whose config.json carries
`quantization_config: {quant_method: compressed-tensors, format: pack-quantized, ...}`; each quantized
linear stores `weight_packed` (int4/int8 values packed densely into int32), `weight_scale` (per group or
per channel, in the export dtype) and `weight_shape`. Everything else (embeddings, norms, lm_head and
any linear left out) is stored in the export dtype (bf16 by default). vLLM / SGLang serve it with their
W4A16 / W8A16 kernels; `transformers.AutoModelForCausalLM.from_pretrained` loads it (also on CPU).

After writing, the packed tensors are read back and unpacked: the export fails rather than ship integers
that differ from the ones Sapling computed.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sapling.io import write_dir_atomically
from sapling.quant.layerwise import QuantResult
from sapling.quant.numerics import dequantize

log = logging.getLogger("sapling")


def quantization_config(result: QuantResult, model: nn.Module) -> Any:
    """The compressed-tensors QuantizationConfig describing `result` (targets: the quantized linears)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    spec = result.spec
    # `observer` and `actorder` only record how the scales were chosen (compressed-tensors' names), as
    # llm-compressor's exports do: loaders read the stored scales, never recompute them. GPTQ's activation
    # order keeps contiguous groups ("static": no g_idx); compressed-tensors takes actorder for groups only.
    common = dict(num_bits=spec.bits, type="int", symmetric=True, observer=result.observer)
    if spec.group_size is None:
        weights = QuantizationArgs(**common, strategy="channel")
    else:
        weights = QuantizationArgs(**common, strategy="group", group_size=spec.group_size,
                                   actorder="static" if result.act_order else None)
    quantized = set(result.weights)
    left_out = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in quantized]
    return QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
        ignore=left_out, quantization_status="frozen", format="pack-quantized",
    )


def export_compressed(model: nn.Module, result: QuantResult, out_dir: str | os.PathLike,
                      tokenizer: Any = None) -> Path:
    """Write `model` (its quantized linears described by `result`) to `out_dir` atomically.

    `model` is not modified: the export works on a CPU copy in the export dtype.
    """
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import apply_quantization_config

    dtype = result.spec.scale_dtype
    export = copy.deepcopy(model).to(device="cpu", dtype=dtype)
    for m in export.modules():  # Sapling's Linear subclasses (KD head, fake-quant) export as plain linears
        if isinstance(m, nn.Linear) and type(m) is not nn.Linear:
            m.__class__ = nn.Linear
    qcfg = quantization_config(result, export)
    apply_quantization_config(export, qcfg)
    modules = dict(export.named_modules())
    for name, (q, scale) in result.weights.items():
        m = modules[name]
        if not hasattr(m, "weight_scale"):
            raise RuntimeError(f"compressed-tensors did not attach a scale to {name}")
        m.weight_scale.data = scale.to(dtype).reshape(m.weight_scale.shape).clone()
        # compressed-tensors re-derives the integers as round(weight / scale) in the weight's dtype: hand it
        # the exact float32 product (a bf16 q * scale is rounded, enough to flip int8 values near 127).
        m.weight.data = dequantize(q, scale.to(dtype).float())
    compressor = ModelCompressor.from_pretrained_model(export, quantization_format="pack-quantized")
    compressor.compress_model(export)

    def build(tmp: Path) -> None:
        export.save_pretrained(tmp, safe_serialization=True)
        compressor.update_config(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        check_packed(tmp, result)

    return write_dir_atomically(out_dir, build)


def read_packed(model_dir: str | os.PathLike, bits: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{linear name: (integers int8 [out, in], scale)} unpacked from a pack-quantized checkpoint."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from safetensors import safe_open

    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if key.endswith((".weight_packed", ".weight_scale", ".weight_shape")):
                    tensors[key] = f.get_tensor(key)
    out = {}
    for key in tensors:
        if key.endswith(".weight_packed"):
            name = key.removesuffix(".weight_packed")
            shape = torch.Size(tensors[f"{name}.weight_shape"].tolist())
            out[name] = (unpack_from_int32(tensors[key], bits, shape), tensors[f"{name}.weight_scale"])
    return out


def check_packed(model_dir: str | os.PathLike, result: QuantResult) -> None:
    """Fail unless every quantized linear in `model_dir` unpacks to exactly `result`'s integers and scales."""
    stored = read_packed(model_dir, result.spec.bits)
    missing = sorted(set(result.weights) - set(stored))
    if missing:
        raise RuntimeError(f"export {model_dir}: no packed weights for {missing[:3]}")
    for name, (q, scale) in result.weights.items():
        sq, ss = stored[name]
        if not torch.equal(sq.to(torch.int8), q) or not torch.equal(ss.reshape(scale.shape), scale.to(ss.dtype)):
            raise RuntimeError(f"export {model_dir}: {name}'s packed integers or scales differ from the quantized "
                               "ones (compressed-tensors re-quantized them differently)")


def checkpoint_bytes(model_dir: str | os.PathLike) -> int:
    """Bytes of a checkpoint's weight files (*.safetensors, and *.bin of older checkpoints) on disk."""
    return sum(p.stat().st_size for pattern in ("*.safetensors", "*.bin") for p in Path(model_dir).glob(pattern))
