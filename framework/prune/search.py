"""A parameter budget (`prune.target.params=N`) to a target shape: enumerate, prune, rank by LM loss.

Parameter counts are analytic (instant for any size), so candidates are found without building a model.
Each candidate keeps one width dimension free to land within the tolerance of the budget: the MLP width
(width-only and mixed shapes) or the number of layers (depth-only). Candidates are then cut out of the
teacher with its importance scores and ranked by LM loss on held-out batches (optionally after a short
distillation of the best few), and the best one is the target.

Mixture-of-experts teachers: candidates also keep all, 3/4, 1/2 or 1/4 of the experts (never fewer than a
token is routed to), the free width being the experts' FFN width; the budget is `prune.target.params` (all
parameters) or `prune.target.active_params` (those a token uses: the router and its top-k experts, besides
attention, norms and embeddings).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sapling.errors import ConfigError, ModelSourceError
from sapling.models import count_parameters
from sapling.models.families import is_moe, moe_width_field
from sapling.models.shapes import shape_problem
from sapling.progress import progress as progress_bar
from sapling.prune.importance import ImportanceScores, Reduce, _apply_reduce, _loss_sums
from sapling.prune.select import plan_from_scores, target_config, target_fields
from sapling.prune.slicing import GEMMA_TYPES, SUPPORTED_MODEL_TYPES, slice_model

# Candidate groups, in the order slots are dealt (see `candidate_shapes`): width-only, mixed and depth-only
# shapes that keep every attention head, then shapes that also cut attention (width-only or mixed).
GROUPS = ("width", "mixed", "depth", "attention")
_KEY = "prune.target.params"
BUDGETS = ("params", "active_params")  # what a budget counts: all parameters, or those active per token
_MIN_STEPS = 4  # default_multiple: at least this many multiples must fit in hidden and intermediate sizes
_MIN_AUTO_MULTIPLE = 8  # the automatic multiple is never made finer than this


# ------------------------------------------------------------------------------------ parameter counts


@dataclass(frozen=True)
class _Arch:
    """What a parameter count depends on besides the shape; pruning never changes it."""

    vocab: int
    head_dim: int
    tied: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: str | None  # None, "head" (one head_dim vector each: Qwen3, Gemma 3), "projection" (OLMo 2)
    layer_norms: int  # norms over the hidden width per layer (Gemma's sandwich: 4)
    width: str = "intermediate_size"  # the MLP width field (MoE: each expert's)
    moe: bool = False
    top_k: int = 0  # MoE: experts per token

    @classmethod
    def of(cls, config: Any) -> _Arch:
        kind = config.model_type
        if kind not in SUPPORTED_MODEL_TYPES:
            raise ModelSourceError(f"prune.target.params: parameter counts support model types "
                                   f"{', '.join(SUPPORTED_MODEL_TYPES)}; got {kind!r}; fix: prune a model of those types")
        attn_bias = bool(getattr(config, "attention_bias", False)) and kind not in ("mistral", "qwen2")
        return cls(
            vocab=config.vocab_size,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
            tied=bool(getattr(config, "tie_word_embeddings", False)),
            qkv_bias=kind == "qwen2" or attn_bias,  # Qwen2 always has q/k/v biases (and no o_proj bias)
            o_bias=attn_bias,
            mlp_bias=kind in ("llama", "granite") and bool(getattr(config, "mlp_bias", False)),
            qk_norm="head" if kind in ("qwen3", "gemma3_text", "qwen3_moe") else "projection" if kind in ("olmo2", "olmoe") or (
                kind == "cohere" and getattr(config, "use_qk_norm", False)) else None,
            layer_norms=4 if kind in GEMMA_TYPES else 1 if kind in ("cohere", "cohere2") else 2,
            width=moe_width_field(config) if is_moe(config) else "intermediate_size",
            moe=is_moe(config),
            top_k=int(getattr(config, "num_experts_per_tok", 0) or 0),
        )

    def params(self, shape: dict[str, int]) -> int:
        h, i, d = shape["hidden_size"], shape["intermediate_size"], self.head_dim
        q, kv = shape["num_attention_heads"], shape["num_key_value_heads"]
        attn = h * d * (q + 2 * kv) + q * d * h
        attn += self.qkv_bias * d * (q + 2 * kv) + self.o_bias * h
        attn += {"head": 2 * d, "projection": (q + kv) * d}.get(self.qk_norm, 0)
        if self.moe:  # the router ([E, H]) and E experts of width I
            i = shape[self.width]
            mlp = shape["num_experts"] * (3 * h * i + h)
        else:
            mlp = 3 * h * i + self.mlp_bias * (2 * i + h)
        layer = attn + mlp + self.layer_norms * h
        embeddings = self.vocab * h * (1 if self.tied else 2)
        return embeddings + h + shape["num_hidden_layers"] * layer  # + final norm

    def active(self, shape: dict[str, int]) -> int:
        """Parameters a token uses: all but the experts it is not routed to (dense models: all)."""
        if not self.moe:
            return self.params(shape)
        idle = shape["num_experts"] - min(self.top_k, shape["num_experts"])
        return self.params(shape) - shape["num_hidden_layers"] * idle * 3 * shape["hidden_size"] * shape[self.width]

    def count(self, shape: dict[str, int], budget: str = "params") -> int:
        return self.active(shape) if budget == "active_params" else self.params(shape)


def _shape_of(config: Any) -> dict[str, int]:
    """The config's target fields (num_key_value_heads defaults to num_attention_heads)."""
    shape = {k: getattr(config, k) for k in target_fields(config)}
    shape["num_key_value_heads"] = shape["num_key_value_heads"] or shape["num_attention_heads"]
    return {k: int(v) for k, v in shape.items()}


