"""Minitron-style importance of a decoder's structures, from activations on calibration batches.

Forward hooks on a decoder of a family `sapling.prune.slicing` supports collect per-channel statistics:

- MLP neurons: the input of `down_proj`;
- attention heads: the input of `o_proj`, split by head, L2 norm over `head_dim`;
- hidden channels: the outputs of every norm on the residual stream's width (each layer's `HIDDEN_NORMS`
  it has: two for Llama, four for Gemma's sandwich, two post-norms for OLMo 2; and the final one), summed;
- depth: block influence, 1 - cos(layer input, layer output) averaged over tokens; optionally the LM-loss
  increase when a layer is dropped (`layer_drop_loss`);
- mixture-of-experts layers (Qwen3-MoE, Mixtral, OLMoE), from the router's and the experts' inputs: each
  expert's router probability mass and its routed output norm (routing weight x |expert output|), mixed half
  and half as shares of the layer's totals (an expert the top-k never picks still ranks by its probability
  mass); each expert's FFN neurons by their RMS activation over the tokens routed to it.

Statistics are kept as sums and counts only (never means), so summing the accumulators of several
data-parallel ranks (the `reduce` argument) gives exactly the scores of one rank that saw all the data.
`distributed_importance` does that over the ranks of torch.distributed. A ZeRO-3 partitioned model works
too (see `sapling.prune.distributed`): nothing here reads a weight or a parameter's shape, and every rank
runs as many forward passes as the busiest one, since each pass gathers parameters collectively.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sapling.data.calibration import calibration_batches
from sapling.dist import all_reduce_sum, rank_world
from sapling.errors import DataError, ModelSourceError
from sapling.io import write_atomically
from sapling.models import IGNORE_INDEX, decoder_layers
from sapling.models.families import is_moe, moe_width_field
from sapling.progress import progress as progress_bar
from sapling.prune.distributed import gathered_forward, is_zero3_partitioned, max_across_ranks

AGGREGATIONS = ("mean_l2", "mean", "variance")
# Which accumulators each aggregation keeps per structure kind (besides the shared token/sample counts).
_STATS = {"mean_l2": ("a2",), "mean": ("abs",), "variance": ("x", "x2")}
_KINDS = ("mlp", "heads", "hidden")
# A decoder layer's norms over the hidden width, whichever of them the family has.
HIDDEN_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                "post_feedforward_layernorm")


def hidden_norms(layer: nn.Module) -> list[nn.Module]:
    """The layer's norms over the hidden width (HIDDEN_NORMS it has), in that order."""
    return [m for m in (getattr(layer, name, None) for name in HIDDEN_NORMS) if isinstance(m, nn.Module)]

Reduce = Callable[[Tensor], Tensor | None]


@dataclass
class ImportanceScores:
    """Importance of every prunable structure of a decoder (higher = more important)."""

    mlp: Tensor  # [L, intermediate_size]
    heads: Tensor  # [L, num_attention_heads]
    kv_groups: Tensor  # [L, num_key_value_heads]
    hidden: Tensor  # [hidden_size]
    block_influence: Tensor  # [L]
    layer_loss: Tensor | None  # [L] or None
    num_tokens: int
    aggregation: str = "mean_l2"
    experts: Tensor | None = None  # MoE: [L, num_experts]
    expert_mlp: Tensor | None = None  # MoE: [L, num_experts, expert width]

    def state_dict(self) -> dict[str, Any]:
        """Plain dict of tensors, ints and strings (loadable with `torch.load(weights_only=True)`)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_state_dict(cls, d: dict[str, Any]) -> ImportanceScores:
        """Inverse of `state_dict`."""
        names = {f.name for f in fields(cls)}
        missing = {"mlp", "heads", "kv_groups", "hidden", "block_influence", "num_tokens"} - set(d)
        if missing:
            raise KeyError(f"importance scores lack {sorted(missing)}")
        kwargs = {k: v for k, v in d.items() if k in names}
        for optional in ("layer_loss", "experts", "expert_mlp"):
            kwargs.setdefault(optional, None)
        kwargs["num_tokens"] = int(kwargs["num_tokens"])
        return cls(**kwargs)

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically (temp file in the same folder, then rename)."""
        return write_atomically(path, lambda f: torch.save(self.state_dict(), f))

    @classmethod
    def load(cls, path: str | os.PathLike) -> ImportanceScores:
        """Read scores written by `save`."""
        return cls.from_state_dict(torch.load(Path(path), map_location="cpu", weights_only=True))


