"""Structured configs (registered in Hydra's ConfigStore) and validation that runs before any model loads.

Every field here is a key users can override on the command line (`trainer.lr=3e-4`). The YAML files in
`conf/` select group options and set defaults; the dataclasses below give every key its type, so a
typo or a wrong type fails in Hydra, and :func:`validate` catches wrong *values* with one line that
names the key and the fix: each section's values by the `check_*` function beside its dataclass, then the keys
that must fit together for the command (the cross-field checks, in one place: `validate`), then the model
shapes.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from sapling.errors import ConfigError, SaplingError  # noqa: F401  (ConfigError re-exported: `from sapling.config import ConfigError`)

COMMANDS = ("pipeline", "train", "distill", "prune", "quantize", "eval", "cache-teacher")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# HF config fields that can be overridden without a `+` (any other field of the model type's HF config class:
# `+student.config.rms_norm_eps=1e-6`; a name the class does not define is refused, see apply_overrides).
HF_SHAPE_FIELDS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                   "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings")


def _shape_overrides() -> dict[str, Any]:
    return dict.fromkeys(HF_SHAPE_FIELDS)


def _check(ok: bool, key: str, value: Any, problem: str, fix: str) -> None:
    if not ok:
        raise ConfigError(key, value, problem, fix)


def _check_choice(key: str, value: Any, choices: tuple[str, ...], what: str, fix: str | None = None) -> None:
    """A key that takes one of a few names (kept as strings, so configs compare and print as users wrote them)."""
    _check(value in choices, key, value, f"unknown {what}", fix or f"use one of {', '.join(choices)}")


SOURCE_INITS = ("auto", "pretrained", "random")
SOURCE_DTYPES = ("auto", "float32", "bfloat16", "float16")
ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flash_attention_2")


@dataclass
class ModelSourceConfig:
    """Where a model comes from: an HF checkpoint (`path`: local dir or hub id) or a named tiny config.

    `config` overrides fields of the HF config (null = keep); for a student without `path` it is
    applied to the teacher's config to give the student's shape (`student.config.num_hidden_layers=2`).
    """

    path: str | None = None
    tiny: str | None = None
    config: dict[str, Any] = field(default_factory=_shape_overrides)
    init: str = "auto"  # auto (path given: its weights; its config.* overrides must match) | pretrained | random
    dtype: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16 | float16
    attn_implementation: str = "auto"
    cache: str | None = None  # teacher only: a `sapling cache-teacher` output to distil from, no teacher model


def check_source(key: str, src: Any) -> None:
    """`teacher`, `student` or `model` (`key`): known names, a loadable `path`, a known `tiny` config; only the
    teacher comes from a cache (whether the command reads one: `validate`)."""
    _check_choice(f"{key}.init", src.init, SOURCE_INITS, "init")
    _check_choice(f"{key}.dtype", src.dtype, SOURCE_DTYPES, "dtype")
    _check_choice(f"{key}.attn_implementation", src.attn_implementation, ATTN_IMPLEMENTATIONS,
                  "attention implementation")
    if src.path is not None and str(src.path).startswith("pkg://"):  # a model shipped in a Python package
        from sapling.models.gguf import package_file

        src.path = package_file(str(src.path), f"{key}.path")
    check_model_path(f"{key}.path", src.path, weights=src.init != "random")
    if src.tiny is not None:
        from sapling.models.tiny import TINY_CONFIGS

        _check_choice(f"{key}.tiny", src.tiny, tuple(sorted(TINY_CONFIGS)), "tiny config")
    if key != "teacher":
        _check(src.cache is None, f"{key}.cache", src.cache, "only the teacher can come from a cache",
               "use teacher.cache=<dir>")


@dataclass
class DataConfig:
    files: list[str] = field(default_factory=list)
    hub_name: str | None = None
    hub_config: str | None = None
    hub_split: str = "train"
    text_field: str = "text"
    tokenizer: str | None = None  # defaults to the teacher's (distill) or the model's (train/eval) tokenizer
    seq_len: int = 256
    val_fraction: float = 0.05
    max_tokens: int | None = None
    seed: int = 0
    num_proc: int = 1
    cache_dir: str | None = None  # defaults to <cache_dir>/data
    format: str = "text"  # text | chat (rows of `messages_field` conversations)
    packing: str | None = None  # stream | per_document; null: per_document for chat, stream for text
    messages_field: str = "messages"
    role_key: str | None = None  # null: role, else from (ShareGPT)
    content_key: str | None = None  # null: content, else value (ShareGPT)
    chat_template: str | None = None  # Jinja text or a file holding it; null: the tokenizer's own
    loss_on: str = "assistant"  # assistant | all
    mix: list[Any] = field(default_factory=list)  # [{files|hub_name, weight, format, name, ...}]: a weighted mixture


DATA_FORMATS = ("text", "chat")  # sapling.data.pack.FORMATS, PACKINGS (importing the data layer loads `datasets`)
DATA_PACKINGS = ("stream", "per_document")
LOSS_ON = ("assistant", "all")


def has_data(data: Any) -> bool:
    """Some training data is given: data.files, data.hub_name or data.mix."""
    return bool(data.files) or data.hub_name is not None or bool(data.get("mix"))


def check_mix(data: Any) -> None:
    """Each `data.mix` entry: known keys, one source (files or hub_name), a weight > 0, a known format."""
    from sapling.data.mixture import MIX_KEYS, mix_entry  # imports `datasets`: only when a mixture is given

    _check(not (data.files or data.hub_name is not None), "data.mix", "[...]", "given beside data.files/data.hub_name",
           "put every source in data.mix (one entry per source), or drop data.mix")
    names = set()
    for i in range(len(data.mix)):
        raw = data.mix[i]
        _check(isinstance(raw, Mapping) or OmegaConf.is_dict(raw), f"data.mix[{i}]", raw,
               "not a mapping", "write entries as {files: [a.jsonl], weight: 0.7}")
        for key in raw:
            _check(key in MIX_KEYS, f"data.mix[{i}].{key}", raw[key], "unknown key in a mixture entry",
                   f"use {', '.join(MIX_KEYS)} (set the rest on data.*)")
        e = mix_entry(data, i)
        _check(bool(e["files"]) != (e["hub_name"] is not None), f"data.mix[{i}].files", list(e["files"] or []),
               "a mixture entry needs exactly one of files or hub_name", "give files: [...] or hub_name: org/name")
        w = e["weight"]
        _check(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w > 0,
               f"data.mix[{i}].weight", w, "must be a finite number > 0", "e.g. weight: 0.3 (weights are normalised)")
        _check_choice(f"data.mix[{i}].format", e["format"], DATA_FORMATS, "data format", "use text or chat")
        _check(e["name"] not in names and "/" not in str(e["name"]), f"data.mix[{i}].name", e["name"],
               "repeated or holds a /", "give each source its own name (it labels its metrics)")
        names.add(e["name"])
        if e["files"]:
            _check_file_kinds(f"data.mix[{i}].files", list(e["files"]), e["format"])
            check_data_files(list(e["files"]), key=f"data.mix[{i}].files")


def check_data(data: Any, required: bool = False) -> None:
    """`data.*` values, the files (they exist and hold text) and the tokenizer; `required`: some data is given."""
    _check(data.seq_len > 0, "data.seq_len", data.seq_len, "must be > 0", "set data.seq_len to the block length, e.g. 256")
    _check_choice("data.format", data.format, DATA_FORMATS, "data format",
                  "use text (plain documents) or chat (rows of messages)")
    if data.packing is not None:
        _check_choice("data.packing", data.packing, DATA_PACKINGS, "packing",
                      "use stream (documents cut into blocks) or per_document (attention within each document)")
    _check_choice("data.loss_on", data.loss_on, LOSS_ON, "loss_on", "use assistant or all")
    if data.chat_template is not None:
        _check("{" in data.chat_template or Path(os.path.expanduser(data.chat_template)).is_file(),
               "data.chat_template", data.chat_template, "neither a Jinja template nor a file",
               "give the template's text or the path of a file holding it")
    if data.files:
        _check_file_kinds("data.files", list(data.files), data.format)
    _check(0.0 <= data.val_fraction < 1.0, "data.val_fraction", data.val_fraction, "must be in [0, 1)",
           "set data.val_fraction=0.05")
    if data.max_tokens is not None:
        _check(data.max_tokens > 0, "data.max_tokens", data.max_tokens, "must be > 0", "drop it or set a positive cap")
    if required:
        _check_data_given(data)
    if data.files:
        check_data_files(list(data.files))
    if data.get("mix"):
        check_mix(data)
    if data.tokenizer is not None:
        check_model_path("data.tokenizer", data.tokenizer, ("tokenizer.json", "tokenizer_config.json"))


def _check_file_kinds(key: str, files: list[str], format: str) -> None:
    if format == "chat":
        bad = [f for f in files if os.path.splitext(f)[1].lower() not in (".jsonl", ".json", ".parquet")]
        _check(not bad, key, bad, "chat data must be .jsonl/.json/.parquet rows of conversations",
               "convert them, or set data.format=text for plain text files")


def _check_data_given(data: Any) -> None:
    _check(has_data(data), "data.files", list(data.files), "no training data given",
           "pass data.files=[a.txt,b.jsonl,c.parquet], data.hub_name=org/dataset or data.mix=[...]")


@dataclass
class FeatureDistillConfig:
    """Intermediate-layer (feature) distillation, added to the logit loss as `weight * feature_loss`.

    `layers`: [[student_layer, teacher_layer], ...] (decoder-layer outputs, 0-based, negatives count from the
    end); null maps every student layer to the teacher layer at the nearest relative depth (last to last).
    `normalize`: layer-normalise both sides per token (no affine) before the loss; recommended with mse.
    """

    weight: float = 0.0  # 0 = off
    loss: str = "cosine"  # cosine (1 - cos per token) | mse (mean over teacher channels)
    layers: list[list[int]] | None = None
    normalize: bool = False

def check_features(f: Any) -> None:
    """`distill.features` values that need no model (layer ranges: sapling.distill.features.resolve_layer_map)."""
    from sapling.distill.features import FEATURE_LOSSES  # the losses the distiller implements

    _check(f.weight >= 0 and math.isfinite(f.weight), "distill.features.weight", f.weight, "must be a finite number >= 0",
           "set distill.features.weight=0 (off) or e.g. 1.0")
    _check_choice("distill.features.loss", f.loss, FEATURE_LOSSES, "feature loss")
    if f.layers is None:
        return
    pairs = list(f.layers)
    _check(len(pairs) > 0, "distill.features.layers", pairs, "empty list of layer pairs",
           "give [[student_layer, teacher_layer], ...] or null for the default evenly spaced map")
    for i, pair in enumerate(pairs):
        _check(len(pair) == 2, f"distill.features.layers[{i}]", list(pair), "not a [student_layer, teacher_layer] pair",
               "write each entry as two layer indices, e.g. distill.features.layers=[[0,1],[1,3]]")


DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")  # sapling.kernels.DIVERGENCES (importing the kernels loads Triton)


@dataclass
class OnPolicyConfig:
    """On-policy distillation (GKD): the share `fraction` of micro-batches the student generates itself."""

    fraction: float = 0.0  # GKD's lambda; 0 = off (every batch from the data)
    max_new_tokens: int = 64
    temperature: float = 1.0  # sampling (not the loss's distill.temperature)
    top_p: float = 1.0
    divergence: str | None = None  # the loss on generated batches; null = distill.divergence
    teacher_samples: bool = False  # sequence-level KD: the other batches are the teacher's answers (cached once)


def check_on_policy(op: Any, seq_len: int) -> None:
    _check(0.0 <= op.fraction <= 1.0, "distill.on_policy.fraction", op.fraction, "must be in [0, 1]",
           "set distill.on_policy.fraction=0.5 (half the batches generated) or 0 (off)")
    _check(op.max_new_tokens >= 1 and ((op.fraction == 0 and not op.teacher_samples) or op.max_new_tokens < seq_len),
           "distill.on_policy.max_new_tokens", op.max_new_tokens, f"must be in [1, data.seq_len={seq_len})",
           f"e.g. distill.on_policy.max_new_tokens={max(1, min(64, seq_len // 2))}")
    _check(op.temperature > 0, "distill.on_policy.temperature", op.temperature, "must be > 0", "e.g. 1.0")
    _check(0 < op.top_p <= 1, "distill.on_policy.top_p", op.top_p, "must be in (0, 1]", "e.g. 1.0 (no nucleus cut)")
    if op.divergence is not None:
        _check_choice("distill.on_policy.divergence", op.divergence, DIVERGENCES, "divergence",
                      f"use one of {', '.join(DIVERGENCES)} (GKD: reverse_kl or jsd), or null for distill.divergence")


@dataclass
class DistillConfig:
    divergence: str = "forward_kl"
    beta: float = 0.5
    temperature: float = 1.0
    kd_weight: float = 1.0
    ce_weight: float = 0.0
    chunk_size: int | None = None  # tokens per loss chunk; None = let the kernel choose
    router_aux_weight: float | None = None  # MoE students: load-balancing loss weight; None = router_aux_loss_coef
    features: FeatureDistillConfig = field(default_factory=FeatureDistillConfig)
    on_policy: OnPolicyConfig = field(default_factory=OnPolicyConfig)

def check_distill(d: Any) -> None:
    """`distill.*` (that the loss has a term at all depends on the command: `validate`)."""
    _check_choice("distill.divergence", d.divergence, DIVERGENCES, "divergence")
    _check(d.temperature > 0, "distill.temperature", d.temperature, "must be > 0", "set distill.temperature=1.0")
    _check(0.0 <= d.beta <= 1.0, "distill.beta", d.beta, "must be in [0, 1]", "set distill.beta=0.5")
    _check(d.kd_weight >= 0, "distill.kd_weight", d.kd_weight, "must be >= 0", "set distill.kd_weight=1.0")
    _check(d.ce_weight >= 0, "distill.ce_weight", d.ce_weight, "must be >= 0", "set distill.ce_weight=0.0")
    _check(d.router_aux_weight is None or d.router_aux_weight >= 0, "distill.router_aux_weight", d.router_aux_weight,
           "must be >= 0", "set distill.router_aux_weight=null (the model's router_aux_loss_coef) or 0 to drop it")
    check_features(d.features)
    if d.get("on_policy") is not None:
        _check(d.on_policy.fraction == 0 or d.kd_weight > 0, "distill.kd_weight", d.kd_weight,
               "on-policy batches learn from the teacher's scores only", "set distill.kd_weight=1.0")


@dataclass
class PruneTargetConfig:
    num_hidden_layers: int | None = None
    hidden_size: int | None = None
    intermediate_size: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    num_experts: int | None = None  # mixture-of-experts: experts kept per layer
    moe_intermediate_size: int | None = None  # Qwen3-MoE's expert FFN width (Mixtral/OLMoE: intermediate_size)
    params: int | None = None  # a budget of total parameters (searched), or
    active_params: int | None = None  # of parameters active per token (MoE: top-k experts), searched

AGGREGATIONS = ("mean_l2", "mean", "variance")


@dataclass
class CalibrationConfig:
    samples: int = 1024  # sequences from the training split
    batch_size: int = 8
    aggregation: str = "mean_l2"  # mean_l2 (|x| mean over sequence, L2 over batch) | mean | variance


@dataclass
class PruneSearchConfig:
    """`prune.target.params`: candidate shapes within `tolerance` of the budget, ranked by held-out LM loss."""

    multiple: int | None = None  # width dims are multiples of this; None: 128 where the teacher allows, else smaller
    tolerance: float = 0.01  # |params - budget| <= tolerance * budget
    max_candidates: int = 12  # candidates evaluated (spread over width-only, depth-only and mixed)
    eval_batches: int = 4  # held-out calibration batches for the ranking loss
    distill_top_k: int = 0  # > 0: briefly distil the best k before the final pick
    distill_steps: int = 20

PRUNE_IMPORTANCES = ("activation", "magnitude", "random")
DEPTH_METRICS = ("block_influence", "layer_loss")


@dataclass
class PruneConfig:
    target: PruneTargetConfig = field(default_factory=PruneTargetConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    importance: str = "activation"  # activation (Minitron) | magnitude (weight norms) | random (baseline)
    depth_metric: str = "block_influence"  # block_influence | layer_loss
    scores: str | None = None  # importance scores saved by an earlier run: re-prune without calibrating
    search: PruneSearchConfig = field(default_factory=PruneSearchConfig)
    rounds: int = 1  # > 1: reach the target in R prune -> distill rounds (iterative pruning)
    round_steps: list[int] | None = None  # distil steps after each of the first R-1 rounds; None: max_steps // R each

def check_prune(p: Any) -> None:
    """`prune.*` values (which commands prune, and in rounds: `validate`)."""
    c = p.calibration
    _check(c.samples > 0, "prune.calibration.samples", c.samples, "must be > 0", "set prune.calibration.samples=1024")
    _check(c.batch_size > 0, "prune.calibration.batch_size", c.batch_size, "must be > 0",
           "set prune.calibration.batch_size=8")
    _check_choice("prune.calibration.aggregation", c.aggregation, AGGREGATIONS, "aggregation")
    _check_choice("prune.depth_metric", p.depth_metric, DEPTH_METRICS, "depth metric")
    _check_choice("prune.importance", p.importance, PRUNE_IMPORTANCES, "importance")
    t = p.target
    for budget in ("params", "active_params"):
        if t[budget] is None:
            continue
        fixed = [k for k, v in t.items() if k != budget and v is not None]
        _check(not fixed, f"prune.target.{budget}", t[budget],
               f"given together with prune.target.{fixed[0] if fixed else ''}",
               "give one parameter budget (params or active_params) or explicit HF fields, not both")
        _check(isinstance(t[budget], int) and t[budget] > 0, f"prune.target.{budget}", t[budget],
               "must be a positive parameter count", f"e.g. prune.target.{budget}=4000000000")
    ps = p.search
    _check(ps.multiple is None or ps.multiple >= 1, "prune.search.multiple", ps.multiple, "must be >= 1",
           "set e.g. prune.search.multiple=128, or null for automatic")
    _check(0 < ps.tolerance < 1, "prune.search.tolerance", ps.tolerance, "must be in (0, 1)", "e.g. 0.01 (1%)")
    _check(ps.max_candidates >= 1, "prune.search.max_candidates", ps.max_candidates, "must be >= 1", "e.g. 12")
    _check(ps.eval_batches >= 1, "prune.search.eval_batches", ps.eval_batches, "must be >= 1", "e.g. 4")
    _check(ps.distill_top_k >= 0 and ps.distill_steps >= 1, "prune.search.distill_top_k", ps.distill_top_k,
           "distill_top_k must be >= 0 and distill_steps >= 1", "e.g. distill_top_k=3 distill_steps=20")
    _check(p.rounds >= 1, "prune.rounds", p.rounds, "must be >= 1", "1 prunes in one shot; e.g. 2 for two rounds")
    if p.round_steps is not None:
        steps = list(p.round_steps)
        _check(len(steps) == p.rounds - 1 and all(int(x) >= 1 for x in steps), "prune.round_steps", steps,
               f"needs {p.rounds - 1} positive step counts (one per round before the last)",
               "e.g. prune.rounds=3 prune.round_steps=[100,100], or null for an even split")
    if p.rounds > 1:
        _check(p.scores is None, "prune.scores", p.scores, "saved scores cannot be reused across rounds",
               "drop prune.scores when prune.rounds > 1 (importance is re-estimated every round)")
    if p.scores is not None:
        _check(Path(os.path.expanduser(p.scores)).is_file(), "prune.scores", p.scores, "no such file",
               "point it at the prune_scores.pt an earlier prune run wrote, or drop it")


@dataclass
class QuantCalibrationConfig:
    samples: int = 128  # sequences from the training split (GPTQ's Hessians, guided saliency)
    batch_size: int = 8

QUANT_SCHEMES = ("w4a16", "w8a16")
QUANT_METHODS = ("auto", "gptq", "rtn")
QUANT_DTYPES = ("bfloat16", "float16", "float32")
QUANT_OBSERVERS = ("minmax", "mse")


@dataclass
class QuantConfig:
    """Weight-only quantization (conf/quant/): `sapling quantize`, `hooks.post=[quantize]`, `quant.aware`."""

    scheme: str = "w4a16"  # w4a16 (int4, groups of group_size) | w8a16 (int8, per output channel)
    group_size: int = 128
    method: str = "auto"  # auto (gptq; rtn with quant.aware) | gptq | rtn
    guided: bool = False  # weight GPTQ's Hessians by distillation-loss saliency (needs the teacher)
    guided_groups: int = 4  # groups of output rows with their own saliency-weighted Hessian
    aware: bool = False  # distill: train with fake-quantized weights (export numerics, straight-through)
    act_order: bool = True  # GPTQ: columns by decreasing Hessian diagonal, static groups
    observer: str = "mse"  # GPTQ's group scales: mse (absmax clipped to least rounding error) | minmax (absmax)
    block_size: int = 128  # GPTQ: columns per lazy-update block
    damp: float = 0.01  # GPTQ: damping, a fraction of the mean Hessian diagonal
    calibration: QuantCalibrationConfig = field(default_factory=QuantCalibrationConfig)
    dtype: str = "bfloat16"  # export dtype of the scales and of everything left unquantized
    ignore: list[str] = field(default_factory=lambda: ["lm_head"])  # names (or re:<regex>) kept 16-bit
    skip_incompatible: bool = False  # leave linears whose input width group_size does not divide 16-bit
    offload: bool = False  # keep the model in CPU memory; one decoder layer at a time on the device
    eval: bool = True  # validation perplexity before and after, in the report
    output: str | None = None  # post-hook export dir; null: <output_dir>/model-<scheme>

def check_quant(q: Any) -> None:
    """`quant.*` values (what quantizes, and with which teacher and data: `validate`)."""
    _check_choice("quant.scheme", q.scheme, QUANT_SCHEMES, "scheme",
                  "use w4a16 (int4, groups of quant.group_size) or w8a16 (int8 per channel)")
    _check(q.group_size >= 1 and q.group_size % 8 == 0, "quant.group_size", q.group_size,
           "must be a positive multiple of 8", "use 128 (what serving kernels expect) or 64/32")
    _check_choice("quant.method", q.method, QUANT_METHODS, "method")
    _check_choice("quant.dtype", q.dtype, QUANT_DTYPES, "export dtype", "use bfloat16 (or float16, float32)")
    _check_choice("quant.observer", q.observer, QUANT_OBSERVERS, "observer",
                  "use minmax (each group's absmax) or mse (clipped to the least rounding error)")
    _check(q.guided_groups >= 1, "quant.guided_groups", q.guided_groups, "must be >= 1", "e.g. 4")
    _check(q.block_size >= 1, "quant.block_size", q.block_size, "must be >= 1", "use 128")
    _check(0 < q.damp < 1, "quant.damp", q.damp, "must be in (0, 1)", "use 0.01")
    _check(q.calibration.samples >= 1 and q.calibration.batch_size >= 1, "quant.calibration.samples",
           q.calibration.samples, "samples and batch_size must be >= 1", "e.g. quant.calibration.samples=128")
    if q.aware:
        _check(q.method in ("auto", "rtn") and not q.guided, "quant.method", q.method,
               "quantization-aware training learns the round-to-nearest export; GPTQ/guided would change the weights",
               "drop quant.method and quant.guided (auto exports with rtn after quant.aware)")


@dataclass
class CacheConfig:
    """`sapling cache-teacher`: one teacher pass writing its top-k distributions to `dir` (conf/cache/)."""

    dir: str | None = None
    top_k: int | None = None  # writing: None = 64; `distill teacher.cache=C`: None accepts the cache's k
    temperature: float | None = None  # the distributions are stored at this T; None: distill.temperature
    value_bits: int = 12  # bits per quantized -log p (benchmarks/cache.py measures the choice)
    shard_sequences: int = 256  # sequences per shard file (the unit of resume and of the per-rank split)
    micro_batch_size: int | None = None  # teacher forward batch; None: trainer.micro_batch_size
    verify: bool = True  # sha256 every shard when a run opens the cache (split over the ranks)

def check_cache(c: Any) -> None:
    """`cache.*` values (`sapling cache-teacher`; who reads `teacher.cache`: `validate`)."""
    _check(c.top_k is None or c.top_k >= 1, "cache.top_k", c.top_k, "must be >= 1", "e.g. cache.top_k=64")
    _check(c.temperature is None or c.temperature > 0, "cache.temperature", c.temperature, "must be > 0",
           "drop it (distill.temperature is used) or e.g. cache.temperature=1.0")
    _check(2 <= c.value_bits <= 24, "cache.value_bits", c.value_bits, "must be in [2, 24]", "keep the default 12")
    _check(c.shard_sequences >= 1, "cache.shard_sequences", c.shard_sequences, "must be >= 1", "e.g. 256")
    _check(c.micro_batch_size is None or c.micro_batch_size >= 1, "cache.micro_batch_size", c.micro_batch_size,
           "must be >= 1", "drop it (trainer.micro_batch_size is used) or e.g. 16")


DEEPSPEED_PRESETS = ("none", "zero1", "zero2", "zero3", "zero3_offload")
DEEPSPEED_COMMANDS = ("train", "distill", "cache-teacher")


@dataclass
class DeepSpeedConfig:
    """`deepspeed=zero1|zero2|zero3|zero3_offload` (conf/deepspeed/): the student's ZeRO engine and the teacher's.

    `none` trains in one process with a plain optimizer. Otherwise the student is a DeepSpeed engine at
    ZeRO `stage` (1: optimizer states partitioned, 2: + gradients, 3: + weights) and the frozen teacher a
    DeepSpeed engine without optimizer at `teacher_stage` (0: replicated, 3: partitioned).
    """

    name: str = "none"  # none | zero1 | zero2 | zero3 | zero3_offload
    stage: int = 0
    offload_optimizer: bool = False  # student optimizer states (and fp32 master weights) in CPU memory
    offload_param: bool = False  # student weights in CPU memory between uses (stage 3)
    teacher_stage: int = 0  # 0 (replicated) | 3 (partitioned)
    teacher_offload_param: bool = False  # teacher weights in CPU memory between uses (teacher_stage 3)
    param_persistence_threshold: int = 100_000  # ZeRO-3: tensors with fewer elements stay whole on every rank
    extra: dict[str, Any] = field(default_factory=dict)  # merged into the student engine's DeepSpeed config

def check_deepspeed(ds: Any) -> None:
    """`deepspeed=...`: a known preset and a consistent stage/offload combination (which commands: `validate`)."""
    _check_choice("deepspeed", ds.name, DEEPSPEED_PRESETS, "preset",
                  "use deepspeed=none, zero1, zero2, zero3 or zero3_offload")
    if ds.name == "none":
        _check(ds.stage == 0, "deepspeed.stage", ds.stage, "a stage needs a DeepSpeed preset",
               "choose deepspeed=zero1|zero2|zero3 instead of setting deepspeed.stage")
        return
    _check(ds.stage in (1, 2, 3), "deepspeed.stage", ds.stage, "ZeRO stage must be 1, 2 or 3", "e.g. deepspeed.stage=3")
    _check(not ds.offload_param or ds.stage == 3, "deepspeed.offload_param", ds.offload_param,
           "parameter offload needs ZeRO stage 3", "use deepspeed=zero3_offload")
    _check(ds.teacher_stage in (0, 3), "deepspeed.teacher_stage", ds.teacher_stage,
           "the teacher is replicated (0) or partitioned (3)", "use deepspeed.teacher_stage=3 for large teachers")
    _check(not ds.teacher_offload_param or ds.teacher_stage == 3, "deepspeed.teacher_offload_param",
           ds.teacher_offload_param, "parameter offload needs teacher_stage=3", "set deepspeed.teacher_stage=3")
    _check(ds.param_persistence_threshold >= 0, "deepspeed.param_persistence_threshold",
           ds.param_persistence_threshold, "must be >= 0", "e.g. 100000 (0 partitions every tensor)")


DEVICES = ("auto", "cpu", "cuda")


@dataclass
class TrainerConfig:
    max_steps: int = 100
    micro_batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    log_every: int = 10
    eval_every: int = 50
    # Validation budget (during training, at its end, and a pruned student's loss before training): the first
    # eval_tokens // data.seq_len validation blocks (at least one); null: the whole validation split.
    eval_tokens: int | None = 32_768
    eval_batches: int | None = None  # also at most this many batches of micro_batch_size blocks; null: no cap
    save_every: int = 0  # 0: only the final HF checkpoint
    keep_last: int = 2
    resume: bool = True  # continue from output_dir/checkpoints/latest when it exists
    overwrite: bool = False  # an earlier run in output_dir is moved aside into replaced-<time>/ and training starts over
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    progress: bool = True
    activation_checkpointing: bool = False  # recompute decoder layers in backward (less memory, ~1/3 more compute)
    peak_flops: float | None = None  # one device's peak FLOP/s for MFU; None: datasheet table (A100/H100/H200)

def check_trainer(t: Any) -> None:
    """`trainer.*` values."""
    _check(t.max_steps >= 0, "trainer.max_steps", t.max_steps, "must be >= 0", "set trainer.max_steps=1000")
    _check(t.micro_batch_size > 0, "trainer.micro_batch_size", t.micro_batch_size, "must be > 0",
           "set trainer.micro_batch_size=8")
    _check(t.grad_accum > 0, "trainer.grad_accum", t.grad_accum, "must be > 0", "set trainer.grad_accum=1")
    _check(t.lr > 0, "trainer.lr", t.lr, "must be > 0", "set trainer.lr=1e-3")
    _check(0.0 <= t.min_lr_ratio <= 1.0, "trainer.min_lr_ratio", t.min_lr_ratio, "must be in [0, 1]",
           "set trainer.min_lr_ratio=0.1")
    _check(t.warmup_steps >= 0, "trainer.warmup_steps", t.warmup_steps, "must be >= 0", "set trainer.warmup_steps=10")
    _check(t.grad_clip >= 0, "trainer.grad_clip", t.grad_clip, "must be >= 0 (0 disables clipping)",
           "set trainer.grad_clip=1.0")
    _check(t.log_every > 0, "trainer.log_every", t.log_every, "must be > 0", "set trainer.log_every=10")
    _check(t.eval_every >= 0, "trainer.eval_every", t.eval_every, "must be >= 0 (0 disables)", "set trainer.eval_every=50")
    _check(t.save_every >= 0, "trainer.save_every", t.save_every, "must be >= 0 (0: final model only)",
           "set trainer.save_every=0")
    if t.eval_tokens is not None:
        _check(t.eval_tokens > 0, "trainer.eval_tokens", t.eval_tokens, "must be > 0 (null: the whole validation "
               "split)", "set trainer.eval_tokens=32768")
    if t.eval_batches is not None:
        _check(t.eval_batches > 0, "trainer.eval_batches", t.eval_batches, "must be > 0 (null: no cap)",
               "drop it (trainer.eval_tokens sets the budget) or set trainer.eval_batches=16")
    _check_choice("trainer.device", t.device, DEVICES, "device")


LOGGERS = ("wandb", "none")


@dataclass
class LoggerConfig:
    name: str = "wandb"  # wandb | none
    project: str = "sapling"
    run_name: str | None = None
    mode: str | None = None  # None: $WANDB_MODE if set, else offline

def check_logger(lg: Any) -> None:
    _check_choice("logger", lg.name, LOGGERS, "logger", "use logger=wandb or logger=none")


@dataclass
class HooksConfig:
    pre: list[str] = field(default_factory=list)
    post: list[str] = field(default_factory=list)


@dataclass
class EvalConfig:
    # reports on the validation split (quantize before/after, hooks.post=[eval], the pipeline's table): batches of
    # micro_batch_size blocks, None = the whole split (validation during training: trainer.eval_tokens)
    batches: int | None = None
    micro_batch_size: int = 8
    # `sapling eval`: sliding-window perplexity over the files' token stream
    window: int | None = None  # tokens per window; None: data.seq_len
    stride: int | None = None  # tokens between window starts; None: window // 2
    max_tokens: int | None = None  # evaluate the first N tokens of the stream; None: all
    gen_tokens: int = 32  # generation speed: new tokens per prompt (0: skip the measurement)
    gen_batch: int = 4  # prompts decoded together
    gen_prompt_len: int = 32  # tokens per prompt (taken from the data)
    # lm-evaluation-harness tasks (extra `eval`; their data sets must be reachable or cached), e.g. [arc_easy]
    tasks: list[str] = field(default_factory=list)
    # directories (or YAML files) of local task definitions, e.g. a task over a jsonl file on this machine
    task_paths: list[str] = field(default_factory=list)
    num_fewshot: int | None = None
    limit: float | None = None  # examples per task (a fraction when < 1); None: all

def check_eval(e: Any, seq_len: int) -> None:
    """`eval.*` for `sapling eval` (the window defaults to `data.seq_len`)."""
    window = e.window or seq_len
    _check(window >= 2, "eval.window", e.window, "a window needs at least 2 tokens", "set eval.window=1024")
    if e.stride is not None:
        _check(1 <= e.stride <= window, "eval.stride", e.stride, f"must be between 1 and the window ({window})",
               f"set eval.stride={max(1, window // 2)}")
    if e.max_tokens is not None:
        _check(e.max_tokens >= 2, "eval.max_tokens", e.max_tokens, "must be >= 2", "drop it to evaluate everything")
    _check(e.micro_batch_size > 0, "eval.micro_batch_size", e.micro_batch_size, "must be > 0", "set eval.micro_batch_size=8")
    for key in ("gen_tokens", "gen_batch", "gen_prompt_len"):
        _check(e[key] >= (0 if key == "gen_tokens" else 1), f"eval.{key}", e[key], "out of range",
               f"set eval.{key}={EvalConfig.__dataclass_fields__[key].default}")


@dataclass
class DemoCorpusConfig:
    """The demo's corpus: this Python's own standard-library sources (every machine has them)."""

    max_bytes: int = 3_000_000
    vocab_size: int = 2048
    subpackages: bool = False  # also the packages' modules (asyncio/, test/, ...): up to ~31 MB instead of ~4.7


@dataclass
class PipelineConfig:
    corpus: DemoCorpusConfig = field(default_factory=DemoCorpusConfig)
    teacher_steps: int = 400
    teacher_lr: float = 2e-3
    # Minitron's teacher correction: a pretrained teacher.path fine-tuned with CE on the distillation data first
    teacher_correction_steps: int = 0
    teacher_correction_lr: float = 3e-5
    scratch_baseline: bool = True  # also train the student shape from scratch with CE for the same steps
    quantize: bool = True  # end with the distilled student quantized (quant.*) and exported
    sample_prompts: list[str] = field(default_factory=list)  # each model's greedy answer to these, in report.md
    sample_tokens: int = 32  # new tokens per sample


def check_pipeline(p: Any) -> None:
    _check(p.teacher_steps > 0, "pipeline.teacher_steps", p.teacher_steps, "must be positive", "use e.g. 400")
    _check(p.sample_tokens > 0, "pipeline.sample_tokens", p.sample_tokens, "must be positive", "use e.g. 32")
    _check(p.teacher_correction_steps >= 0, "pipeline.teacher_correction_steps", p.teacher_correction_steps,
           "must be >= 0", "0 (no correction) or the steps of CE fine-tuning, e.g. 200")
    _check(p.teacher_correction_lr > 0, "pipeline.teacher_correction_lr", p.teacher_correction_lr, "must be > 0",
           "e.g. 3e-5")


@dataclass
class SaplingConfig:
    command: str = "pipeline"
    output_dir: str = MISSING
    cache_dir: str = MISSING
    seed: int = 0
    teacher: ModelSourceConfig = field(default_factory=ModelSourceConfig)
    student: ModelSourceConfig = field(default_factory=ModelSourceConfig)
    model: ModelSourceConfig = field(default_factory=ModelSourceConfig)
    data: DataConfig = field(default_factory=DataConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    hooks: HooksConfig = field(default_factory=HooksConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)


def register_configs() -> None:
    """Register the schema so `conf/config.yaml` can build on it (called before Hydra composes)."""
    ConfigStore.instance().store(name="sapling_schema", node=SaplingConfig)


# --------------------------------------------------------------------------------------------------
# checkpoints, files and the hub (used by the section checks above)


def is_hub_id(path: str) -> bool:
    """`org/name` that is not an existing local path: a model or data set on the hub."""
    return bool(_HUB_ID.match(path)) and not Path(path).exists()


WEIGHT_PATTERNS = ("*.safetensors", "*.bin")
HUB_PROBE_TIMEOUT_S = 3.0


def check_model_path(key: str, path: str | None, markers: tuple[str, ...] = ("config.json",), *,
                     weights: bool = False) -> None:
    """`path` is an existing directory holding one of `markers` (and weight files when `weights`: the source
    will load them), or a hub id that is in the local HF cache or on a reachable hub."""
    if path is None:
        return
    expanded = Path(os.path.expanduser(path))
    if expanded.is_file() and "config.json" in markers and str(path).lower().endswith(".gguf"):  # a llama.cpp file
        from sapling.models.gguf import gguf_problem

        problem = gguf_problem(expanded)
        if problem is not None:
            raise ConfigError(key, path, *problem)
        return
    if expanded.is_file():
        raise ConfigError(key, path, "is a file, not a checkpoint directory",
                          f"point {key} at the directory written by save_pretrained that holds config.json and the "
                          f"weights (e.g. {expanded.parent})")
    if expanded.is_dir():
        if not any((expanded / m).exists() for m in markers):
            raise ConfigError(key, path, f"directory has no {' or '.join(markers)}",
                              f"point {key} at a directory written by save_pretrained (e.g. a sapling output_dir/model)")
        if weights and not any(next(expanded.glob(p), None) for p in WEIGHT_PATTERNS):
            source = key.rsplit(".", 1)[0]
            raise ConfigError(key, path, "directory has a config.json but no weights (*.safetensors or *.bin)",
                              f"copy or download the weight files into it, or set {source}.init=random to train a "
                              "randomly initialised model of that config")
        damaged = damaged_weights(expanded) if weights else None
        if damaged is not None:
            raise ConfigError(key, path, damaged, "copy or download the checkpoint again (an interrupted download or "
                              "copy leaves files like this)")
        return
    if is_hub_id(path):
        problem = hub_problem(path, markers)
        if problem is not None:
            raise ConfigError(key, path, problem, "download it first (`hf download "
                              f"{path} --local-dir <dir>`) or pass a local path")
        return
    raise ConfigError(key, path, "no such directory (and not a hub id like org/name)",
                      f"set {key} to an HF checkpoint directory or a hub model id")


def damaged_weights(directory: Path) -> str | None:
    """What is wrong with the safetensors weights in `directory` (a truncated file, a shard its index names but
    that is missing), or None. Reads only the headers: milliseconds, whatever the model's size."""
    from safetensors import SafetensorError, safe_open

    for index in directory.glob("*.safetensors.index.json"):
        try:
            shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        except (OSError, ValueError) as err:
            return f"{index.name} cannot be read ({type(err).__name__}: {str(err)[:120]})"
        missing = sorted(s for s in shards if not (directory / s).is_file())
        if missing:
            return f"{index.name} names {len(missing)} missing weight file(s), e.g. {missing[0]}"
    for file in sorted(directory.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="numpy"):
                pass
        except (SafetensorError, OSError) as err:
            return f"{file.name} is truncated or corrupt ({str(err)[:120]})"
    return None