def count_params(config: Any, shape: dict[str, int] | None = None) -> int:
    """Exact parameter count of an HF config of a family `slicing` supports, without building the model.

    With `shape` (the TARGET_FIELDS), the count of that config pruned to `shape`: head_dim, vocabulary,
    biases and embedding tying stay the teacher's, as `slicing.slice_model` keeps them.
    Tied embeddings are counted once.
    """
    return _Arch.of(config).params(_shape_of(config) if shape is None else shape)


def count_active_params(config: Any, shape: dict[str, int] | None = None) -> int:
    """`count_params` of what one token uses: an MoE model's router and top-k experts instead of all its
    experts (`num_experts_per_tok`, capped at the experts kept, as the slicer caps it); dense: all."""
    return _Arch.of(config).active(_shape_of(config) if shape is None else shape)


def default_multiple(teacher_cfg: Any) -> int:
    """Width granularity: the largest power of two <= 128 dividing hidden and intermediate sizes that still
    leaves at least 4 steps in each (so there are several widths to choose from), else 1.

    128 keeps quantized / tensor-core kernels on their fast paths for real models (hidden 4096 -> 128);
    a demo-sized teacher (hidden 256, intermediate 768) gets 64.
    """
    h = teacher_cfg.hidden_size
    i = getattr(teacher_cfg, moe_width_field(teacher_cfg) if is_moe(teacher_cfg) else "intermediate_size")
    m = 128
    while m > 1:
        if h % m == 0 and i % m == 0 and h // m >= _MIN_STEPS and i // m >= _MIN_STEPS:
            return m
        m //= 2
    return 1


# ---------------------------------------------------------------------------------------- candidates


def _family(teacher: dict[str, int], shape: dict[str, int]) -> str:
    """width (all layers kept), depth (only layers removed) or mixed."""
    shallower = shape["num_hidden_layers"] < teacher["num_hidden_layers"]
    narrower = any(shape[k] < teacher[k] for k in teacher if k != "num_hidden_layers")
    return "mixed" if shallower and narrower else "depth" if shallower else "width"


def _group(teacher: dict[str, int], shape: dict[str, int]) -> str:
    cuts_heads = shape["num_attention_heads"] < teacher["num_attention_heads"]
    return "attention" if cuts_heads else _family(teacher, shape)