# ----------------------------------------------------------------------------------------------- model


def head_dim(config: Any) -> int:
    """`config.head_dim`, or hidden_size / num_attention_heads when it is not set."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _to_device(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}


def _token_weights(batch: dict[str, Tensor]) -> Tensor | None:
    """[B, T] float weights of the tokens that count (attention_mask), or None when all count."""
    mask = batch.get("attention_mask")
    return None if mask is None else mask.float()


@contextlib.contextmanager
def _eval_no_grad(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _num_passes(model: nn.Module, num_batches: int) -> int:
    """Forward passes to run: the local batch count, or under ZeRO-3 (where each pass is a collective)
    the largest count over all ranks."""
    return max_across_ranks(num_batches, _device(model)) if is_zero3_partitioned(model) else num_batches


def _padding_batch(model: nn.Module) -> dict[str, Tensor]:
    """A one-token batch for forward passes that only keep a rank in step with the others."""
    return {"input_ids": torch.zeros((1, 1), dtype=torch.long, device=_device(model))}


def _apply_reduce(t: Tensor, reduce: Reduce | None) -> Tensor:
    """`reduce(t)` on a copy; a reduce that works in place (like `dist.all_reduce`) may return None."""
    if reduce is None:
        return t
    t = t.clone()
    out = reduce(t)
    return t if out is None else out


# ----------------------------------------------------------------------------------------- accumulator


class ImportanceAccumulator:
    """Sums and counts of activation statistics over calibration batches; `finalize` turns them to scores.

    Accumulators (see `state`) are float64 tensors on the model's device, allocated up front in a fixed
    order, so every data-parallel rank holds the same keys and a SUM all-reduce of each is exact.
    """

    def __init__(self, model: nn.Module, aggregation: str = "mean_l2") -> None:
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"unknown aggregation {aggregation!r}; choose one of {', '.join(AGGREGATIONS)}")
        self.model = model
        self.aggregation = aggregation
        cfg = model.config
        layers = decoder_layers(model)
        self.num_layers = len(layers)
        self.num_heads = cfg.num_attention_heads
        self.num_kv = getattr(cfg, "num_key_value_heads", None) or self.num_heads
        self.head_dim = head_dim(cfg)
        self.moe = is_moe(cfg)
        widths = {0 if self.moe else layer.mlp.down_proj.in_features for layer in layers}
        if len(widths) != 1:
            raise ModelSourceError(f"MLP widths differ across layers ({sorted(widths)}); only uniform shapes are "
                                   "supported; fix: prune a model whose layers all have one shape")
        self.intermediate = widths.pop()
        self.hidden_size = cfg.hidden_size
        self.num_norms = sum(len(hidden_norms(layer)) for layer in layers) + 1  # + the final norm
        sizes = {"mlp": (self.num_layers, self.intermediate), "heads": (self.num_layers, self.num_heads),
                 "hidden": (self.num_norms, self.hidden_size)}
        dev = _device(model)
        zeros = dict(dtype=torch.float64, device=dev)
        self._acc: dict[str, Tensor] = {}
        for kind in _KINDS:
            for stat in _STATS[aggregation]:
                self._acc[f"{kind}.{stat}"] = torch.zeros(sizes[kind], **zeros)
        self._acc["block_influence.sum"] = torch.zeros(self.num_layers, **zeros)
        if self.moe:
            n_experts, width = cfg.num_experts, getattr(cfg, moe_width_field(cfg))
            self._acc["experts.prob"] = torch.zeros(self.num_layers, n_experts, **zeros)
            self._acc["experts.out"] = torch.zeros(self.num_layers, n_experts, **zeros)
            self._acc["expert_mlp.sq"] = torch.zeros(self.num_layers, n_experts, width, **zeros)
            self._acc["expert_mlp.n"] = torch.zeros(self.num_layers, n_experts, **zeros)
        self._acc["tokens"] = torch.zeros((), **zeros)
        self._acc["samples"] = torch.zeros((), **zeros)
        self._handles: list[Any] = []
        self._weights: Tensor | None = None  # token weights of the batch being processed
        self._layer_in: dict[int, Tensor] = {}

    # -- statistics

    def _add(self, kind: str, row: int, x: Tensor) -> None:
        """Add the statistics of activations x [B, T, C] to row `row` of the `kind` accumulators.

        Sums over tokens stay within a sample; samples are summed in float64, so how the samples are
        split into batches (and over ranks) changes the result only by float64 rounding.
        """
        x = x.float()
        w = self._weights
        if self.aggregation == "mean_l2":
            a = x.abs()
            if w is None:
                per_sample = a.mean(dim=1)
            else:
                per_sample = (a * w[..., None]).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)[:, None]
            self._acc[f"{kind}.a2"][row] += per_sample.double().pow(2).sum(dim=0)
        elif self.aggregation == "mean":
            a = x.abs() if w is None else x.abs() * w[..., None]
            self._acc[f"{kind}.abs"][row] += a.sum(dim=1).double().sum(dim=0)
        else:
            xw = x if w is None else x * w[..., None]
            self._acc[f"{kind}.x"][row] += xw.sum(dim=1).double().sum(dim=0)
            self._acc[f"{kind}.x2"][row] += (xw * x).sum(dim=1).double().sum(dim=0)

    def _hooks(self) -> list[Any]:
        handles = []
        layers = decoder_layers(self.model)

        def mlp_hook(i: int) -> Callable:
            def hook(_m: nn.Module, args: tuple) -> None:
                self._add("mlp", i, args[0])
            return hook

        def head_hook(i: int) -> Callable:
            def hook(_m: nn.Module, args: tuple) -> None:
                x = args[0]
                per_head = x.float().reshape(*x.shape[:-1], self.num_heads, self.head_dim).norm(dim=-1)
                self._add("heads", i, per_head)
            return hook

        def norm_hook(k: int) -> Callable:
            def hook(_m: nn.Module, _args: tuple, out: Tensor) -> None:
                self._add("hidden", k, out[0] if isinstance(out, tuple) else out)
            return hook

        def layer_in_hook(i: int) -> Callable:
            def hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
                self._layer_in[i] = args[0] if args else kwargs["hidden_states"]
            return hook

        def layer_out_hook(i: int) -> Callable:
            def hook(_m: nn.Module, _args: tuple, _kwargs: dict, out: Any) -> None:
                h_out = out[0] if isinstance(out, tuple) else out
                h_in = self._layer_in.pop(i)
                d = 1.0 - F.cosine_similarity(h_in.float(), h_out.float(), dim=-1, eps=1e-8)  # [B, T]
                if self._weights is not None:
                    d = d * self._weights
                self._acc["block_influence.sum"][i] += d.sum(dim=1).double().sum()
            return hook

        rows = itertools.count()
        for i, layer in enumerate(layers):
            if self.moe:
                handles.append(layer.mlp.gate.register_forward_hook(self._router_hook(i)))
                handles.append(layer.mlp.experts.register_forward_pre_hook(self._experts_hook(i), with_kwargs=True))
            else:
                handles.append(layer.mlp.down_proj.register_forward_pre_hook(mlp_hook(i)))
            handles.append(layer.self_attn.o_proj.register_forward_pre_hook(head_hook(i)))
            for norm in hidden_norms(layer):
                handles.append(norm.register_forward_hook(norm_hook(next(rows))))
            handles.append(layer.register_forward_pre_hook(layer_in_hook(i), with_kwargs=True))
            handles.append(layer.register_forward_hook(layer_out_hook(i), with_kwargs=True))
        handles.append(self.model.model.norm.register_forward_hook(norm_hook(next(rows))))
        return handles

    def _flat_weights(self, tokens: int, device: torch.device) -> Tensor:
        """[tokens] weights of the batch's flattened tokens (the MoE block flattens batch and sequence)."""
        if self._weights is None:
            return torch.ones(tokens, device=device)
        return self._weights.reshape(-1).to(device)

    def _router_hook(self, i: int) -> Callable:
        def hook(_m: nn.Module, _args: tuple, out: Any) -> None:
            logits = out[0] if isinstance(out, tuple) else out
            probs = torch.softmax(logits.float(), dim=-1)
            w = self._flat_weights(probs.shape[0], probs.device)
            self._acc["experts.prob"][i] += (probs * w[:, None]).sum(dim=0).double()
        return hook

    def _experts_hook(self, i: int) -> Callable:
        """Recompute each expert's FFN on the tokens routed to it (the fused experts expose no intermediate
        activations): neuron statistics and routed output norms. Runs before the experts' forward, so under
        ZeRO-3 their weights are gathered."""
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            names = ("hidden_states", "top_k_index", "top_k_weights")
            x, index, weights = (args[k] if k < len(args) else kwargs[n] for k, n in enumerate(names))
            w = self._flat_weights(x.shape[0], x.device)
            for e in torch.unique(index).tolist():
                rows, pos = torch.where(index == e)
                if e >= module.gate_up_proj.shape[0] or rows.numel() == 0:
                    continue
                gate, up = F.linear(x[rows], module.gate_up_proj[e]).chunk(2, dim=-1)
                h = module.act_fn(gate) * up
                y = F.linear(h, module.down_proj[e])
                wr = w[rows].float()
                self._acc["expert_mlp.sq"][i, e] += (h.float().pow(2) * wr[:, None]).sum(dim=0).double()
                self._acc["expert_mlp.n"][i, e] += wr.sum().double()
                routed = weights[rows, pos].float() * y.float().norm(dim=-1) * wr
                self._acc["experts.out"][i, e] += routed.sum().double()
        return hook

    def attach(self) -> None:
        """Register the forward hooks (also done by `update` when not attached)."""
        if not self._handles:
            self._handles = self._hooks()

    def detach(self) -> None:
        """Remove the forward hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._layer_in.clear()

    def __enter__(self) -> ImportanceAccumulator:
        self.attach()
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def update(self, batch: dict[str, Tensor]) -> None:
        """Run the decoder on one batch ({"input_ids": [B, T]}, optional "attention_mask") and accumulate."""
        batch = _to_device(batch, _device(self.model))
        ids = batch["input_ids"]
        owned = not self._handles
        if owned:
            self.attach()
        self._weights = _token_weights(batch)
        try:
            with _eval_no_grad(self.model):
                self.model.model(input_ids=ids, attention_mask=batch.get("attention_mask"),
                                 position_ids=batch.get("position_ids"), use_cache=False)
            self._acc["tokens"] += float(ids.numel()) if self._weights is None else self._weights.sum().double()
            self._acc["samples"] += float(ids.shape[0])
        finally:
            self._weights = None
            self._layer_in.clear()
            if owned:
                self.detach()

    # -- state

    def state(self) -> dict[str, Tensor]:
        """The accumulators (live tensors, in a fixed order): sums and counts only."""
        return self._acc

    def merge(self, other: ImportanceAccumulator | dict[str, Tensor]) -> ImportanceAccumulator:
        """Add another accumulator's sums (same model shape and aggregation) into this one."""
        state = other.state() if isinstance(other, ImportanceAccumulator) else other
        if state.keys() != self._acc.keys():
            raise ValueError("cannot merge accumulators of different aggregations")
        for k, v in state.items():
            self._acc[k] += v.to(self._acc[k].device, torch.float64)
        return self

    def finalize(self, reduce: Reduce | None = None) -> ImportanceScores:
        """Scores from the accumulators, after applying `reduce` (e.g. an all-reduce SUM) to each of them."""
        acc = {k: _apply_reduce(v, reduce) for k, v in self._acc.items()}
        tokens = float(acc["tokens"])
        if tokens <= 0:
            raise DataError("no calibration tokens were seen: cannot estimate importance; fix: pass data.files with "
                            "text (and prune.calibration.samples > 0)")
        scores: dict[str, Tensor] = {}
        for kind in _KINDS:
            if self.aggregation == "mean_l2":
                s = acc[f"{kind}.a2"].sqrt()
            elif self.aggregation == "mean":
                s = acc[f"{kind}.abs"] / tokens
            else:
                mean = acc[f"{kind}.x"] / tokens
                s = (acc[f"{kind}.x2"] / tokens - mean.pow(2)).clamp_min(0.0)
            scores[kind] = s
        heads = scores["heads"]
        experts = expert_mlp = None
        if self.moe:
            def share(x: Tensor) -> Tensor:
                return x / x.sum(dim=-1, keepdim=True).clamp_min(1e-30)

            experts = (0.5 * share(acc["experts.out"]) + 0.5 * share(acc["experts.prob"])).float().cpu()
            expert_mlp = (acc["expert_mlp.sq"] / acc["expert_mlp.n"][..., None].clamp_min(1.0)).sqrt().float().cpu()
        return ImportanceScores(
            mlp=scores["mlp"].float().cpu(),
            heads=heads.float().cpu(),
            kv_groups=heads.reshape(self.num_layers, self.num_kv, -1).sum(dim=-1).float().cpu(),
            hidden=scores["hidden"].sum(dim=0).float().cpu(),
            block_influence=(acc["block_influence.sum"] / tokens).float().cpu(),
            layer_loss=None,
            num_tokens=round(tokens),
            aggregation=self.aggregation,
            experts=experts,
            expert_mlp=expert_mlp,
        )