def is_quantized_dir(path: str | None) -> bool:
    """True for a local checkpoint dir whose config.json carries a quantization_config (e.g. a
    `sapling quantize` compressed-tensors export)."""
    if path is None:
        return False
    config = Path(os.path.expanduser(path)) / "config.json"
    try:
        return config.is_file() and "quantization_config" in json.loads(config.read_text())
    except (OSError, ValueError):
        return False  # an unreadable config.json is reported where the model loads


def hub_problem(repo_id: str, markers: tuple[str, ...] = ("config.json",)) -> str | None:
    """Why hub id `repo_id` cannot be loaded (offline, or the hub unreachable), or None when it can be: it is
    in the local HF cache, or the hub answers within HUB_PROBE_TIMEOUT_S (transformers itself would retry
    for half a minute before failing with a network traceback)."""
    import socket
    import threading
    from urllib.parse import urlparse

    from huggingface_hub import constants, try_to_load_from_cache

    for name in dict.fromkeys(("config.json", *markers)):
        try:
            if isinstance(try_to_load_from_cache(repo_id, name), str):
                return None
        except Exception:  # noqa: BLE001  (an id the hub would reject: let the loader say so)
            return None
    offline = constants.HF_HUB_OFFLINE or os.environ.get("TRANSFORMERS_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    if offline:
        return "not a local directory, not in the HF cache, and the hub is offline (HF_HUB_OFFLINE=1)"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # reached through a proxy: let the download say what goes wrong
    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    outcome: list[BaseException | None] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT_S).close()
            outcome.append(None)
        except OSError as err:
            outcome.append(err)

    thread = threading.Thread(target=probe, daemon=True)  # getaddrinfo has no timeout of its own
    thread.start()
    thread.join(HUB_PROBE_TIMEOUT_S + 0.5)
    if outcome and outcome[0] is None:
        return None
    why = f"{type(outcome[0]).__name__}: {outcome[0]}" if outcome else f"no answer in {HUB_PROBE_TIMEOUT_S:.0f} s"
    return f"not a local directory, not in the HF cache, and the hub is unreachable ({host}:{port}: {why})"


