"""Data mixtures (issue 21.2): sources sampled by weight, deterministically, resumable mid-epoch at any world
size; each source's tokens counted and its validation loss reported."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sapling.data import ResumableLoader, build_packed_data
from sapling.data.blocks import PackedBlocks, PackedData
from sapling.data.demo import stdlib_chat
from sapling.data.mixture import CHUNK, MixtureOrder, mix_packed_data, quotas


def test_quotas_honour_the_weights_to_one_chunk_position():
    for weights in ([0.7, 0.3], [1, 1, 1], [0.001, 5.0], [3, 1, 0.5, 0.25]):
        q = quotas(weights)
        w = np.asarray(weights) / np.sum(weights)
        assert q.sum() == CHUNK and (q >= 1).all() and np.abs(q / CHUNK - w).max() <= 1 / CHUNK + 1e-12
    with pytest.raises(ValueError, match="weights"):
        quotas([1.0, 0.0])


def test_the_order_is_exact_per_chunk_and_covers_each_source_per_epoch():
    sizes = [37, 5, 200]
    order = MixtureOrder(sizes, [0.5, 0.2, 0.3], seed=3)
    idx = order.indices(0, 3 * CHUNK)
    offsets = np.cumsum([0] + sizes)
    source = np.searchsorted(offsets, idx, side="right") - 1
    for c in range(3):
        assert np.array_equal(np.bincount(source[c * CHUNK:(c + 1) * CHUNK], minlength=3), order.quota)
    for s, n in enumerate(sizes):  # each run of n draws from a source is a permutation of its blocks
        drawn = idx[source == s] - offsets[s]
        for e in range(len(drawn) // n):
            assert sorted(drawn[e * n:(e + 1) * n].tolist()) == list(range(n))
    assert np.array_equal(order.counts_before(2 * CHUNK + 100), np.bincount(source[:2 * CHUNK + 100], minlength=3))
    assert np.array_equal(MixtureOrder(sizes, [0.5, 0.2, 0.3], seed=3).indices(500, 900), idx[500:1400])
    assert not np.array_equal(MixtureOrder(sizes, [0.5, 0.2, 0.3], seed=4).indices(0, 900), idx[:900])


def _loader(blocks, batch, rank, world, sizes):
    return ResumableLoader(blocks, batch, rank=rank, world_size=world, seed=1,
                           mixture=MixtureOrder(sizes, [2.0, 1.0], seed=1))


def test_a_mixed_run_resumes_mid_epoch_at_another_world_size():
    sizes = [11, 7]
    blocks = PackedBlocks(np.arange(sum(sizes) * 4).reshape(-1, 4))
    one = iter(_loader(blocks, 4, 0, 1, sizes))
    want = [next(one)["input_ids"] for _ in range(6)]  # 24 samples: past both sources' first epochs
    two = [_loader(blocks, 2, r, 2, sizes) for r in range(2)]
    its = [iter(x) for x in two]
    got = []
    for _ in range(3):
        got.append(np.concatenate([next(it)["input_ids"] for it in its]))
    state = two[0].state_dict()
    resumed = _loader(blocks, 4, 0, 1, sizes)
    resumed.load_state_dict(state)
    it = iter(resumed)
    got += [next(it)["input_ids"].numpy() for _ in range(3)]
    assert all(np.array_equal(a, b) for a, b in zip(want, got, strict=True))
    other = ResumableLoader(blocks, 4, seed=1, mixture=MixtureOrder(sizes, [1.0, 1.0], seed=1))
    with pytest.raises(Exception, match="data.mix changed"):
        other.load_state_dict(state)


def test_mixed_sources_keep_their_masks_and_spans(tokenizer, tmp_path, chatml_template):
    tok = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    tok.chat_template = chatml_template
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps(r) + "\n" for r in stdlib_chat(30)))
    text = tmp_path / "code.jsonl"
    text.write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x * {i}\n"}) + "\n" for i in range(60)))
    kw = dict(val_fraction=0.2, packing="per_document", cache_dir=str(tmp_path / "c"))
    parts = [build_packed_data([str(chat)], tok, 192, format="chat", **kw),
             build_packed_data([str(text)], tok, 192, **kw)]
    mixed = mix_packed_data(parts, ["chat", "code"], [0.7, 0.3], cache_dir=str(tmp_path / "c"))
    spans = mixed.meta["mix"]
    assert [s["name"] for s in spans] == ["chat", "code"] and spans[1]["train"][1] == len(mixed.train)
    for part, span in zip(parts, spans, strict=True):
        a, b = span["val"]
        for name in ("array", "label_mask", "positions"):
            assert np.array_equal(np.asarray(getattr(mixed.val[a:b], name)), np.asarray(getattr(part.val, name)))
    again = mix_packed_data(parts, ["chat", "code"], [0.5, 0.5], cache_dir=str(tmp_path / "c"))
    assert isinstance(again.train.array, np.memmap) and again.fingerprint != mixed.fingerprint
    with pytest.raises(ValueError, match="one packing"):
        mix_packed_data([parts[0], PackedData(PackedBlocks(np.zeros((2, 192), np.int64)),
                                              PackedBlocks(np.zeros((1, 192), np.int64)), "x")], ["a", "b"], [1, 1])


def test_distill_on_a_mixture_counts_and_validates_each_source(sapling_main, teacher_dir, tmp_path, chatml_template):
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps(r) + "\n" for r in stdlib_chat(30)))
    code = tmp_path / "code.jsonl"
    code.write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x * {i}\n"}) + "\n" for i in range(80)))
    template = tmp_path / "t.jinja"
    template.write_text(chatml_template)
    mix = f"data.mix=[{{files:[{chat}],weight:0.7,format:chat,name:chat}},{{files:[{code}],weight:0.3,name:code}}]"
    rc, err = sapling_main("distill", f"teacher.path={teacher_dir}", "student.config.num_hidden_layers=1", mix,
                           f"data.chat_template={template}", "data.seq_len=192", "data.val_fraction=0.2",
                           "trainer.max_steps=4", "trainer.micro_batch_size=4", "trainer.eval_every=4",
                           "trainer.log_every=2", "output_dir=out", "logger=none", "trainer.progress=false")
    assert rc == 0, err
    recs = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in recs if r.get("event") == "train"][-1]
    assert last["tokens/chat"] + last["tokens/code"] == last["tokens"] and last["tokens/chat"] > last["tokens/code"]
    ev = [r for r in recs if r.get("event") == "eval"][-1]
    assert ev["val_loss/chat"] > 0 and ev["val_loss/code"] > 0
    rc, err = sapling_main("distill", f"teacher.path={teacher_dir}",
                           f"data.mix=[{{files:[{code}],weight:0}}]", "output_dir=out2")
    assert rc == 2 and "data.mix[0].weight=0" in err
    rc, err = sapling_main("distill", f"teacher.path={teacher_dir}",
                           f"data.mix=[{{files:[{code}],wieght:1}}]", "output_dir=out3")
    assert rc == 2 and "data.mix[0].wieght" in err