def estimate_importance(
    model: nn.Module,
    batches: Iterable[dict[str, Tensor]],
    *,
    aggregation: str = "mean_l2",
    layer_loss: bool = False,
    max_batches: int | None = None,
    reduce: Reduce | None = None,
    progress: bool = False,
    total: int | None = None,
) -> ImportanceScores:
    """Importance of MLP neurons, heads, KV groups, hidden channels and layers from calibration batches.

    `reduce` is applied to every accumulator before the scores are computed (pass an all-reduce SUM
    across data-parallel ranks); `layer_loss=True` also measures the loss increase of dropping each layer.
    With a reduce, every rank must call this, with its own batches (their number may differ, even be 0).
    `progress` shows a bar (rank 0) over the batches, `total` of them when `batches` has no length.
    """
    acc = ImportanceAccumulator(model, aggregation)
    batches = itertools.islice(batches, max_batches)
    zero3 = is_zero3_partitioned(model)
    if layer_loss or zero3:
        batches = list(batches)
    # Agreed before any forward pass: under ZeRO-3 each pass is a collective.
    padding = _num_passes(model, len(batches)) - len(batches) if zero3 else 0
    with gathered_forward(model):
        with acc:
            if total is None and hasattr(batches, "__len__"):
                total = len(batches)
            for batch in progress_bar(batches, total=total, desc="prune: calibration", unit="batch",
                                      enabled=progress):
                acc.update(batch)
        with _eval_no_grad(model):  # keep in step with ranks that have more batches; these add nothing
            for _ in range(padding):
                model.model(**_padding_batch(model), use_cache=False)
    scores = acc.finalize(reduce)
    if layer_loss:
        scores.layer_loss = layer_drop_loss(model, batches, block=1, reduce=reduce, progress=progress)
    return scores