def _attention_options(heads: int, kv: int) -> list[tuple[int, int]]:
    """(query heads, KV heads): the teacher's, and half the KV groups (all query heads of each kept one)."""
    options = [(heads, kv)]
    if kv % 2 == 0:
        options.append((heads // 2, kv // 2))
    return options


def _widths(full: int, multiple: int) -> list[int]:
    """Allowed sizes of a width dimension, ascending: multiples of `multiple` and the teacher's own."""
    return sorted({*range(multiple, full + 1, multiple), full})


def _nearest(value: float, full: int, step: int, low: int) -> list[int]:
    """The allowed sizes (multiples of `step` in [low, full], or `full`) next to a real-valued `value`."""
    below = math.floor(value / step) * step
    return sorted({min(max(v, low), full) for v in (below, below + step)} | {full})


class _Pool:
    """Shapes meeting the constraints whose free dimension lands nearest the budget, by group.

    Counts are linear in the number of layers and in the MLP width and increase with the hidden size,
    so for each (layers, attention) only a band of hidden sizes can reach the budget: it is found by
    bisection, which keeps the enumeration fast for any model size and multiple. `probe` stops at the
    first shape within tolerance. Only shapes whose HF config the pruner can build are kept (`shape_problem`:
    e.g. LlamaConfig wants hidden_size divisible by num_attention_heads even with an explicit head_dim);
    `buildable` memoises that per attention width and may be shared by the pools of one teacher.
    """

    def __init__(self, teacher_cfg: Any, budget: int, multiple: int, tolerance: float, probe: bool = False,
                 buildable: dict[tuple[int, ...], bool] | None = None, kind: str = "params") -> None:
        self.teacher_cfg = teacher_cfg
        self.arch = _Arch.of(teacher_cfg)
        self.kind = kind
        self.teacher = _shape_of(teacher_cfg)
        self.budget, self.multiple, self.slack = budget, multiple, tolerance * budget
        self.found: dict[str, list[dict[str, int]]] = {g: [] for g in GROUPS}
        self.below: int | None = None  # nearest counts seen on either side of the budget (for errors)
        self.above: int | None = None
        self._seen: set[tuple[int, ...]] = set()
        self._buildable = {} if buildable is None else buildable
        self._probe = probe
        self._enumerate()

    def __len__(self) -> int:
        return sum(len(shapes) for shapes in self.found.values())

    def _can_build(self, shape: dict[str, int]) -> bool:
        """The pruned config of `shape` passes `shape_problem`. What the config classes refuse depends on the
        attention widths (hidden size, query and KV heads), not on the depth or the MLP width (always within
        the teacher's here), so each width is checked once, on a one-layer cut (target_config is per layer)."""
        key = (shape["hidden_size"], shape["num_attention_heads"], shape["num_key_value_heads"])
        if key not in self._buildable:
            probe = {**shape, "num_hidden_layers": 1, self.arch.width: self.teacher[self.arch.width]}
            try:
                self._buildable[key] = shape_problem(target_config(self.teacher_cfg, probe), self.teacher_cfg) is None
            except (ConfigError, ValueError, TypeError):
                self._buildable[key] = False
        return self._buildable[key]

    def _solve(self, shape: dict[str, int], field: str, step: int, low: int) -> None:
        """Add `shape` with `field` set to the allowed size nearest the budget, if within tolerance.

        Counts are linear in `field`, so the size is solved for, then rounded both ways.
        """
        base = self.arch.count({**shape, field: 0}, self.kind)
        slope = self.arch.count({**shape, field: 1}, self.kind) - base
        best: tuple[int, dict[str, int]] | None = None
        for v in _nearest((self.budget - base) / slope, self.teacher[field], step, low):
            candidate, n = {**shape, field: v}, base + slope * v
            if candidate == self.teacher or not self._can_build(candidate):
                continue
            if n <= self.budget:
                self.below = n if self.below is None else max(self.below, n)
            if n >= self.budget:
                self.above = n if self.above is None else min(self.above, n)
            if abs(n - self.budget) <= self.slack and (best is None or abs(n - self.budget) < best[0]):
                best = (abs(n - self.budget), candidate)
        if best is not None:
            key = tuple(best[1][k] for k in self.teacher)
            if key not in self._seen:
                self._seen.add(key)
                self.found[_group(self.teacher, best[1])].append(best[1])

    def _expert_options(self) -> list[int | None]:
        """Experts per layer to try (MoE): all, 3/4, 1/2, 1/4, never below num_experts_per_tok."""
        if not self.arch.moe:
            return [None]
        e = self.teacher["num_experts"]
        return sorted({max(min(self.arch.top_k, e), round(e * f)) for f in (1, 0.75, 0.5, 0.25)}, reverse=True)

    def _enumerate(self) -> None:
        t, m, width = self.teacher, self.multiple, self.arch.width
        min_mlp = min(m, t[width])
        lower, upper = self.budget - self.slack, self.budget + self.slack
        self._solve(dict(t), "num_hidden_layers", 1, 1)  # depth-only
        widths = _widths(t["hidden_size"], m)
        for layers in range(t["num_hidden_layers"], 0, -1):
            for experts in self._expert_options():
                for heads, kv in _attention_options(t["num_attention_heads"], t["num_key_value_heads"]):
                    if self._probe and len(self):
                        return
                    shape = {**t, "num_hidden_layers": layers, "hidden_size": 0, width: 0,
                             "num_attention_heads": heads, "num_key_value_heads": kv}
                    if experts is not None:
                        shape["num_experts"] = experts

                    def count(hidden: int, mlp: int, shape: dict[str, int] = shape) -> int:
                        return self.arch.count({**shape, "hidden_size": hidden, width: mlp}, self.kind)

                    # Hidden sizes whose count range [narrowest MLP, full MLP] meets [lower, upper], plus one
                    # neighbour on each side so the nearest counts (reported when nothing fits) are right.
                    first = bisect.bisect_left(widths, lower, key=lambda h: count(h, t[width]))
                    last = bisect.bisect_right(widths, upper, key=lambda h: count(h, min_mlp))
                    for hidden in widths[max(first - 1, 0):last + 1]:
                        self._solve({**shape, "hidden_size": hidden}, width, m, min_mlp)


def _spread(items: list[dict[str, int]], k: int) -> list[dict[str, int]]:
    """k items evenly spaced over `items` (both ends included; the middle one when k == 1)."""
    if k >= len(items):
        return list(items)
    if k == 1:
        return [items[(len(items) - 1) // 2]]
    return [items[round(j * (len(items) - 1) / (k - 1))] for j in range(k)]


def _order(shape: dict[str, int]) -> tuple[int, ...]:
    """Sort key along the free axes: deepest first, then widest hidden size, then most heads."""
    return tuple(-shape.get(k, 0) for k in ("num_hidden_layers", "hidden_size", "num_experts", "num_key_value_heads",
                                            "num_attention_heads", "intermediate_size", "moe_intermediate_size"))


def _candidates(teacher_cfg: Any, budget: int, multiple: int | None, tolerance: float,
                max_candidates: int, kind: str = "params") -> tuple[list[dict[str, int]], int]:
    """`candidate_shapes` and the multiple it used."""
    key = f"prune.target.{kind}"
    teacher_params = _Arch.of(teacher_cfg).count(_shape_of(teacher_cfg), kind)
    if budget <= 0 or budget >= teacher_params:
        what = "active parameters" if kind == "active_params" else "parameters"
        raise ConfigError(key, budget, f"must be between 0 and the teacher's {teacher_params:,} {what}",
                          f"choose a smaller budget, e.g. {key}={teacher_params // 2}")
    if multiple is not None and multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    m = default_multiple(teacher_cfg) if multiple is None else multiple
    buildable: dict[tuple[int, ...], bool] = {}
    pool = _Pool(teacher_cfg, budget, m, tolerance, buildable=buildable, kind=kind)
    # Automatic: finer widths while too few shapes fit (tiny teachers), but never below _MIN_AUTO_MULTIPLE.
    while multiple is None and len(pool) < (max_candidates + 1) // 2 and m // 2 >= _MIN_AUTO_MULTIPLE:
        m //= 2
        pool = _Pool(teacher_cfg, budget, m, tolerance, buildable=buildable, kind=kind)
    if not len(pool):
        raise ConfigError(key, budget, _no_shape_problem(pool, tolerance),
                          _no_shape_fix(teacher_cfg, budget, pool, tolerance, buildable))
    found = {g: sorted(pool.found[g], key=_order) for g in GROUPS}
    quota = dict.fromkeys(GROUPS, 0)
    while sum(quota.values()) < max_candidates and any(quota[g] < len(found[g]) for g in GROUPS):
        for g in GROUPS:
            if quota[g] < len(found[g]) and sum(quota.values()) < max_candidates:
                quota[g] += 1
    return [shape for g in GROUPS for shape in _spread(found[g], quota[g])], m


def candidate_shapes(teacher_cfg: Any, budget: int, *, multiple: int | None, tolerance: float = 0.01,
                     max_candidates: int = 12, kind: str = "params") -> list[dict[str, int]]:
    """Target shapes (TARGET_FIELDS) of `teacher_cfg` with |params - budget| <= tolerance * budget.

    Constraints: no dimension above the teacher's; hidden and intermediate sizes are multiples of
    `multiple` or the teacher's own; head_dim unchanged; KV groups are the teacher's or half of them, each
    with all its query heads (so `select.resolve_target` accepts every shape). The MLP width (or, for
    depth-only shapes, the layer count) is solved for the budget. `multiple=None` starts from
    `default_multiple` and halves it (not below 8) while fewer than half of `max_candidates` shapes fit.

    Families: width-only (all layers), depth-only (only layers removed), mixed (both). Slots are dealt
    round-robin, up to `max_candidates`, over the groups of GROUPS that have candidates: width-only,
    mixed and depth-only shapes keeping every attention head, then shapes that also cut heads (so those
    get at most a quarter of the slots while the others have candidates). Within a group, shapes are
    sorted deepest, then widest hidden size, then most heads first, and the group's slots are picked
    evenly spaced over that order (ends included), so the list spans mild to aggressive cuts of each
    axis. The result is in GROUPS order and deterministic.

    Raises ConfigError (key `prune.target.params`) when the budget is not below the teacher's count or no
    shape is within tolerance; the message names the nearest achievable counts and a smaller multiple that
    works, if any.
    """
    return _candidates(teacher_cfg, budget, multiple, tolerance, max_candidates, kind)[0]


def _no_shape_problem(pool: _Pool, tolerance: float) -> str:
    near = [f"{n:,} ({100 * (n / pool.budget - 1):+.1f}%)" for n in (pool.below, pool.above) if n is not None]
    return (f"no shape with widths a multiple of {pool.multiple} is within {100 * tolerance:g}% of it; "
            f"nearest: {' and '.join(near) if near else 'none'}")


def _no_shape_fix(teacher_cfg: Any, budget: int, pool: _Pool, tolerance: float,
                  buildable: dict[tuple[int, ...], bool]) -> str:
    nearest = pool.above if pool.below is None else pool.below
    fixes = [f"prune.target.{pool.kind}={nearest}"] if nearest is not None else []
    # Suggest finer widths down to _MIN_AUTO_MULTIPLE (or to 1 when already that fine).
    m, floor = pool.multiple // 2, _MIN_AUTO_MULTIPLE if pool.multiple > _MIN_AUTO_MULTIPLE else 1
    while m >= floor:
        if len(_Pool(teacher_cfg, budget, m, tolerance, probe=True, buildable=buildable, kind=pool.kind)):
            fixes.append(f"prune.search.multiple={m}")
            break
        m //= 2
    fixes.append(f"a larger prune.search.tolerance (now {tolerance:g})")
    return "set " + ", or ".join(fixes)


# -------------------------------------------------------------------------------------------- search


def _eval_loss(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]], reduce: Reduce | None) -> float:
    """Mean next-token cross-entropy (nats/token) over `batches`, in eval mode without gradients."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            total, count = (_apply_reduce(t, reduce) for t in _loss_sums(model, batches))
    finally:
        model.train(was_training)
    if float(count) <= 0:
        raise ValueError("prune search: the evaluation batches hold no tokens to score")
    return float(total / count)


def _release_memory() -> None:
    """Return a freed candidate's cached GPU blocks, so the next one (and training) can use them."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _rank_key(row: dict[str, Any], loss: str) -> tuple[bool, float, int]:
    value = row[loss]
    return (value is None or math.isnan(value), 0.0 if value is None else value, row["candidate"])


def search_target(
    teacher: nn.Module,
    scores: ImportanceScores,
    budget: int,
    *,
    eval_batches: Sequence[dict[str, torch.Tensor]],
    multiple: int | None = None,
    tolerance: float = 0.01,
    max_candidates: int = 12,
    depth_metric: str = "block_influence",
    distill: Callable[[nn.Module], float] | None = None,
    distill_top_k: int = 0,
    log: Callable[[str], Any] = print,
    reduce: Reduce | None = None,
    progress: bool = False,
    kind: str = "params",
) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """The best shape for a parameter budget, and the ranking table (one dict per candidate, best first).

    Every candidate of `candidate_shapes` is sliced out of `teacher` (left unchanged) with `scores`, scored
    by its LM loss on `eval_batches` ({"input_ids": [B, L]}, held out from calibration) and freed. With
    `distill` (student -> validation loss after a short distillation; it may train the student in place)
    and `distill_top_k > 0`, the best k are re-ranked by that loss. `reduce` (e.g. an all-reduce SUM) is
    applied to the loss sums, so data-parallel ranks holding different batches agree on the pick.
    The table goes to `log` line by line (see `format_table`); `progress` shows a bar over the candidates.
    """
    batches = list(eval_batches)
    if not batches:
        raise ValueError("prune search needs at least one evaluation batch")
    cfg = teacher.config
    shapes, multiple = _candidates(cfg, budget, multiple, tolerance, max_candidates, kind)
    teacher_shape = _shape_of(cfg)
    arch = _Arch.of(cfg)
    log(f"prune search: {len(shapes)} candidate shapes within {100 * tolerance:g}% of {budget:,} "
        f"{'active ' if kind == 'active_params' else ''}parameters "
        f"(widths multiple of {multiple}), ranked by held-out LM loss")

    where = batches[0]["input_ids"].device if batches else None  # also from a ZeRO-3 teacher (else on the CPU)

    def student(shape: dict[str, int]) -> nn.Module:  # on the device of the batches it is ranked on
        return slice_model(teacher, plan_from_scores(scores, cfg, shape, depth_metric=depth_metric), device=where)

    rows: list[dict[str, Any]] = []
    for idx, shape in enumerate(progress_bar(shapes, desc="prune search: candidates", unit="shape",
                                             enabled=progress)):
        model = student(shape)
        params = count_parameters(model) if kind == "params" else arch.active(shape)
        loss = _eval_loss(model, batches, reduce)
        del model
        _release_memory()
        rows.append({"candidate": idx, "family": _family(teacher_shape, shape), **shape, "params": params,
                     "budget_pct": 100.0 * (params / budget - 1.0), "loss_pruned": loss, "loss_distilled": None})
    rows.sort(key=lambda r: _rank_key(r, "loss_pruned"))
    if distill is not None and distill_top_k > 0:
        top = rows[:distill_top_k]
        for row in top:
            model = student({k: row[k] for k in teacher_shape})
            model.requires_grad_(True)
            model.train()
            row["loss_distilled"] = float(distill(model))
            del model
            _release_memory()
        rows[:distill_top_k] = sorted(top, key=lambda r: _rank_key(r, "loss_distilled"))
    for rank, row in enumerate(rows, start=1):
        row["rank"] = rank
    for line in format_table(rows).splitlines():
        log(line)
    best = {k: rows[0][k] for k in teacher_shape}
    return best, rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The ranking as a markdown table (rows as returned by `search_target`)."""
    moe = bool(rows) and "num_experts" in rows[0]
    qwen_moe = bool(rows) and "moe_intermediate_size" in rows[0]
    header = ("rank", "family", "layers", "hidden", "intermediate", *(("experts",) if moe else ()),
              *(("expert width",) if qwen_moe else ()), "heads", "kv_heads", "params", "vs budget",
              "loss (pruned)", "loss (distilled)")
    lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    for r in rows:
        distilled = "-" if r.get("loss_distilled") is None else f"{r['loss_distilled']:.4f}"
        cells = (r["rank"], r["family"], r["num_hidden_layers"], r["hidden_size"], r["intermediate_size"],
                 *((r["num_experts"],) if moe else ()), *((r["moe_intermediate_size"],) if qwen_moe else ()),
                 r["num_attention_heads"], r["num_key_value_heads"], f"{r['params']:,}", f"{r['budget_pct']:+.2f}%",
                 f"{r['loss_pruned']:.4f}", distilled)
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)