def check_data_files(files: list[str], key: str = "data.files") -> None:
    """Each file exists and its first bytes are UTF-8 text (any extension) or Parquet; not all are empty.

    Cheap: reads at most the first 64 KiB of each file; the readers check the rest when they load it.
    """
    from sapling.data.sources import file_problem, is_blank  # imports `datasets`: only when files are given

    paths = [os.path.expanduser(f) for f in files]
    for i, (f, path) in enumerate(zip(files, paths, strict=True)):
        item = f"{key}[{i}]"
        _check(not Path(path).is_dir(), item, f, "is a directory, not a file",
               "list the files in it, e.g. data.files=[dir/a.txt,dir/b.py]")
        _check(Path(path).is_file(), item, f, "no such file", "check the path (relative paths are "
               "resolved from the directory you launched from)")
        if problem := file_problem(path):
            raise ConfigError(item, f, *problem)
    _check(not all(is_blank(p) for p in paths), key, files,
           "every file is empty or blank", "pass files that hold text")


# --------------------------------------------------------------------------------------------------
# the whole config


def check_known_keys(cfg: DictConfig) -> None:
    """Every key is one the schema (SaplingConfig) defines. Hydra answers a misspelled key with "use
    +key=value", which adds it: `+trainer.max_step=1` would then run with the typo ignored. The free-form
    dicts take any key: `<teacher|student|model>.config` (checked against the model's HF config class when
    that config is resolved, `sapling.models.hf.apply_overrides`) and `deepspeed.extra`."""
    _check_keys(cfg, OmegaConf.structured(SaplingConfig), "")