def distributed_importance(
    model: nn.Module,
    blocks: Any,
    *,
    samples: int,
    batch_size: int,
    device: torch.device | str,
    seed: int = 0,
    aggregation: str = "mean_l2",
    layer_loss: bool = False,
    progress: bool = False,
) -> ImportanceScores:
    """`estimate_importance` on `samples` calibration blocks shared out over all ranks, accumulators summed.

    Every rank must call it (each draws its own share of the same seeded order, see `calibration_batches`)
    and every rank gets the same scores: those of one process calibrating on all the samples, up to float
    rounding. On one process it is exactly `estimate_importance(model, calibration_batches(...))`.
    `model` may be ZeRO-3 partitioned (pass a DeepSpeed engine's `.module`).
    """
    rank, world_size = rank_world()
    batches = calibration_batches(blocks, samples, batch_size, device, seed=seed, rank=rank,
                                  world_size=world_size)
    share = len(np.array_split(np.arange(min(samples, len(blocks))), world_size)[rank])  # this rank's blocks
    return estimate_importance(model, batches, aggregation=aggregation, layer_loss=layer_loss,
                               reduce=all_reduce_sum if world_size > 1 else None, progress=progress,
                               total=-(-share // batch_size))


# ------------------------------------------------------------------------------------------- depth


@contextlib.contextmanager
def skip_layers(model: nn.Module, drop: Iterable[int]) -> Iterator[list[int]]:
    """Temporarily run `model` without the decoder layers in `drop`; yields the kept layer indices."""
    base = model.model
    layers = base.layers
    drop = set(drop)
    kept = [i for i in range(len(layers)) if i not in drop]
    layer_types = getattr(model.config, "layer_types", None)
    base.layers = nn.ModuleList([layers[i] for i in kept])
    # Qwen2/Qwen3 pick each layer's mask by its position in config.layer_types: keep them aligned.
    if isinstance(layer_types, list) and len(layer_types) == len(layers):
        model.config.layer_types = [layer_types[i] for i in kept]
    try:
        yield kept
    finally:
        base.layers = layers
        if isinstance(layer_types, list):
            model.config.layer_types = layer_types


def _loss_sums(model: nn.Module, batches: list[dict[str, Tensor]], passes: int = 0) -> tuple[Tensor, Tensor]:
    """(sum of next-token CE, number of predicted tokens) over the batches, as float64 tensors.

    When `passes` exceeds the number of batches, the remaining forward passes run on a padding batch and
    count for nothing (ZeRO-3 ranks must run the same passes).
    """
    dev = _device(model)
    total = torch.zeros((), dtype=torch.float64, device=dev)
    count = torch.zeros((), dtype=torch.float64, device=dev)
    for batch in batches:
        batch = _to_device(batch, dev)
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        labels = batch.get("labels")
        if labels is None:
            labels = ids if mask is None else ids.masked_fill(mask == 0, IGNORE_INDEX)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=batch.get("position_ids"), use_cache=False).logits
        target = labels[:, 1:]
        ce = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), target.flatten(), ignore_index=IGNORE_INDEX,
                             reduction="none")
        total += ce.double().sum()
        count += (target != IGNORE_INDEX).sum().double()
    for _ in range(passes - len(batches)):
        model(**_padding_batch(model), use_cache=False)
    return total, count


