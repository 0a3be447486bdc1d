"""The demo's corpus and tokenizer, built offline: this Python's standard-library sources as a jsonl, and a
byte-level BPE tokenizer trained on them (both cached by content, so every run and test shares them)."""

from __future__ import annotations

import hashlib
import json
import sys
import sysconfig
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sapling.errors import DataError
from sapling.io import write_dir_atomically, write_text_atomically

EOS = "<|endoftext|>"


def content_key(*parts: Any) -> str:
    """sha256 of the parts as sorted JSON: the cache key of something built from them."""
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()


def cached_dir(final: Path, build: Callable[[Path], None]) -> Path:
    """`final` if it exists; else `build(tmp)` fills a temp dir beside it, which is then renamed to `final`."""
    if final.exists():
        return final
    return write_dir_atomically(final, build, keep_existing=True)


def stdlib_corpus(cache: Path, max_bytes: int, subpackages: bool = False) -> Path:
    """A jsonl of this Python's standard-library .py files (one document each), up to `max_bytes`.

    The top-level modules hold about 4.7 MB on CPython 3.11; `subpackages` also takes the packages' modules
    (asyncio/, email/, test/, ...; about 31 MB in all, site-packages excluded) for corpora larger than that.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    if subpackages:
        files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts)
    else:
        files = sorted(p for p in root.glob("*.py"))
    docs, total = [], 0
    for p in files:
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if total + len(text) > max_bytes:
            continue
        docs.append({"text": text, "source": str(p.relative_to(root))})
        total += len(text)
    if not docs:
        raise DataError(f"no readable .py files under {root} for the demo corpus; fix: run the demo with a Python "
                        "that ships its standard library sources, or pass data.files=[...] and data.tokenizer=<dir>")
    key = content_key([d["source"] for d in docs], total, sys.version_info[:2])[:12]
    final = cache / f"corpus-{key}.jsonl"
    if not final.exists():
        write_text_atomically(final, "".join(json.dumps(d) + "\n" for d in docs))
    return final


def train_bpe_tokenizer(corpus: Path, vocab_size: int, cache: Path) -> Path:
    """A byte-level BPE tokenizer trained on `corpus`, saved as a transformers tokenizer directory."""
    key = content_key(corpus.name, vocab_size)[:12]

    def build(tmp: Path) -> None:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())

        def texts():
            with open(corpus) as f:
                for line in f:
                    yield json.loads(line)["text"]

        tok.train_from_iterator(texts(), trainer=trainer)
        PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS,
                                pad_token=EOS).save_pretrained(tmp)

    return cached_dir(cache / f"tokenizer-{key}", build)


def stdlib_chat(n: int, modules: tuple[str, ...] = ("textwrap", "json", "inspect", "string", "shutil")) -> list[dict]:
    """Up to `n` short two-turn conversations about public names of standard-library modules, answered with the
    first sentence of their docstrings (`{"messages": [...]}` rows): chat data every machine can build."""
    import importlib
    import inspect

    rows = []
    for module_name in modules:
        module = importlib.import_module(module_name)
        for name, obj in sorted(vars(module).items()):
            doc = inspect.getdoc(obj) if callable(obj) and not name.startswith("_") else None
            if doc:
                rows.append({"messages": [
                    {"role": "user", "content": f"{name}?"},
                    {"role": "assistant", "content": doc.strip().split(".")[0][:60] + "."},
                    {"role": "user", "content": "Class?"},
                    {"role": "assistant", "content": "Yes." if inspect.isclass(obj) else "No."}]})
    return rows[:n]