def _check_keys(node: DictConfig, schema: DictConfig, prefix: str) -> None:
    known = [str(k) for k in schema]  # not `name in schema`: that is False for a MISSING value
    for name in node:
        key = f"{prefix}{name}"
        if name not in known:
            raw = OmegaConf.to_container(node, resolve=False)[name]
            close = difflib.get_close_matches(str(name), known, n=1)
            where = f"under {prefix[:-1]}" if prefix else "at the top level"
            raise ConfigError(key, raw, f"no such key {where} (a `+` adds any key, and nothing would read it)",
                              f"did you mean {prefix}{close[0]}?" if close else
                              f"see the valid keys with `sapling {node._get_root().get('command', '<command>')} "
                              "--cfg job`")
        sub, sub_schema = node._get_node(name), schema._get_node(name)
        typed = OmegaConf.is_dict(sub_schema) and sub_schema._metadata.object_type not in (None, dict)
        if typed and OmegaConf.is_dict(sub):
            _check_keys(sub, sub_schema, f"{key}.")


def check_override_keys(overrides: list[str], groups: list[str]) -> None:
    """Keys of `key=value` overrides exist, checked before Hydra composes (Hydra's own answer to a typo is a
    multi-line error suggesting `+key=value`, which would add the typo). `groups`: the config groups of
    `conf/` (`deepspeed=zero3`, `experiment=demo`). Hydra's keys, `+`/`~` overrides and group paths pass."""
    schema = OmegaConf.structured(SaplingConfig)
    for arg in overrides:
        key, sep, value = arg.partition("=")
        if not sep or key.startswith(("+", "~", "hydra")) or "/" in key or "@" in key:
            continue
        parts = key.split(".")
        if len(parts) == 1 and parts[0] in groups:
            continue
        node: Any = schema
        for depth, name in enumerate(parts):
            typed = OmegaConf.is_dict(node) and node._metadata.object_type not in (None, dict)
            if not typed:
                break  # a free-form dict (`student.config`, `deepspeed.extra`): checked where it is used
            known = [str(k) for k in node] + (groups if depth == 0 else [])
            if name not in known:
                prefix = ".".join(parts[:depth])
                close = difflib.get_close_matches(name, known, n=1)
                where = f"under {prefix}" if prefix else "at the top level"
                raise ConfigError(key, value, f"no such key {where}",
                                  f"did you mean {prefix + '.' if prefix else ''}{close[0]}?" if close else
                                  "see the valid keys with `sapling <command> --cfg job`")
            node = node._get_node(name) if name in node else None
            if node is None:
                break

