"""Shared fixtures: a real byte-level BPE tokenizer, a corpus and a tiny teacher checkpoint, all built offline."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
# `python -m pytest` from the checkout puts it first on sys.path, where `kernels/` would shadow the
# installed `kernels` package that transformers imports (see sapling._paths).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO]


def pytest_configure(config: pytest.Config) -> None:
    """Run Triton kernels under its CPU interpreter unless GPU tests were asked for (`-m gpu`).

    Triton reads TRITON_INTERPRET when it is first imported, and some of our dependencies (DeepSpeed)
    import it: setting it here, before any test module is collected, keeps the whole run consistent.
    """
    markexpr = config.getoption("markexpr") or ""
    wants_gpu = re.search(r"(?<!not )\bgpu\b", markexpr) is not None
    if not wants_gpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def corpus_file(demo_cache) -> Path:
    from sapling.data.demo import stdlib_corpus

    return stdlib_corpus(demo_cache, 250_000)


@pytest.fixture(scope="session")
def tokenizer_dir(corpus_file, demo_cache) -> Path:
    from sapling.data.demo import train_bpe_tokenizer

    return train_bpe_tokenizer(corpus_file, 384, demo_cache)


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from sapling.models import load_tokenizer

    return load_tokenizer(str(tokenizer_dir))


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory, tokenizer) -> Path:
    """A randomly initialised tiny Llama saved as an HF checkpoint with the tokenizer."""
    from transformers import AutoModelForCausalLM

    from sapling.models import save_hf_checkpoint, tiny_config

    torch.manual_seed(0)
    cfg = tiny_config("llama-tiny", vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2)
    model = AutoModelForCausalLM.from_config(cfg)
    return save_hf_checkpoint(model, tokenizer, tmp_path_factory.mktemp("teacher") / "model")


@pytest.fixture(scope="session")
def text_files(tmp_path_factory, corpus_file) -> list[Path]:
    """A few .txt documents and a .jsonl, cut from the corpus."""
    root = tmp_path_factory.mktemp("text")
    docs = [json.loads(line)["text"] for line in corpus_file.read_text().splitlines()][:12]
    paths = []
    for i, d in enumerate(docs[:6]):
        p = root / f"doc{i}.txt"
        p.write_text(d)
        paths.append(p)
    j = root / "more.jsonl"
    j.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[6:]))
    paths.append(j)
    return paths


@pytest.fixture
def cli(tmp_path, demo_cache):
    """Run `python -m sapling ...` in a subprocess (cwd tmp_path, cache in the session cache); not checked."""

    def run(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "SAPLING_CACHE": str(demo_cache), **(env or {})}
        return subprocess.run([sys.executable, "-m", "sapling", *args], cwd=tmp_path, env=full_env,
                              capture_output=True, text=True, timeout=timeout)

    return run


# A small teacher cache: 698 training blocks of 32 tokens in 7 shards of 100 (the last one short), top-16.
TEACHER_CACHE_ARGS = ("data.seq_len=32", "data.max_tokens=12000", "cache.shard_sequences=100", "cache.top_k=16",
                      "trainer.micro_batch_size=8", "logger=none", "trainer.progress=false")


@pytest.fixture(scope="session")
def teacher_cache(tmp_path_factory, teacher_dir, corpus_file, run_sapling) -> dict:
    """`sapling cache-teacher` of the tiny teacher on the corpus (one process: this one); {"dir", "args", "run"}."""
    root = tmp_path_factory.mktemp("teacher_cache")
    args = [f"teacher.path={teacher_dir}", f"data.files=[{corpus_file}]", *TEACHER_CACHE_ARGS]
    code = run_sapling(root, "cache-teacher", *args, f"cache.dir={root / 'cache'}", f"hydra.run.dir={root / 'run'}")
    assert code == 0, "sapling cache-teacher failed (its stderr is in the captured output)"
    return {"dir": root / "cache", "args": args, "run": root / "run"}


@pytest.fixture(scope="session")
def run_sapling(demo_cache):
    """`run_sapling(cwd, *args)`: `sapling ...` through `sapling.cli.main` in this process, for fixtures wider than
    one test (which `sapling_main` cannot serve) whose runs need no process of their own; returns the exit code
    (the run's stderr goes to pytest's captured output, shown when the fixture fails)."""

    def run(cwd: Path, *args: str) -> int:
        from sapling.cli import main

        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(cwd)
            mp.setenv("SAPLING_CACHE", str(demo_cache))
            mp.setattr(sys, "argv", list(sys.argv))  # main() rewrites it for Hydra
            try:
                main(list(args))
            except SystemExit as exc:
                return int(exc.code or 0)
        return 0

    return run


@pytest.fixture
def sapling_main(tmp_path, demo_cache, monkeypatch, capsys):
    """Run `sapling ...` through `sapling.cli.main` in this process (imports already paid for: seconds
    faster than `cli`); returns (exit code, stderr). Use `cli` where a real process matters (signals)."""

    def run(*args: str, env: dict | None = None) -> tuple[int, str]:
        from sapling.cli import main

        monkeypatch.chdir(tmp_path)
        monkeypatch.setenv("SAPLING_CACHE", str(demo_cache))
        for key, value in (env or {}).items():
            monkeypatch.setenv(key, value)
        monkeypatch.setattr(sys, "argv", list(sys.argv))  # main() rewrites it for Hydra
        capsys.readouterr()
        try:
            main(list(args))
            code = 0
        except SystemExit as exc:
            code = int(exc.code or 0)
        finally:
            for key in env or {}:
                monkeypatch.delenv(key)
        return code, capsys.readouterr().err

    return run


@pytest.fixture
def cli_in_process(sapling_main):
    """`cli`'s interface (returncode, stderr) over `sapling_main`: for runs that fail or finish in seconds and
    need no process of their own (no signals, no stdout), where a subprocess's imports would dominate."""
    import types

    def run(*args: str, env: dict | None = None, timeout: int | None = None) -> types.SimpleNamespace:
        code, err = sapling_main(*args, env=env)
        return types.SimpleNamespace(returncode=code, stderr=err, stdout="")

    return run


@pytest.fixture(scope="session")
def load_benchmark():
    """`load_benchmark("efficiency")`: benchmarks/efficiency.py as a module (benchmarks/ is not a package; its
    sibling imports resolve while it loads)."""
    import importlib.util
    import sys

    bench = Path(__file__).resolve().parents[1] / "benchmarks"

    def load(name: str):
        sys.path.insert(0, str(bench))
        try:
            spec = importlib.util.spec_from_file_location(f"{name}_bench", bench / f"{name}.py")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
        finally:
            sys.path.remove(str(bench))

    return load


@pytest.fixture(scope="session")
def chatml_template() -> str:
    """A ChatML-style chat template whose markers are plain text, so any tokenizer renders it."""
    return ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
