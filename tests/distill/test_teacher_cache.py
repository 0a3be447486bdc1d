"""`sapling cache-teacher` and `sapling distill teacher.cache=C` in one process.

- the cache holds the data's token ids and, per position, the teacher's own top-k (checked against the
  teacher run directly), and its manifest covers every sequence exactly once;
- a writer killed (SIGKILL) after some shards resumes on rerun and writes exactly the missing shards, giving
  byte-identical shards; a rerun with another plan is refused;
- corrupted, truncated or missing shards are detected by checksum / size and named;
- a student run refuses a cache whose k, temperature, tokenizer or data does not match it, and an unfinished one;
- the cached distillation step computes the fused loss's top-k loss; a cached run stopped by a signal
  resumes mid-epoch to exactly the uninterrupted run's losses.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from sapling.distill.teacher_cache import CacheError, TeacherCache, teacher_topk
from sapling.distill.topk_format import decode_codes, quantize_nll
from sapling.faults import FAULT_KILL_ENV, FAULT_SIGNAL_ENV

STUDENT = ["student.config.hidden_size=32", "student.config.intermediate_size=64", "student.config.num_hidden_layers=1",
           "trainer.micro_batch_size=4", "trainer.log_every=1", "trainer.eval_every=0", "trainer.eval_batches=2",
           "trainer.warmup_steps=1", "trainer.lr=3e-3", "logger=none", "trainer.progress=false"]


def _sapling(demo_cache: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full = {**os.environ, "SAPLING_CACHE": str(demo_cache), "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "sapling", *args], env=full, capture_output=True, text=True,
                          timeout=600)


def _records(out: Path, event: str) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["event"] == event]


@pytest.fixture(scope="module")
def packed(teacher_cache, tokenizer, demo_cache):
    """The packed data the cache was written from, built the same way the command does."""
    from sapling.recipes.common import load_data

    d = dict(a.split("=", 1) for a in teacher_cache["args"] if a.startswith("data."))
    cfg = OmegaConf.create({"cache_dir": str(demo_cache), "data": {
        "files": [d["data.files"].strip("[]")], "hub_name": None, "hub_config": None, "hub_split": "train",
        "text_field": "text", "seq_len": int(d["data.seq_len"]), "val_fraction": 0.05, "seed": 0,
        "max_tokens": int(d["data.max_tokens"]), "cache_dir": None, "num_proc": 1}})
    return load_data(cfg, tokenizer)


def test_cache_holds_the_tokens_and_the_teachers_topk(teacher_cache, packed, teacher_dir):
    from transformers import AutoModelForCausalLM

    cache = TeacherCache(teacher_cache["dir"])
    m = cache.manifest
    assert cache.top_k == 16 and cache.temperature == 1.0 and cache.seq_len == 32
    assert cache.num_sequences == len(packed.train) and m["data_fingerprint"] == packed.fingerprint
    assert len(m["shards"]) == 7 and m["shards"][-1]["num_sequences"] < 100
    starts = [s["first_sequence"] for s in m["shards"]]
    assert starts == list(range(0, cache.num_sequences, 100))
    assert sum(s["num_sequences"] for s in m["shards"]) == cache.num_sequences
    assert m["bytes_per_token"] < 12 * cache.top_k / 3  # well under fp32 + int64
    np.testing.assert_array_equal(np.load(cache.root / "val_tokens.npy"), packed.val.array)

    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    blocks = cache.packed_data().train
    picks = [0, 99, 100, 345, cache.num_sequences - 1]
    batch = blocks.decode(blocks.get_batch(picks))
    torch.testing.assert_close(batch["input_ids"], packed.train.get_batch(picks), rtol=0, atol=0)
    lp, idx, tail = teacher_topk(teacher, batch["input_ids"], 16, 1.0)
    _, records = zip(*(cache.read(i) for i in picks), strict=True)
    codes, got_idx, tail_codes = decode_codes(np.concatenate(records), cache.layout)
    # the same teacher on a different batch composition: equal up to float rounding at a code boundary
    assert (got_idx == idx.numpy()).mean() > 0.999
    assert np.abs(codes.astype(np.int64) - quantize_nll(lp.numpy(), cache.layout).astype(np.int64)).max() <= 1
    assert np.abs(tail_codes.astype(np.int64) - quantize_nll(tail.numpy(), cache.layout).astype(np.int64)).max() <= 1
    assert batch["teacher_lp"].shape == (len(picks) * 31, 16) and torch.equal(batch["teacher_idx"],
                                                                               torch.from_numpy(got_idx.astype(np.int64)))


def test_writer_killed_after_some_shards_resumes_without_gaps_or_duplicates(teacher_cache, demo_cache, tmp_path,
                                                                             sapling_main):
    cache_dir, run = tmp_path / "cache", tmp_path / "run"
    args = ["cache-teacher", *teacher_cache["args"], f"cache.dir={cache_dir}", f"hydra.run.dir={run}"]
    res = _sapling(demo_cache, *args, env={FAULT_KILL_ENV: "3"})  # SIGKILLed: a process of its own
    assert res.returncode == -signal.SIGKILL, res.stderr[-3000:]
    assert not (cache_dir / "manifest.json").exists()
    assert len(list((cache_dir / "shards").glob("*.json"))) == 3
    (cache_dir / "shards" / "shard-00004.bin.tmp-123-abc").write_bytes(b"half a shard")  # a write cut short
    with pytest.raises(CacheError, match="did not finish"):
        TeacherCache(cache_dir)

    # the reruns need no process of their own: in this one (imports already paid for)
    code, err = sapling_main(*args)
    assert code == 0, err[-5000:]
    resumed = [r["shard"] for r in _records(run, "cache_shard")][3:]
    assert sorted(resumed) == [3, 4, 5, 6]  # only the missing shards were written
    assert not list((cache_dir / "shards").glob("*.tmp-*"))
    ref = teacher_cache["dir"]
    for name in sorted(p.name for p in (ref / "shards").glob("*.bin")):
        assert (cache_dir / "shards" / name).read_bytes() == (ref / "shards" / name).read_bytes(), name
    TeacherCache(cache_dir)  # checksums verified

    code, err = sapling_main(*args)  # complete: nothing rewritten
    assert code == 0, err[-5000:]
    assert len(_records(run, "cache_shard")) == 7


def test_rerun_with_another_plan_is_refused(teacher_cache, tmp_path, cli_in_process):
    cache_dir = tmp_path / "cache"
    shutil.copytree(teacher_cache["dir"], cache_dir)
    res = cli_in_process("cache-teacher", *teacher_cache["args"], "cache.top_k=8", f"cache.dir={cache_dir}",
                         f"hydra.run.dir={tmp_path / 'run'}")
    assert res.returncode == 1
    assert "written for other inputs" in res.stderr and "top_k: 16 -> 8" in res.stderr


def test_corrupted_truncated_and_missing_shards_are_named(teacher_cache, tmp_path):
    cache_dir = tmp_path / "cache"
    shutil.copytree(teacher_cache["dir"], cache_dir)
    shard2 = cache_dir / "shards" / "shard-00002.bin"
    data = bytearray(shard2.read_bytes())
    record_bytes = TeacherCache(cache_dir, verify=False).layout.record_bytes
    data[100 * 32 * 2 + 5 * 31 * record_bytes + 7] ^= 0x10  # a bit in sequence 5's records (after uint16 tokens)
    shard2.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=r"shard-00002\.bin fail their sha256"):
        TeacherCache(cache_dir)
    cache = TeacherCache(cache_dir, verify=False)
    cache.read(2 * 100 + 4)  # its neighbour is fine
    with pytest.raises(CacheError, match=r"shard-00002\.bin, sequence 5 \(global 205\) fails its CRC-32"):
        cache.read(2 * 100 + 5)

    shard1 = cache_dir / "shards" / "shard-00001.bin"
    shard1.write_bytes(shard1.read_bytes()[:-100])
    with pytest.raises(CacheError, match=r"shard-00001\.bin is truncated"):
        TeacherCache(cache_dir, verify=False)
    shard1.unlink()
    with pytest.raises(CacheError, match=r"shard-00001\.bin is missing"):
        TeacherCache(cache_dir, verify=False)


def test_distill_refuses_a_cache_that_does_not_match(teacher_cache, corpus_file, demo_cache, tmp_path, cli_in_process):
    from sapling.data.demo import train_bpe_tokenizer

    base = ["distill", f"teacher.cache={teacher_cache['dir']}", *STUDENT, "trainer.max_steps=1",
            f"hydra.run.dir={tmp_path / 'run'}"]
    cases = {
        "cache.top_k=8": "cache.top_k=8: teacher.cache=",
        "distill.temperature=2.0": "holds the teacher's distributions at temperature 1.0",
        f"data.tokenizer={train_bpe_tokenizer(corpus_file, 300, demo_cache)}": "its tokenizer is not the one",
        f"data.files=[{corpus_file}]": "was written for data",  # default seq_len 256, no max_tokens: other blocks
        "distill.features.weight=1.0": "needs the teacher's hidden states",
    }
    for override, message in cases.items():
        res = cli_in_process(*base, override)  # refusals before any model loads: no process of their own
        assert res.returncode == 2, (override, res.stderr[-2000:])
        assert message in res.stderr, (override, res.stderr[-2000:])

    unfinished = tmp_path / "unfinished"
    shutil.copytree(teacher_cache["dir"], unfinished)
    (unfinished / "manifest.json").unlink()
    res = cli_in_process("distill", f"teacher.cache={unfinished}", *STUDENT, f"hydra.run.dir={tmp_path / 'u'}")
    assert res.returncode == 1 and "did not finish; rerun that same command" in res.stderr


def test_cached_step_is_the_fused_topk_loss(teacher_cache):
    from transformers import AutoConfig, AutoModelForCausalLM

    from sapling.distill.step import loss_on_batch
    from sapling.kernels import fused_linear_kd_loss
    from sapling.models import apply_overrides, final_hidden, shifted_targets

    cache = TeacherCache(teacher_cache["dir"], verify=False)
    torch.manual_seed(0)
    cfg = apply_overrides(AutoConfig.from_pretrained(cache.teacher_config_dir), {"num_hidden_layers": 1})
    student = AutoModelForCausalLM.from_config(cfg)
    blocks = cache.packed_data().train
    batch = blocks.decode(blocks.get_batch([3, 90, 300]))
    batch["labels"] = batch["input_ids"].clone()
    distill = OmegaConf.create({"divergence": "forward_kl", "beta": 0.5, "temperature": 1.0, "kd_weight": 1.0,
                                "ce_weight": 0.25})
    loss, parts = loss_on_batch(student, None, batch, distill)
    loss.backward()
    assert parts["kd"] > 0 and parts["ce"] > 0 and "top1_agree" in parts
    h = final_hidden(student, batch["input_ids"]).detach().requires_grad_(True)
    head = student.get_output_embeddings()
    want = fused_linear_kd_loss(h, head.weight.detach(), teacher_topk=(batch["teacher_lp"], batch["teacher_idx"]),
                                labels=shifted_targets(batch["labels"]), kd_weight=1.0, ce_weight=0.25)
    torch.testing.assert_close(loss.detach(), want.detach(), rtol=1e-5, atol=1e-6)


def test_cached_distill_resumes_mid_epoch_to_the_same_losses(teacher_cache, demo_cache, tmp_path, sapling_main):
    common = ["distill", f"teacher.cache={teacher_cache['dir']}", *STUDENT, "trainer.max_steps=6",
              "trainer.save_every=2", "distill.ce_weight=0.2"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    # The uninterrupted run and the resume need no process of their own (the stopped run, signalled, has one).
    code, err = sapling_main(*common, f"hydra.run.dir={ref}")
    assert code == 0, err[-5000:]
    res = _sapling(demo_cache, *common, f"hydra.run.dir={run}", env={FAULT_SIGNAL_ENV: "3"})
    assert res.returncode == 3, res.stderr[-5000:]  # EXIT_STOPPED: stopped, resumable
    assert "stopped by a signal after step 3" in res.stderr
    code, err = sapling_main(*common, f"hydra.run.dir={run}")
    assert code == 0, err[-5000:]

    want = {r["step"]: r for r in _records(ref, "train")}
    got = {r["step"]: r for r in _records(run, "train")}
    assert sorted(got) == list(range(1, 7))
    for step in range(1, 7):
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], rel=1e-6), step
        assert got[step]["tokens"] == want[step]["tokens"]
    start = _records(ref, "start")[0]
    assert start["teacher_params"] == 0 and start["top_k"] == 16 and start["teacher_cache"] == str(teacher_cache["dir"])
    assert "top1_agreement" in want[6]
    assert (ref / "model" / "config.json").exists() and (ref / "model" / "tokenizer.json").exists()
    assert _records(run, "resume")[0]["step"] == 3