def validate(cfg: DictConfig) -> None:
    """Value checks that need no model weights. Raises ConfigError (one line) on the first problem.

    Unknown keys, then each section on its own (the `check_*` beside its dataclass), then the keys that must fit
    together (the `_check_*` below: what the command needs, which options combine), then the model shapes.
    """
    check_known_keys(cfg)
    _check_choice("command", cfg.command, COMMANDS, "command")
    check_distill(cfg.distill)
    check_on_policy(cfg.distill.on_policy, cfg.data.seq_len)
    check_trainer(cfg.trainer)
    check_logger(cfg.logger)
    check_deepspeed(cfg.deepspeed)
    if cfg.command == "eval":
        check_eval(cfg.eval, cfg.data.seq_len)
    check_prune(cfg.prune)
    check_cache(cfg.cache)
    check_quant(cfg.quant)
    if cfg.command == "pipeline":
        check_pipeline(cfg.pipeline)
        _check(cfg.pipeline.teacher_correction_steps == 0 or cfg.teacher.path is not None,
               "pipeline.teacher_correction_steps", cfg.pipeline.teacher_correction_steps,
               "corrects a pretrained teacher.path on the distillation data; the demo's own teacher is trained on it",
               "pass teacher.path=<pretrained checkpoint>, or set pipeline.teacher_correction_steps=0")
    for key in ("teacher", "student", "model"):
        check_source(key, cfg[key])
    check_data(cfg.data)
    _check_prune_hook(cfg)
    _check_training(cfg)
    _check_pruning(cfg)
    _check_teacher(cfg)
    _check_quantizing(cfg)
    _check_inputs(cfg)
    check_model_shapes(cfg)
    check_moe_quantization(cfg)


