"""Load and save Hugging Face causal LMs and tokenizers; resolve a model's config without its weights."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import os
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)

from sapling.errors import ConfigError, ModelSourceError
from sapling.io import write_dir_atomically
from sapling.models.gguf import gguf_config, hf_checkpoint, is_gguf
from sapling.models.init_scope import model_init_scope
from sapling.models.placement import place
from sapling.models.tiny import tiny_config

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` is bf16 on CUDA and fp32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


def _plain(overrides: Any) -> dict[str, Any]:
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(overrides):
            overrides = OmegaConf.to_container(overrides, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return {k: v for k, v in dict(overrides or {}).items() if v is not None}


def changed_fields(src: Any) -> dict[str, tuple[Any, Any]]:
    """Config overrides of a model source that differ from its checkpoint's config: {field: (checkpoint, override)}.

    With `init=auto` such overrides mean "this architecture at another shape, randomly initialised", which is
    almost never what a `path` plus a leftover override (e.g. an experiment preset's shape) was meant to do:
    `build_model` refuses that case instead of silently training from a random model.
    """
    given = _plain(src.config)
    if src.path is None or not given:
        return {}
    base = load_config(src.path)
    return {k: (getattr(base, k, None), v) for k, v in given.items() if getattr(base, k, None) != v}


def config_fields(config: PretrainedConfig) -> set[str]:
    """The fields `config`'s class knows (dataclass fields, `attribute_map` aliases, a default instance's
    `to_dict` keys) and those `config` itself carries (a checkpoint's own extra fields)."""
    cls = type(config)
    names = set(config.to_dict()) | set(getattr(cls, "attribute_map", None) or {})
    if dataclasses.is_dataclass(cls):
        names |= {f.name for f in dataclasses.fields(cls)}
    with contextlib.suppress(Exception):  # a class that needs arguments: the fields above are its fields
        names |= set(cls().to_dict())
    return {n for n in names if not n.startswith("_")} - {"model_type", "transformers_version"}


def apply_overrides(config: PretrainedConfig, overrides: Any, key: str = "config") -> PretrainedConfig:
    """A copy of `config` with HF config fields replaced (e.g. {"num_hidden_layers": 2}).

    Only fields the config class knows are accepted (`key`.<field> names a typo in the ConfigError): any
    other attribute would be ignored by the model and written into its config.json.
    """
    config = copy.deepcopy(config)
    given = _plain(overrides)
    known = config_fields(config) if given else set()
    for name, value in given.items():
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            inside = next((f for f in sorted(known) if isinstance(getattr(config, f, None), dict)
                           and name in getattr(config, f)), None)  # rope_theta lives in rope_parameters
            fix = (f"did you mean {key}.{close[0]}?" if close else
                   f"it is a key of {key}.{inside} (now {getattr(config, inside)}): give that whole dict" if inside else
                   f"use a field of {type(config).__name__} (see the model's config.json)")
            raise ConfigError(f"{key}.{name}", value, f"{type(config).__name__} (model_type {config.model_type}) "
                              "has no such field: the model would ignore it", fix)
        try:
            setattr(config, name, value)
        except Exception as err:  # noqa: BLE001  (transformers' strict fields raise StrictDataclassFieldValidationError)
            cause = " ".join(str(err.__cause__ or err).split())[:200]
            raise ConfigError(f"{key}.{name}", value, f"refused by {type(config).__name__} ({cause})",
                              f"give {key}.{name} a value of the field's type") from err
    # Llama-style configs store head_dim = hidden_size // num_attention_heads; a changed width or head
    # count changes it too, unless head_dim is given. Left as None when not divisible, so validation
    # (check_shape) reports it instead of silently building a different model.
    width_changed = ("hidden_size" in given or "num_attention_heads" in given) and "head_dim" not in given
    derived = config.model_type in ("llama", "mistral", "qwen2") and getattr(config, "head_dim", None) is not None
    if width_changed and derived:
        divisible = config.hidden_size % config.num_attention_heads == 0
        config.head_dim = config.hidden_size // config.num_attention_heads if divisible else None
    return config


def _reason(err: BaseException) -> str:
    """An exception's type and first line, capped: transformers' messages run over many lines."""
    text = (str(err).strip().splitlines() or [""])[0]
    text = f"{type(err).__name__}: {text}" if text else type(err).__name__
    return text if len(text) <= 200 else text[:190] + "..."


def load_config(path: str) -> PretrainedConfig:
    """`AutoConfig` of a checkpoint directory, hub id or GGUF file; one that cannot be read is a ModelSourceError
    naming it."""
    if is_gguf(path):
        return gguf_config(path)
    try:
        return AutoConfig.from_pretrained(os.path.expanduser(path))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ModelSourceError(f"cannot read the model config of {path} ({_reason(err)}); fix: point the path at a "
                               "directory written by save_pretrained (config.json and weights), or download the hub "
                               "model first and pass its local directory") from err


def source_config(src: Any, base: PretrainedConfig | None = None) -> PretrainedConfig:
    """The HF config a model source describes (`path`, `tiny`, or `base` + overrides), weights untouched.

    Errors in the overrides name the source's own key (`student.config.<field>`) when `src` is a node of
    the composed config."""
    if src.path is not None:
        config = load_config(src.path)
    elif src.tiny is not None:
        config = tiny_config(src.tiny)
    elif base is not None:
        config = base
    else:
        raise ModelSourceError("a model source has neither path nor tiny, and no base config to derive from; fix: "
                               "pass <teacher|student|model>.path=<HF checkpoint dir> (or .tiny=<name>)")
    try:
        key = src._get_full_key("config") or "config"  # OmegaConf node: `student.config`
    except AttributeError:
        key = "config"
    return apply_overrides(config, src.config, key=key)


def resolve_attn_implementation(name: str, device: torch.device, dtype: torch.dtype,
                                config: PretrainedConfig | None = None) -> str:
    """`auto`: flash_attention_2 on CUDA in bf16/fp16 when flash-attn is installed, else sdpa, or eager for a
    model class without SDPA support (Gemma 2, whose attention logits are softcapped)."""
    if name != "auto":
        return name
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        import importlib.util

        if importlib.util.find_spec("flash_attn") is not None:
            return "flash_attention_2"
    if config is not None:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

        cls = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
        if cls is not None and not getattr(cls, "_supports_sdpa", True):
            return "eager"
    return "sdpa"


def build_model(
    src: Any,
    config: PretrainedConfig,
    device: torch.device,
    *,
    seed: int = 0,
    ds_config: dict | None = None,
) -> torch.nn.Module:
    """Load pretrained weights from `src.path`, or initialise `config` randomly (seeded) when there are none.

    `src.init`: `auto` loads weights when a path is given (and the shape was not overridden),
    `random` always initialises from `config`, `pretrained` requires a path.
    `ds_config`: the DeepSpeed config of the engine this model will run in; with ZeRO-3 the model is
    built partitioned (`deepspeed.zero.Init`: weights go straight into each rank's shard) and left where
    DeepSpeed put it.
    """
    dtype = resolve_dtype(src.dtype, device)
    attn = resolve_attn_implementation(src.attn_implementation, device, dtype, config)
    pretrained = src.init == "pretrained" or (src.init == "auto" and src.path is not None
                                              and not changed_fields(src))
    if src.init == "auto" and src.path is not None and not pretrained:
        diff = ", ".join(f"config.{k}={v!r} (checkpoint: {c!r})" for k, (c, v) in changed_fields(src).items())
        raise ModelSourceError(f"{src.path}: {diff} change the checkpoint's shape, so init=auto would build a randomly "
                         "initialised model; drop those overrides (set them to null) to load the checkpoint, or set "
                         "init=random if a random model of that shape is what you want")
    with model_init_scope(ds_config) as partitioned:
        if pretrained:
            if src.path is None:
                raise ModelSourceError("init=pretrained needs a path; fix: pass the checkpoint's path, or use init=auto")
            model = _from_pretrained(src.path, config=config, dtype=dtype, attn_implementation=attn)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                config = copy.deepcopy(config)
                config._attn_implementation = attn
                model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model if partitioned else place(model, device)


def _from_pretrained(path: str, **kwargs: Any) -> torch.nn.Module:
    """`AutoModelForCausalLM.from_pretrained`; a missing, truncated or mismatched checkpoint is a ModelSourceError."""
    from safetensors import SafetensorError

    if is_gguf(path):
        path = str(hf_checkpoint(path))  # converted once, then loaded like any checkpoint (in the source's dtype)
    try:
        return AutoModelForCausalLM.from_pretrained(os.path.expanduser(path), **kwargs)
    except (SafetensorError, OSError, EOFError) as err:
        raise ModelSourceError(f"cannot load the weights of {path} ({_reason(err)}): a weight file is truncated, "
                               "corrupt or missing; fix: copy or download the checkpoint again (or set init=random "
                               "for a randomly initialised model of its config)") from err
    except (ValueError, RuntimeError) as err:
        if isinstance(err, torch.OutOfMemoryError):
            raise
        raise ModelSourceError(f"cannot load the weights of {path} ({_reason(err)}); fix: check the checkpoint "
                               "against the model settings (config overrides, dtype, attn_implementation)") from err


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """The tokenizer in `path` (a directory, hub id or GGUF file); one that cannot be loaded is a ModelSourceError."""
    if is_gguf(path):
        path = str(hf_checkpoint(path))
    try:
        tok = AutoTokenizer.from_pretrained(os.path.expanduser(path))
    except Exception as err:  # noqa: BLE001  (`tokenizers` raises plain Exception on a damaged tokenizer.json)
        if isinstance(err, MemoryError):
            raise
        raise ModelSourceError(f"cannot load a tokenizer from {path} ({_reason(err)}); fix: copy the tokenizer files "
                               "(tokenizer.json, tokenizer_config.json) into it, or pass data.tokenizer=<a directory "
                               "that has them>") from err
    if tok.eos_token_id is None:
        raise ModelSourceError(f"tokenizer at {path} has no eos_token (needed to separate packed documents); fix: set "
                               "eos_token in its tokenizer_config.json, or pass data.tokenizer=<a tokenizer with one>")
    return tok


def _tokenizer_source(path: str | None) -> str | None:
    """`path` when a tokenizer can be read from it without loading weights: a directory with tokenizer files
    or a hub id (not a GGUF file, whose tokenizer comes with converting the whole checkpoint)."""
    if path is None or is_gguf(path):
        return None
    local = Path(os.path.expanduser(path))
    if local.exists():
        has = any((local / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
        return str(local) if local.is_dir() and has else None
    return path


def check_same_tokenizer(teacher_path: str | None, other_path: str | None, key: str = "student.path") -> None:
    """Refuse a model whose tokenizer maps some id to another token string than the teacher's (the KD loss
    compares the two distributions id by id), before any weights load; one of them without a tokenizer to read
    (or a GGUF file) is not checked. Extra ids on one side are allowed (padded rows, added tokens)."""
    a, b = _tokenizer_source(teacher_path), _tokenizer_source(other_path)
    if a is None or b is None or a == b:
        return
    ta, tb = load_tokenizer(a), load_tokenizer(b)
    ida = {i: s for s, i in ta.get_vocab().items()}
    idb = {i: s for s, i in tb.get_vocab().items()}
    for i in range(min(len(ta), len(tb))):
        if ida.get(i) != idb.get(i):
            raise ConfigError(key, other_path, f"its tokenizer is not the teacher's: token id {i} is {idb.get(i)!r} "
                              f"there and {ida.get(i)!r} in teacher.path={teacher_path} (the KD loss compares the "
                              "distributions id by id)", "distil into a model that uses the teacher's tokenizer")


def save_hf_checkpoint(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase | None, out_dir: str | os.PathLike,
    *, state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write config.json, *.safetensors and tokenizer files atomically: temp dir, then rename.

    `state_dict` replaces the model's own weights (e.g. consolidated from ZeRO-3 shards; `model` then
    only supplies the config and the names of tied weights).
    """
    def build(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    return write_dir_atomically(out_dir, build)


def count_parameters(model: torch.nn.Module) -> int:
    """Unique parameters (tied embeddings counted once; ZeRO-3 partitioned ones by their full size)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in {id(p): p for p in model.parameters()}.values())


def decoder_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Linear]:
    """The causal LM's decoder stack (returns final hidden states) and its lm_head."""
    decoder = getattr(model, model.base_model_prefix)
    head = model.get_output_embeddings()
    if head is None:
        raise ModelSourceError(f"{type(model).__name__} has no output embeddings (lm_head): Sapling trains causal LMs "
                               "with an lm_head; fix: use a *ForCausalLM checkpoint")
    return decoder, head
