"""Feature distillation: per-token losses between chosen student and teacher decoder-layer outputs.

A layer's *feature* is its output hidden state (the residual stream, before the final norm), one
`[batch, seq, hidden]` tensor per decoder layer. Features are captured with forward hooks on the decoder
layers (:func:`capture_layer_outputs`), so the models' forward is unchanged and a DeepSpeed ZeRO-3 teacher
needs no extra gather: the hooks only see activations, which ZeRO-3 never partitions.

:class:`FeatureDistiller` holds the layer map and, when the widths differ, one learned projection
`W [teacher_hidden, student_hidden]` shared by all layer pairs (TinyBERT-style; one per pair would cost
`pairs * Hs * Ht` parameters). `W` trains with the student but is not part of the student's HF checkpoint:
put the distiller beside the student in a :class:`StudentWithFeatures` and hand that to the student engine.
`W` (`FeatureDistiller.proj`) is a direct parameter of the distiller (no submodule), used only inside its
`forward`, so ZeRO-3 gathers it for the call and reduce-scatters its gradient, as for the KD head.

The loss is `weight * mean over pairs of (sum over valid tokens of l(W s, t)) / num_valid_tokens`, with
`l = 1 - cos(W s, t)` (cosine) or `mean over teacher channels of (W s - t)^2` (mse), both sides first
layer-normalised without affine parameters when `normalize` is set. Valid tokens are the positions the
logit loss counts (those predicting a label other than -100), so the same global `num_valid_tokens`
normalises both losses under data parallelism.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sapling.errors import ConfigError
from sapling.models import IGNORE_INDEX, decoder_layers

FEATURE_LOSSES = ("cosine", "mse")  # `distill.features.loss` (sapling.config validates against this)
_KEY = "distill.features.layers"


def default_layer_map(n_student: int, n_teacher: int) -> list[tuple[int, int]]:
    """Every student layer paired with the teacher layer at the nearest relative depth.

    Layer `i` of `n` sits at depth `(i + 1) / n`, so the last student layer maps to the last teacher layer
    and the map is strictly increasing when the student is not deeper than the teacher (ties round up).
    """
    if n_student < 1 or n_teacher < 1:
        raise ValueError(f"layer counts must be >= 1, got student={n_student}, teacher={n_teacher}")
    return [(i, max(1, ((i + 1) * n_teacher * 2 + n_student) // (2 * n_student)) - 1) for i in range(n_student)]


def resolve_layer_map(layers: Sequence[Sequence[int]] | None, n_student: int,
                      n_teacher: int) -> list[tuple[int, int]]:
    """The (student_layer, teacher_layer) pairs of `distill.features.layers` for these depths.

    None gives :func:`default_layer_map`; negative indices count from the end. Raises a one-line
    ConfigError naming the pair on an out-of-range index or a repeated pair (call once both models exist).
    """
    if layers is None:
        return default_layer_map(n_student, n_teacher)
    pairs: list[tuple[int, int]] = []
    if len(layers) == 0:
        raise ConfigError(_KEY, [], "empty list of layer pairs", "give [[student_layer, teacher_layer], ...] or null")
    for k, pair in enumerate(layers):
        pair = [int(x) for x in pair]
        if len(pair) != 2:
            raise ConfigError(f"{_KEY}[{k}]", pair, "not a [student_layer, teacher_layer] pair",
                              "write each entry as two layer indices, e.g. [[0,1],[1,3]]")
        resolved = []
        for idx, n, who in ((pair[0], n_student, "student"), (pair[1], n_teacher, "teacher")):
            if not -n <= idx < n:
                raise ConfigError(f"{_KEY}[{k}]", pair, f"{who} layer {idx} out of range for a {n}-layer {who}",
                                  f"use {who} layers in [{-n}, {n - 1}] (0-based decoder layers)")
            resolved.append(idx % n)
        if tuple(resolved) in pairs:
            raise ConfigError(f"{_KEY}[{k}]", pair, f"repeats the pair {tuple(resolved)}", "list each pair once")
        pairs.append((resolved[0], resolved[1]))
    return pairs


@contextlib.contextmanager
def capture_layer_outputs(model: nn.Module, layers: Sequence[int]) -> Iterator[list[Tensor]]:
    """Within the block, record the outputs of decoder `layers` of `model` (one forward pass).

    Yields a list that holds, after the forward, one `[batch, seq, hidden]` tensor per entry of `layers`
    (in that order, repeats allowed); tensors keep their autograd graph. Nothing is gathered or copied, so
    a ZeRO-3 partitioned model works as it is. Hooks are removed on exit; HF gradient checkpointing wraps
    the layer's `forward`, inside these hooks, so its recomputation in backward records nothing. A layer
    that did not run raises RuntimeError on exit.
    """
    modules = decoder_layers(model, fix="set distill.features.weight=0 for this model")
    out: list[Any] = [None] * len(layers)
    slots: dict[int, list[int]] = {}
    for k, idx in enumerate(layers):
        if not 0 <= idx < len(modules):
            raise IndexError(f"layer {idx} out of range for a model with {len(modules)} decoder layers")
        slots.setdefault(int(idx), []).append(k)

    def hook_for(idx: int):
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            hidden = output[0] if isinstance(output, (tuple, list)) else output
            for k in slots[idx]:
                out[k] = hidden
        return hook

    handles = [modules[idx].register_forward_hook(hook_for(idx)) for idx in slots]
    try:
        yield out
    finally:
        for h in handles:
            h.remove()
    missing = sorted({int(layers[k]) for k, t in enumerate(out) if t is None})
    if missing:
        raise RuntimeError(f"decoder layers {missing} did not run inside capture_layer_outputs")


def feature_positions(labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """`[batch, seq]` bool: positions whose next-token label is not ignored (the logit loss's tokens)."""
    valid = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    valid[:, :-1] = labels[:, 1:] != ignore_index
    return valid


class FeatureDistiller(nn.Module):
    """Feature-distillation loss over a layer map, with a learned projection where the widths differ.

    `hidden_index` (optional, length `student_hidden`) is the teacher channel each student channel was
    sliced from (`KeepPlan.hidden` of a width-pruned student); `W` then starts as that truncated identity
    (a student channel lands on its own teacher channel). Otherwise `W` starts as a random (seeded)
    semi-orthogonal matrix. Both keep token norms (`|W s| = |s|` when the student is not wider). `W` is made
    on `device` in `dtype` (give the student's: it trains beside the student), computed in float32 on the CPU
    first so that every rank and device starts from the same matrix.
    """

    def __init__(self, student_hidden: int, teacher_hidden: int, layer_map: Sequence[tuple[int, int]], *,
                 loss: str = "cosine", normalize: bool = False, weight: float = 1.0,
                 hidden_index: Tensor | Sequence[int] | None = None, seed: int = 0,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if loss not in FEATURE_LOSSES:
            raise ValueError(f"loss={loss!r}: use one of {', '.join(FEATURE_LOSSES)}")
        if not layer_map:
            raise ValueError("layer_map is empty")
        self.student_hidden, self.teacher_hidden = int(student_hidden), int(teacher_hidden)
        self.layer_map = [(int(s), int(t)) for s, t in layer_map]
        self.loss_name, self.normalize, self.loss_weight = loss, bool(normalize), float(weight)
        index = None if hidden_index is None else torch.as_tensor(hidden_index, dtype=torch.long).flatten()
        if index is not None and (len(index) != self.student_hidden or len(set(index.tolist())) != len(index)
                                  or index.min() < 0 or index.max() >= self.teacher_hidden):
            raise ValueError(f"hidden_index must be {self.student_hidden} distinct teacher channels in "
                             f"[0, {self.teacher_hidden})")
        identity = index is None or torch.equal(index, torch.arange(self.teacher_hidden))
        if self.student_hidden == self.teacher_hidden and identity:
            self.proj: nn.Parameter | None = None  # same space: no projection
        else:
            self.proj = nn.Parameter(self._initial_projection(index, seed).to(device=device, dtype=dtype))

    @classmethod
    def from_config(cls, cfg: Any, student_config: Any, teacher_config: Any, *,
                    hidden_index: Tensor | Sequence[int] | None = None, seed: int = 0,
                    device: torch.device | str | None = None,
                    dtype: torch.dtype | None = None) -> FeatureDistiller | None:
        """From `distill.features` and the two HF configs (no weights read); None when `cfg.weight == 0`."""
        if cfg.weight == 0:
            return None
        layer_map = resolve_layer_map(cfg.layers, student_config.num_hidden_layers, teacher_config.num_hidden_layers)
        return cls(student_config.hidden_size, teacher_config.hidden_size, layer_map, loss=cfg.loss,
                   normalize=cfg.normalize, weight=cfg.weight, hidden_index=hidden_index, seed=seed, device=device,
                   dtype=dtype)

    def _initial_projection(self, index: Tensor | None, seed: int) -> Tensor:
        w = torch.zeros(self.teacher_hidden, self.student_hidden)
        if index is not None:
            w[index, torch.arange(self.student_hidden)] = 1.0
        else:  # seeded, so every data-parallel rank starts from the same matrix
            nn.init.orthogonal_(w, generator=torch.Generator().manual_seed(seed))
        return w

    @property
    def student_layers(self) -> list[int]:
        return [s for s, _ in self.layer_map]

    @property
    def teacher_layers(self) -> list[int]:
        return [t for _, t in self.layer_map]

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The projection (empty when the widths match): train it with the student, never export it."""
        return [] if self.proj is None else [self.proj]

    def extra_repr(self) -> str:
        return (f"student_hidden={self.student_hidden}, teacher_hidden={self.teacher_hidden}, loss={self.loss_name}, "
                f"normalize={self.normalize}, weight={self.loss_weight}, layer_map={self.layer_map}")

    def _token_loss(self, s: Tensor, t: Tensor) -> Tensor:
        """Per-token loss `[...]` (at least float32) between projected student `s` and teacher `t` features."""
        dtype = torch.promote_types(torch.promote_types(s.dtype, t.dtype), torch.float32)
        s, t = s.to(dtype), t.to(dtype)
        if self.normalize:
            s = F.layer_norm(s, (s.shape[-1],), eps=1e-6)
            t = F.layer_norm(t, (t.shape[-1],), eps=1e-6)
        if self.loss_name == "cosine":
            return 1.0 - F.cosine_similarity(s, t, dim=-1, eps=1e-8)
        return (s - t).pow(2).mean(dim=-1)

    def forward(self, student_features: Sequence[Tensor], teacher_features: Sequence[Tensor], valid: Tensor, *,
                num_valid_tokens: int | Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Weighted feature loss and its parts (`feat`: unweighted, detached).

        `student_features[k]` / `teacher_features[k]` are the outputs of layer pair `k` (`[..., Hs]` /
        `[..., Ht]`, as from :func:`capture_layer_outputs`); `valid` is a bool mask of their leading shape
        (:func:`feature_positions`). The loss sums over valid tokens and divides by `num_valid_tokens` (the
        global count under data parallelism; default: this batch's). Teacher features are detached.
        """
        n = len(self.layer_map)
        if len(student_features) != n or len(teacher_features) != n:
            raise ValueError(f"expected {n} student and teacher feature tensors (one per layer pair), got "
                             f"{len(student_features)} and {len(teacher_features)}")
        mask = valid.to(torch.float32)
        denom = mask.sum() if num_valid_tokens is None else torch.as_tensor(num_valid_tokens, dtype=torch.float32)
        sums = []
        for s, t in zip(student_features, teacher_features):
            if s.shape[:-1] != valid.shape or t.shape[:-1] != valid.shape:
                raise ValueError(f"feature shapes {tuple(s.shape)} / {tuple(t.shape)} do not match valid "
                                 f"{tuple(valid.shape)}")
            t = t.detach()
            if t.is_inference():  # captured under torch.inference_mode: make it usable by autograd
                t = t.clone()
            if self.proj is not None:
                s = F.linear(s.to(self.proj.dtype), self.proj)
            sums.append((self._token_loss(s, t) * mask).sum())
        feat = torch.stack(sums).sum() / (n * denom.to(mask.device).clamp_min(1.0))
        return self.loss_weight * feat, {"feat": feat.detach()}


class StudentWithFeatures(nn.Module):
    """What the student engine trains: the HF student (`model`, the only part exported) + the distiller.

    `forward` is the student's; the training checkpoint (DeepSpeed's module state) holds both, under
    `model.` and `features.`; export `wrapper.model` (e.g. `save_pretrained`), never the wrapper.
    """

    def __init__(self, model: nn.Module, features: FeatureDistiller | None) -> None:
        super().__init__()
        self.model = model
        self.features = features

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)


def student_weights(state_dict: dict[str, Tensor] | None) -> dict[str, Tensor] | None:
    """The HF student's weights from a training state dict, which holds a `StudentWithFeatures` when
    feature distillation is on (keys `model.*` and `features.*`); returned unchanged otherwise (also None,
    what ranks other than 0 get from a consolidating gather)."""
    if state_dict is None or not any(k.startswith("features.") for k in state_dict):
        return state_dict
    return {k[len("model."):]: v for k, v in state_dict.items() if k.startswith("model.")}