# Cross-field checks: keys of several sections (or a key and the command) that must fit together.


def _check_prune_hook(cfg: DictConfig) -> None:
    """`hooks.pre=[prune]` makes the student: nothing else may say what the student is."""
    if "prune" not in cfg.hooks.pre:
        return
    for src_key in ("path", "tiny"):
        _check(cfg.student[src_key] is None, f"student.{src_key}", cfg.student[src_key],
               "hooks.pre=[prune] makes the student by pruning the teacher, so it would be ignored",
               f"drop student.{src_key} to prune the teacher, or drop hooks.pre=[prune] to distil that student")
    shaped = {k: v for k, v in OmegaConf.to_container(cfg.student.config, resolve=True).items() if v is not None}
    if shaped:
        name, value = next(iter(shaped.items()))
        _check(False, f"student.config.{name}", value, "hooks.pre=[prune] makes the student by pruning the "
               "teacher to prune.target, so it would be ignored",
               f"use prune.target.{name}={value}" if name in PruneTargetConfig.__dataclass_fields__ else
               f"drop student.config.{name} (or hooks.pre=[prune])")


def _check_training(cfg: DictConfig) -> None:
    """Distillation has a loss term; DeepSpeed drives only the commands that train (or run the teacher)."""
    cmd, d, ds = cfg.command, cfg.distill, cfg.deepspeed
    if cmd in ("distill", "pipeline"):
        _check(d.kd_weight + d.ce_weight > 0, "distill.kd_weight", d.kd_weight, "kd_weight and ce_weight are both 0",
               "set distill.kd_weight=1.0")
    if ds.name != "none":
        _check(cmd in DEEPSPEED_COMMANDS, "deepspeed", ds.name, f"`sapling {cmd}` runs in one process",
               f"drop deepspeed= (DeepSpeed engines drive {' and '.join(DEEPSPEED_COMMANDS)})")
        _check(cfg.prune.rounds == 1, "prune.rounds", cfg.prune.rounds, "iterative pruning runs in one process",
               "prune in rounds with deepspeed=none, then distil the result with deepspeed=...")