def layer_drop_loss(
    model: nn.Module,
    batches: Iterable[dict[str, Tensor]],
    *,
    block: int = 1,
    reduce: Reduce | None = None,
    progress: bool = False,
) -> Tensor:
    """[L - block + 1] increase of the LM loss (nats/token) when layers [i, i + block) are dropped.

    With a reduce, every rank must call this, with its own batches (their number may differ, even be 0).
    `progress` shows a bar (rank 0) over the L - block + 2 loss evaluations.
    """
    batches = list(batches)
    n = len(decoder_layers(model))
    if not 1 <= block <= n:
        raise ValueError(f"block={block} must be between 1 and the number of layers ({n})")
    passes = _num_passes(model, len(batches))

    def loss() -> float:
        total, count = (_apply_reduce(t, reduce) for t in _loss_sums(model, batches, passes))
        if float(count) <= 0:
            raise ValueError("no tokens to compute the LM loss on")
        return float(total / count)

    with _eval_no_grad(model), gathered_forward(model), \
            progress_bar(total=n - block + 2, desc="prune: layer-drop loss", unit="eval", enabled=progress) as bar:
        full = loss()
        bar.update(1)
        out = []
        for i in range(n - block + 1):
            with skip_layers(model, range(i, i + block)):
                out.append(loss() - full)
            bar.update(1)
    return torch.tensor(out, dtype=torch.float32)
