"""Chat data end to end (issue 21.1): conversations packed whole per block with position ids restarting per
conversation, labels on the assistant's tokens only, a packed block's logits equal to each conversation's alone,
and `sapling distill data.format=chat` training on them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sapling.data import ResumableLoader, build_packed_data
from sapling.data.chat import ChatFormat, render_chat
from sapling.data.demo import stdlib_chat
from sapling.data.pack import pack_documents


@pytest.fixture
def chat_tokenizer(tokenizer, chatml_template):
    tok = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    tok.chat_template = chatml_template
    return tok


@pytest.fixture
def chat_file(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in stdlib_chat(40)))
    return path


def test_pack_documents_keeps_documents_whole_and_restarts_positions():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 17, size=50)
    lengths[7] = 45  # longer than a block: cut into 16 + 16 + 13
    stream = np.arange(int(lengths.sum()), dtype=np.int64) + 1
    tokens, flags, positions, cut = pack_documents(stream, lengths, None, 16, pad_id=0)
    assert cut == 1 and tokens.shape[1] == 16
    assert sorted(tokens[tokens > 0].tolist()) == stream.tolist()  # every token once, nothing else but pads
    flat, pos, lab = tokens.ravel(), positions.ravel(), flags.ravel()
    starts = np.cumsum(lengths) - lengths
    for s, n in zip(starts.tolist(), lengths.tolist()):
        for off in range(0, n, 16):  # each piece sits in one block, positions 0.., its first token no label
            i = int(np.flatnonzero(flat == stream[s + off])[0])
            m = min(16, n - off)
            assert i // 16 == (i + m - 1) // 16
            assert flat[i:i + m].tolist() == stream[s + off:s + off + m].tolist()
            assert pos[i:i + m].tolist() == list(range(m))
            assert not lab[i] and lab[i + 1:i + m].all()
    assert not lab[flat == 0].any()  # padding is never a label


def test_chat_blocks_label_exactly_the_assistant_tokens(chat_tokenizer, chat_file, tmp_path):
    fmt = ChatFormat()
    data = build_packed_data([str(chat_file)], chat_tokenizer, 192, format="chat", chat=fmt, val_fraction=0.1,
                             cache_dir=str(tmp_path / "cache"))
    assert data.meta["packing"] == "per_document" and data.meta["train_cut_docs"] == 0
    rows = stdlib_chat(40)
    want = sum(sum(render_chat(r["messages"], chat_tokenizer)[1]) for r in rows)
    assert data.meta["train_label_tokens"] + data.meta["val_label_tokens"] == want
    answers = {m["content"] + "<|im_end|>" for r in rows for m in r["messages"] if m["role"] == "assistant"}
    batch = data.train.batch(range(len(data.train)))
    ids, labels, pos = batch["input_ids"], batch["labels"], batch["position_ids"]
    for b in range(len(ids)):
        runs, cur = [], []
        for t in range(ids.shape[1]):
            if labels[b, t] != -100:
                assert labels[b, t] == ids[b, t] and pos[b, t] > 0
                cur.append(int(ids[b, t]))
            elif cur:
                runs, cur = runs + [cur], []
        runs += [cur] if cur else []
        assert all(chat_tokenizer.decode(r) in answers for r in runs)
    again = build_packed_data([str(chat_file)], chat_tokenizer, 192, format="chat", chat=fmt, val_fraction=0.1,
                              cache_dir=str(tmp_path / "cache"))  # from the cache: the same masks and positions
    assert isinstance(again.train.label_mask, np.memmap)
    for a, b in ((data.train.label_mask, again.train.label_mask), (data.val.positions, again.val.positions)):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    loader = iter(ResumableLoader(again.train, 4, seed=0))
    mb = next(loader)
    assert set(mb) == {"input_ids", "labels", "position_ids", "index"} and (mb["labels"] == -100).any()


def test_a_packed_block_gives_each_conversation_its_own_logits(chat_tokenizer, chat_file):
    from transformers import AutoModelForCausalLM

    from sapling.models import tiny_config

    torch.manual_seed(0)
    cfg = tiny_config("llama-tiny", vocab_size=len(chat_tokenizer), hidden_size=64, num_hidden_layers=2)
    cfg._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(cfg).eval()
    data = build_packed_data([str(chat_file)], chat_tokenizer, 384, format="chat", val_fraction=0.0)
    batch = data.train.batch([0])
    ids, pos = batch["input_ids"], batch["position_ids"]
    starts = torch.nonzero(pos[0] == 0).flatten().tolist() + [ids.shape[1]]
    assert len(starts) >= 3  # at least two conversations (and the padding) share the block
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=pos).logits[0]
        unpacked = model(input_ids=ids).logits[0]
        for s, e in zip(starts[:-2], starts[1:-1]):  # every conversation (the last segment is padding)
            alone = model(input_ids=ids[:, s:e]).logits[0]
            torch.testing.assert_close(packed[s:e], alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(packed[starts[1]:starts[2]], unpacked[starts[1]:starts[2]], atol=1e-3)


def test_distill_trains_on_chat_data(sapling_main, teacher_dir, chat_tokenizer, chat_file, tmp_path,
                                     chatml_template):
    template = tmp_path / "template.jinja"
    template.write_text(chatml_template)
    code, err = sapling_main("distill", f"teacher.path={teacher_dir}", "student.config.num_hidden_layers=1",
                             f"data.files=[{chat_file}]", "data.format=chat", f"data.chat_template={template}",
                             "data.seq_len=192", "data.val_fraction=0.1", "trainer.max_steps=8",
                             "trainer.micro_batch_size=4", "trainer.eval_every=8", "trainer.lr=3e-3", "trainer.log_every=1",
                             "output_dir=out", "logger=none", "trainer.progress=false")
    assert code == 0, err
    recs = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r.get("event") == "train"]
    assert train[-1]["kd"] < train[0]["kd"]
    assert all(0 < r["label_tokens"] < 0.6 * 4 * 192 for r in train)  # the loss counts assistant tokens only
    tok = type(chat_tokenizer).from_pretrained(str(teacher_dir))  # the run's: the teacher's, with the template
    data = build_packed_data([str(chat_file)], tok, 192, format="chat", chat=ChatFormat(chat_template=chatml_template),
                             val_fraction=0.1)
    evals = [r for r in recs if r.get("event") == "eval"]
    assert evals[-1]["val_tokens"] == data.meta["val_label_tokens"] < 0.6 * data.val.num_tokens  # assistant only


def test_chat_config_errors_name_the_key(sapling_main, teacher_dir, text_files):
    code, err = sapling_main("distill", f"teacher.path={teacher_dir}", f"data.files=[{text_files[0]}]",
                             "data.format=chat")
    assert code == 2 and "data.files" in err and "data.format=text" in err
    code, err = sapling_main("distill", f"teacher.path={teacher_dir}", f"data.files=[{text_files[0]}]",
                             "data.packing=documents")
    assert code == 2 and "data.packing='documents'" in err and "per_document" in err


def test_eval_refuses_chat_data_naming_the_key(sapling_main, teacher_dir, chat_file):
    code, err = sapling_main("eval", f"model.path={teacher_dir}", f"data.files=[{chat_file}]", "data.format=chat")
    assert code == 2 and "data.format='chat'" in err and "val_loss" in err