def _check_pruning(cfg: DictConfig) -> None:
    """Rounds only where the command distils between them, within trainer.max_steps; `sapling prune` has a target."""
    cmd, p = cfg.command, cfg.prune
    # (the pipeline's distill stage spends trainer.max_steps as `sapling distill` does)
    if p.round_steps is not None and cmd in ("distill", "pipeline"):
        steps = list(p.round_steps)
        _check(sum(steps) < cfg.trainer.max_steps, "prune.round_steps", steps,
               f"uses all of trainer.max_steps={cfg.trainer.max_steps}", "leave steps for the last round")
    if p.rounds > 1:
        _check(cmd == "distill" or (cmd == "pipeline" and "prune" in cfg.hooks.pre), "prune.rounds", p.rounds,
               f"iterative pruning distils between rounds, which `sapling {cmd}` does not",
               "run `sapling distill hooks.pre=[prune] prune.rounds=R` (or keep prune.rounds=1)")
    if cmd == "prune":
        _check(any(v is not None for v in p.target.values()), "prune.target", None, "no target shape given",
               "set e.g. prune.target.intermediate_size=N or prune.target.num_hidden_layers=N")


def _check_teacher(cfg: DictConfig) -> None:
    """The commands that need a teacher have one; `cache.dir` for `sapling cache-teacher`; `teacher.cache`
    only for `sapling distill`, and only where nothing needs the teacher's weights or hidden states."""
    cmd, t = cfg.command, cfg.teacher
    cached = t.cache is not None
    if cmd in ("distill", "prune", "cache-teacher"):
        _check(t.path is not None or t.tiny is not None or (cached and cmd == "distill"),
               "teacher.path", None, f"{cmd} needs a teacher",
               "pass teacher.path=<HF checkpoint dir or hub id>" + (" or teacher.cache=<cache dir>" if cmd == "distill"
                                                                    else ""))
    if cmd == "cache-teacher":
        _check(cfg.cache.dir is not None, "cache.dir", None, "no output directory for the cache",
               "pass cache.dir=<directory> (created if missing; a rerun resumes it)")
        _check(not cached, "teacher.cache", t.cache, "cache-teacher reads a teacher model",
               "drop teacher.cache and pass teacher.path=<checkpoint>")
    if not cached:
        return
    _check(cmd == "distill", "teacher.cache", t.cache, f"`sapling {cmd}` does not read teacher caches",
           "use it with `sapling distill teacher.cache=<dir> ...`")
    _check(Path(os.path.expanduser(t.cache)).is_dir(), "teacher.cache", t.cache, "no such directory",
           "point it at a `sapling cache-teacher` cache.dir")
    op = cfg.distill.on_policy
    _check(op.fraction == 0 and not op.teacher_samples, "distill.on_policy.fraction", op.fraction,
           "the teacher scores (or writes) samples, which a cache cannot",
           "set distill.on_policy.fraction=0 teacher_samples=false, or distil from teacher.path without teacher.cache")
    _check(cfg.distill.features.weight == 0, "distill.features.weight", cfg.distill.features.weight,
           "feature distillation needs the teacher's hidden states, which a cache does not hold",
           "set distill.features.weight=0, or distil from teacher.path without teacher.cache")
    if "prune" in cfg.hooks.pre:
        _check(t.path is not None or t.tiny is not None, "teacher.path", None,
               "hooks.pre=[prune] prunes the teacher's weights, which a cache does not hold",
               "also pass teacher.path=<the checkpoint the cache was written from> (used for pruning only)")


