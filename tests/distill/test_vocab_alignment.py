"""Teacher and student that differ only in padded vocabulary rows are aligned on the tokenizer's size (the
rows past it get no probability); a real tokenizer mismatch is refused before any model loads (issue 20.4)."""

from __future__ import annotations

import json
import re
import shutil
from types import SimpleNamespace

import pytest
import torch

from sapling.errors import ConfigError
from sapling.models import check_same_tokenizer, save_hf_checkpoint, tiny_config
from sapling.models.shapes import check_vocab


def _model(vocab: int, seed: int, **kw):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config("llama-tiny", vocab_size=vocab, hidden_size=32, num_hidden_layers=1, intermediate_size=64,
                      num_attention_heads=2, num_key_value_heads=1, **kw)
    return AutoModelForCausalLM.from_config(cfg).double()


def test_check_vocab():
    t, s = tiny_config("llama-tiny", vocab_size=520), tiny_config("llama-tiny", vocab_size=512)
    assert check_vocab(t, tiny_config("llama-tiny", vocab_size=520)) is None  # same rows: all of them
    assert check_vocab(t, s, 500) == 500
    with pytest.raises(ConfigError, match=r"^student\.config\.vocab_size=512: .*teacher vocab 520"):
        check_vocab(t, s)
    with pytest.raises(ConfigError, match=r"^model\.config\.vocab_size=512: .*tokenizer's 516 tokens do not fit"):
        check_vocab(t, s, 516, key="model.config.vocab_size")


def test_aligned_loss_equals_float64_reference():
    """KD over the first n ids of each model's own logits (fp64), CE too; padded rows get no gradient."""
    from sapling.distill.step import loss_on_batch
    from sapling.models import install_kd_head

    n = 300
    teacher, student = _model(320, 0), _model(312, 1)
    ids = torch.randint(0, n, (2, 12))
    labels = ids.clone()
    labels[0, :3] = -100
    install_kd_head(student, "student").kd_vocab = n
    cfg = SimpleNamespace(kd_weight=1.0, ce_weight=0.5, divergence="forward_kl", beta=0.5, temperature=2.0,
                          chunk_size=None)
    loss, parts = loss_on_batch(student, teacher, {"input_ids": ids, "labels": labels}, cfg)
    loss.backward()

    with torch.no_grad():
        zt = teacher(ids).logits[:, :-1, :n].reshape(-1, n) / 2.0
    zs = student(ids).logits[:, :-1, :n].reshape(-1, n)
    y = labels[:, 1:].reshape(-1)
    keep = y != -100
    lp_t, lp_s = zt.log_softmax(-1)[keep], (zs / 2.0).log_softmax(-1)[keep]
    kl = (lp_t.exp() * (lp_t - lp_s)).sum(-1).sum() * 4.0
    ce = torch.nn.functional.cross_entropy(zs[keep], y[keep], reduction="sum")
    ref = (kl + 0.5 * ce) / keep.sum()
    torch.testing.assert_close(loss.detach().double(), ref.detach(), rtol=1e-5, atol=1e-7)
    grad = student.get_output_embeddings().weight.grad
    assert grad[:n].abs().sum() > 0 and grad[n:].abs().sum() == 0


def _swapped_tokenizer(src, dst):
    """A copy of the tokenizer at `src` with two tokens' ids swapped: same size, different strings by id."""
    shutil.copytree(src, dst)
    tj = json.loads((dst / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (dst / "tokenizer.json").write_text(json.dumps(tj))
    return dst, vocab[b], b  # id vocab[b] is b in the copy and a in the original


def test_tokenizer_mismatch_is_refused(tmp_path, tokenizer_dir, tokenizer):
    check_same_tokenizer(str(tokenizer_dir), str(tokenizer_dir))
    other, tid, token = _swapped_tokenizer(tokenizer_dir, tmp_path / "other")
    with pytest.raises(ConfigError, match=rf"^student\.path=.*token id {tid} is {re.escape(repr(token))} there"):
        check_same_tokenizer(str(tokenizer_dir), str(other))
    with pytest.raises(ConfigError, match=r"^model\.path="):
        check_same_tokenizer(str(tokenizer_dir), str(other), "model.path")
    check_same_tokenizer(str(tokenizer_dir), str(tmp_path))  # no tokenizer files there: nothing to compare


QUIET = ("logger=none", "trainer.progress=false", "trainer.eval_every=0", "data.seq_len=64", "trainer.micro_batch_size=2")


def test_distill_and_eval_across_padded_vocabularies(sapling_main, tmp_path, tokenizer, tokenizer_dir,
                                                     teacher_dir, text_files):
    """The session teacher has len(tokenizer) rows; a student with 16 padded rows more distils (KD over the
    tokenizer's ids), and `sapling eval` reports its own perplexity and the KL over the shared ids; a student
    whose tokenizer maps ids to other strings is refused in one line before anything loads."""
    n = len(tokenizer)
    student = save_hf_checkpoint(_model(n + 16, 3).float(), tokenizer, tmp_path / "student")
    data = f"data.files=[{','.join(map(str, text_files[:4]))}]"
    code, err = sapling_main("distill", f"teacher.path={teacher_dir}", f"student.path={student}", data,
                             "trainer.max_steps=3", *QUIET, f"output_dir={tmp_path / 'd'}")
    assert code == 0, err[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "d" / "metrics.jsonl").read_text().splitlines()]
    kd = [r["kd"] for r in rows if "kd" in r]
    assert kd and all(k == k and k > 0 for k in kd)
    assert json.loads((tmp_path / "d" / "model" / "config.json").read_text())["vocab_size"] == n + 16

    code, err = sapling_main("eval", f"model.path={student}", f"teacher.path={teacher_dir}", data,
                             "eval.max_tokens=256", "eval.gen_tokens=0", "data.seq_len=64", f"output_dir={tmp_path / 'e'}")
    assert code == 0, err[-3000:]
    with_teacher = [json.loads(line) for line in (tmp_path / "e" / "metrics.jsonl").read_text().splitlines()]
    code, err = sapling_main("eval", f"model.path={student}", data, "eval.max_tokens=256", "eval.gen_tokens=0", "data.seq_len=64",
                             f"output_dir={tmp_path / 'e2'}")
    assert code == 0, err[-3000:]
    alone = [json.loads(line) for line in (tmp_path / "e2" / "metrics.jsonl").read_text().splitlines()]
    m1 = next(r for r in with_teacher if r.get("model") == "model")
    m2 = next(r for r in alone if r.get("model") == "model")
    assert m1["loss"] == pytest.approx(m2["loss"], rel=1e-6)  # its own perplexity, over all its rows
    assert m1["kl"] > 0 and 0 <= m1["top1_agreement"] <= 1

    other, _, _ = _swapped_tokenizer(tokenizer_dir, tmp_path / "tok")
    for f in other.iterdir():
        shutil.copy(f, student / f.name)
    code, err = sapling_main("distill", f"teacher.path={teacher_dir}", f"student.path={student}", data,
                             "trainer.max_steps=1", *QUIET, f"output_dir={tmp_path / 'x'}")
    assert code == 2 and "student.path=" in err and "token id" in err, err[-3000:]
    assert not (tmp_path / "x").exists()
