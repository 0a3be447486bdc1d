"""Quantize a causal LM decoder layer by decoder layer (RTN or GPTQ, optionally distillation-guided).

GPTQ needs each linear's calibration inputs. They are produced the way the quantized model will see
them: the calibration batches' hidden states entering decoder layer 0 are captured once, then for each
layer in turn the Hessians of its linears are accumulated from those inputs, its linears are quantized,
and the *quantized* layer is run again to produce the next layer's inputs. Only the layer being
quantized has to be on the compute device: with `offload=True` the model stays in CPU memory and each
layer visits the device in turn, so a model larger than one device can be quantized.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from sapling.errors import ConfigError
from sapling.models import decoder_and_head, decoder_layers
from sapling.progress import progress as progress_bar
from sapling.quant.gptq import gptq
from sapling.quant.numerics import QuantSpec, dequantize, rtn_export

log = logging.getLogger("sapling")


@dataclass
class QuantResult:
    """What was quantized: per linear (full module name) its int8-stored integers and scales, on CPU."""

    spec: QuantSpec
    method: str
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # incompatible widths left 16-bit (skip_incompatible)
    ignored: list[str] = field(default_factory=list)  # linears matched by `ignore` (lm_head by default)
    wall_s: float = 0.0
    observer: str = "minmax"  # how the scales were chosen (recorded in the export's quantization_config)
    act_order: bool = False  # GPTQ in activation order with static groups (recorded as actorder: static)


def _ignored(name: str, patterns: Sequence[str]) -> bool:
    """`ignore` entries: a module name (or its last components, e.g. `lm_head`) or `re:<regex>`."""
    for p in patterns:
        if p.startswith("re:"):
            if re.match(p[3:], name):
                return True
        elif name == p or name.endswith("." + p):
            return True
    return False


def _in_features(module: nn.Linear) -> int:
    shape = getattr(module.weight, "ds_shape", module.weight.shape)  # ZeRO-3 partitions keep their full shape here
    return int(shape[1])


def plan_targets(model: nn.Module, spec: QuantSpec, ignore: Sequence[str] = ("lm_head",),
                 skip_incompatible: bool = False) -> tuple[list[str], list[str], list[str]]:
    """(linears to quantize, incompatible ones left 16-bit, ignored ones), checked before any work.

    A linear whose input width the group size does not divide cannot be stored group-wise: that is an
    error naming the layer and the fixes, unless `skip_incompatible`.
    """
    targets, skipped, ignored = [], [], []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if _ignored(name, ignore):
            ignored.append(name)
        elif spec.fits(_in_features(module)):
            targets.append(name)
        elif skip_incompatible:
            skipped.append(name)
        else:
            width = _in_features(module)
            divisors = [g for g in (128, 64, 32) if width % g == 0]
            raise ConfigError(
                "quant.group_size", spec.group_size,
                f"{name} has input width {width}, not a multiple of quant.group_size={spec.group_size}, so its "
                f"weights cannot be stored in groups of {spec.group_size}",
                (f"use quant.group_size={divisors[0]}, " if divisors else "")
                + "or set quant.skip_incompatible=true to leave such layers unquantized (16-bit)")
    if not targets:
        raise ConfigError("quant.ignore", list(ignore), "no linear layer to quantize (all ignored or skipped)",
                          "ignore fewer layers (quant.ignore holds regexes of module names), or check quant.group_size")
    return targets, skipped, ignored


class _Captured(Exception):
    pass


@torch.no_grad()
def _capture_layer0_inputs(model: nn.Module, layers: nn.ModuleList, batches: Sequence[torch.Tensor],
                           device: torch.device) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """The hidden states (and keyword arguments: rotary embeddings, masks) each batch brings to layer 0."""
    decoder, _ = decoder_and_head(model)
    hidden, kwargs = [], []

    def catch(_module: nn.Module, args: tuple, kw: dict) -> None:
        h = args[0] if args else kw.pop("hidden_states")
        hidden.append(h)
        kwargs.append({k: v for k, v in kw.items() if k != "hidden_states"})
        raise _Captured

    handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for ids in batches:
            with contextlib.suppress(_Captured):
                decoder(input_ids=ids.to(device), use_cache=False)
    finally:
        handle.remove()
    return hidden, kwargs


def _run_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


class _HessianAccumulator:
    """Sum of x x^T over a linear's calibration inputs (one per saliency group when guided)."""

    def __init__(self, in_features: int, groups: int, device: torch.device) -> None:
        self.h = torch.zeros(groups, in_features, in_features, dtype=torch.float32, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor, saliency: torch.Tensor | None) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        if saliency is None:
            self.h[0].addmm_(x.T, x)
        else:
            s = saliency.to(x.device, torch.float32)
            for g in range(self.h.shape[0]):
                self.h[g].addmm_((x * s[:, g:g + 1]).T, x)
        self.tokens += x.shape[0]

    def hessian(self) -> torch.Tensor:
        return self.h / max(self.tokens, 1)


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    spec: QuantSpec,
    *,
    method: str = "gptq",
    batches: Sequence[torch.Tensor] = (),
    device: torch.device | str = "cpu",
    ignore: Sequence[str] = ("lm_head",),
    skip_incompatible: bool = False,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = True,
    observer: str = "minmax",
    saliency: dict[str, list[torch.Tensor]] | None = None,
    offload: bool = False,
    progress: bool = True,
    on_layer: Callable[[int, float], None] | None = None,
) -> QuantResult:
    """Quantize `model`'s linears in place: each weight becomes its dequantized value (the fake-quantized
    model), and the returned QuantResult holds the integers and scales for the export.

    `method`: `rtn` (no data) or `gptq` (`batches` of token ids [B, L] for calibration). `saliency`:
    per linear name, one `[B*L, G]` tensor per batch (guided.py) weighting each token's contribution to
    the Hessian of each of G groups of output rows. `offload`: keep the model on the CPU and bring one
    decoder layer at a time to `device`. `observer`: GPTQ's group scales, `minmax` or `mse` (RTN keeps minmax).
    """
    t0 = time.perf_counter()
    device = torch.device(device)
    targets, skipped, ignored = plan_targets(model, spec, ignore, skip_incompatible)
    result = QuantResult(spec=spec, method=method, skipped=skipped, ignored=ignored,
                         observer=observer if method == "gptq" else "minmax",
                         act_order=method == "gptq" and act_order)
    modules = dict(model.named_modules())
    def round_to_nearest(name: str) -> None:
        w = modules[name].weight
        q, scale = rtn_export(w.data, spec)
        w.data.copy_(dequantize(q, scale, w.dtype))
        result.weights[name] = (q.cpu(), scale.cpu())

    if method == "rtn":
        for name in progress_bar(targets, desc="quantize (rtn)", unit="linear", enabled=progress, leave=False):
            round_to_nearest(name)
        result.wall_s = time.perf_counter() - t0
        return result
    if method != "gptq":
        raise ValueError(f"quant.method={method!r}: expected rtn or gptq")
    if not batches:
        raise ConfigError("data.files", None, "GPTQ needs calibration batches",
                          "pass data.files=[...] with quant.calibration.samples > 0 (or use quant.method=rtn)")

    layers = decoder_layers(model, fix="layer-wise GPTQ needs one: use quant.method=rtn for this model")
    decoder, _ = decoder_and_head(model)
    home = next(model.parameters()).device
    if offload:  # everything but the layers (embeddings, rotary tables) goes to the device for the capture
        for child in decoder.children():
            if child is not layers:
                child.to(device)
    hidden, kwargs = _capture_layer0_inputs(model, layers, batches, device if offload else home)
    prefix = {id(layer): name for name, layer in model.named_modules() if any(layer is x for x in layers)}
    bar = progress_bar(total=len(layers), desc="quantize (gptq)", unit="layer", enabled=progress, leave=False)
    for index, layer in enumerate(layers):
        tl = time.perf_counter()
        if offload:
            layer.to(device)
        base = prefix[id(layer)]
        linears = {n: m for n, m in layer.named_modules() if f"{base}.{n}" in targets and isinstance(m, nn.Linear)}
        acc: dict[str, _HessianAccumulator] = {}
        handles = []
        current = {"batch": 0}
        for n, m in linears.items():
            full = f"{base}.{n}"
            groups = saliency[full][0].shape[1] if saliency is not None else 1
            acc[full] = _HessianAccumulator(m.in_features, groups, m.weight.device)

            def hook(_m: nn.Module, inp: tuple, _out: Any, full: str = full, acc: dict = acc,
                     current: dict = current) -> None:
                s = saliency[full][current["batch"]] if saliency is not None else None
                acc[full].add(inp[0], s)

            handles.append(m.register_forward_hook(hook))
        try:
            for b, (h, kw) in enumerate(zip(hidden, kwargs)):
                current["batch"] = b
                _run_layer(layer, h, kw)
        finally:
            for handle in handles:
                handle.remove()
        for n, m in linears.items():
            full = f"{base}.{n}"
            q, scale = gptq(m.weight.data, acc[full].hessian(), spec, block_size=block_size, damp=damp,
                            act_order=act_order, observer=observer)
            m.weight.data.copy_(dequantize(q.to(m.weight.device), scale.to(m.weight.device), m.weight.dtype))
            result.weights[full] = (q.cpu(), scale.cpu())
            del acc[full]
        if index + 1 < len(layers):  # the next layer's inputs come from this quantized layer
            hidden = [_run_layer(layer, h, kw) for h, kw in zip(hidden, kwargs)]
        if offload:
            layer.to(home)
        bar.update(1)
        if on_layer is not None:
            on_layer(index, time.perf_counter() - tl)
    bar.close()
    if offload:
        for child in decoder.children():
            if child is not layers:
                child.to(home)
    # Linears outside the decoder layers that are still targets (rare: e.g. an untied projection) get RTN.
    for name in targets:
        if name not in result.weights:
            round_to_nearest(name)
    result.wall_s = time.perf_counter() - t0
    return result


def saliency_groups(out_features: int, wanted: int) -> int:
    """The number of saliency groups for a linear: `wanted` if it divides the rows, else the gcd."""
    return math.gcd(out_features, max(1, wanted))