def _check_quantizing(cfg: DictConfig) -> None:
    """`quant.aware` only where the command trains; guided GPTQ has a teacher; `sapling quantize` has a
    full-precision model and (for GPTQ or the report) data."""
    q, cmd = cfg.quant, cfg.command
    quantizing = cmd == "quantize" or "quantize" in cfg.hooks.post or (cmd == "pipeline" and cfg.pipeline.quantize)
    if q.aware:
        _check(cmd in ("distill", "train"), "quant.aware", q.aware, f"`sapling {cmd}` does not train",
               "use quant.aware=true with `sapling distill` (then hooks.post=[quantize] exports it)")
    if quantizing and q.guided:
        _check(cfg.teacher.path is not None or cfg.teacher.tiny is not None or cmd == "pipeline", "quant.guided",
               q.guided, "distillation-guided GPTQ needs the teacher's distributions on the calibration data",
               "pass teacher.path=<teacher checkpoint>, or drop quant.guided")
        _check(q.method != "rtn", "quant.method", q.method, "guided saliency weights GPTQ's Hessians; rtn has none",
               "use quant.method=gptq (or auto) with quant.guided=true")
    if cmd == "quantize":
        _check(cfg.model.path is not None, "model.path", None, "quantize needs a model",
               "pass model.path=<HF checkpoint dir, e.g. a distill run's output_dir/model>")
        _check(not is_quantized_dir(cfg.model.path), "model.path", cfg.model.path,
               "is already quantized (its config.json has a quantization_config)",
               "quantize the full-precision model it was made from (e.g. the distill run's output_dir/model)")
        gptq = q.method == "gptq" or (q.method == "auto" and not q.aware)
        _check(not (gptq or q.eval) or has_data(cfg.data), "data.files", None,
               "GPTQ calibration and the perplexity report need data", "pass data.files=[...] (or quant.method=rtn "
               "quant.eval=false to quantize without data)")


def _check_inputs(cfg: DictConfig) -> None:
    """`sapling train|eval` have a model, the hooks exist, the commands that read data have some."""
    cmd = cfg.command
    if cmd in ("train", "eval"):
        _check(cfg.model.path is not None or cfg.model.tiny is not None, "model.path", None,
               f"{cmd} needs a model", "pass model.path=<HF checkpoint dir> (or model.tiny=<name> to train from scratch)")
    if cmd == "eval":
        chat = cfg.data.format == "chat" or any(dict(e).get("format") == "chat" for e in cfg.data.mix)
        _check(not chat, "data.format", "chat", "sapling eval scores plain text in sliding windows, not the "
               "assistant turns of conversations", "score chat data by the validation loss of a train/distill run "
               "(assistant tokens only, val_loss in metrics.jsonl), or evaluate text with data.format=text")
    from sapling.recipes.hooks import available

    for stage in ("pre", "post"):
        for i, name in enumerate(cfg.hooks[stage]):
            _check(name in available(stage), f"hooks.{stage}[{i}]", name, f"no {stage}-hook of that name",
                   f"use one of {available(stage) or '(none yet)'}")
    if cmd in ("train", "prune", "eval", "cache-teacher") or (cmd == "distill" and cfg.teacher.cache is None):
        _check_data_given(cfg.data)


def _local_source(src: Any) -> bool:
    """A model source whose config can be read here and now: a tiny name or a local checkpoint directory."""
    if src.path is None:
        return src.tiny is not None
    from sapling.models.gguf import is_gguf

    path = Path(os.path.expanduser(src.path))
    return path.is_dir() or (is_gguf(path) and path.is_file())


def check_moe_quantization(cfg: DictConfig) -> None:
    """Quantizing a mixture-of-experts model is refused before anything loads: its fused experts stay 16-bit
    and transformers cannot reload the compressed-tensors export (the per-expert weights are not converted
    back under a quantization config)."""
    cmd = cfg.command
    if cmd == "quantize":
        sources = [("model.path", cfg.model)]
    elif "quantize" in cfg.hooks.post or (cmd == "pipeline" and cfg.pipeline.quantize):
        sources = [("teacher.path", cfg.teacher), ("student.path", cfg.student)]
    else:
        return
    from sapling.models.families import is_moe
    from sapling.models.hf import source_config

    for key, src in sources:
        if not _local_source(src):
            continue
        try:
            model_cfg = source_config(src)
        except SaplingError:  # an unreadable config is reported, with its fix, where the model loads
            continue
        if is_moe(model_cfg):
            fix = "drop hooks.post=[quantize] (or pipeline.quantize=false)" if cmd != "quantize" else \
                "keep the model 16-bit (sapling distill without hooks.post=[quantize])"
            _check(False, key, src.path or src.tiny, f"is a {model_cfg.model_type} mixture-of-experts model, "
                   "which Sapling does not quantize yet (its experts' compressed-tensors export does not reload)", fix)


def check_model_shapes(cfg: DictConfig) -> None:
    """The shapes of the models a command will build, checked (`check_shape`) on their HF configs read from
    tiny names and local checkpoints, before the command imports its training stack or reads any data.

    The commands run the same checks again once every config is known (hub ids, `teacher.cache`, the
    demo teacher's vocabulary): `sapling.recipes.common.student_config` and `check_prune_target`.
    """
    cmd, seq_len = cfg.command, cfg.data.seq_len
    if cmd not in ("train", "distill", "prune", "cache-teacher", "pipeline"):
        return
    from sapling.models.hf import source_config
    from sapling.models.shapes import check_shape, check_source_shape
    from sapling.prune.select import check_prune_shape

    if cmd == "train":
        if _local_source(cfg.model):
            check_source_shape("model.config", cfg.model, source_config(cfg.model), seq_len=seq_len)
        return
    if (cfg.teacher.cache is not None and cmd == "distill") or not _local_source(cfg.teacher):
        return
    teacher_cfg = source_config(cfg.teacher)
    check_shape("teacher.config", teacher_cfg, seq_len=seq_len)
    if cmd == "prune" or (cmd in ("distill", "pipeline") and "prune" in cfg.hooks.pre):
        check_prune_shape(teacher_cfg, OmegaConf.to_container(cfg.prune.target, resolve=True), seq_len=seq_len)
    elif cmd in ("distill", "pipeline") and (cfg.student.path is None or _local_source(cfg.student)):
        base = teacher_cfg if cfg.student.path is None else None
        check_source_shape("student.config", cfg.student, source_config(cfg.student, base=base), base=base,
                           seq_len=seq_len)


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
