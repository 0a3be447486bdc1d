"""The teacher cache on 2 CPU ranks (torchrun, gloo, DeepSpeed's CPU accelerator).

- `torchrun -m sapling cache-teacher deepspeed=zero3`: a partitioned (ZeRO-3) teacher, each rank writing a
  disjoint set of shards (7 shards: one rank idles in the last round and must keep the collectives in step);
  the result is the single-process cache: same tokens, same top-k;
- two ranks reading one epoch through the trainer's loader see every sequence exactly once, with the same
  content as a single-process read;
- `torchrun -m sapling distill teacher.cache=C deepspeed=zero2` gives the single-process cached run's losses.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from sapling.distill.teacher_cache import TeacherCache
from sapling.distill.topk_format import decode_codes

READ_WORKER = Path(__file__).with_name("cache_read_worker.py")
STUDENT = ["student.config.hidden_size=32", "student.config.intermediate_size=64", "student.config.num_hidden_layers=1",
           "trainer.micro_batch_size=4", "trainer.log_every=1", "trainer.eval_every=0", "trainer.eval_batches=2",
           "trainer.max_steps=5", "trainer.warmup_steps=1", "trainer.lr=3e-3", "distill.ce_weight=0.2",
           "logger=none", "trainer.progress=false"]


def _env(demo_cache: Path) -> dict:
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
            "SAPLING_CACHE": str(demo_cache)}


def _torchrun(*args: str) -> list[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
            "--master-port", str(port), "-m", "sapling", *args]


def _run(cmd: list[str], demo_cache: Path) -> None:
    res = subprocess.run(cmd, env=_env(demo_cache), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]


def _train(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["event"] == "train"]


def test_two_rank_zero3_write_equals_the_single_process_cache(teacher_cache, demo_cache, tmp_path):
    cache_dir = tmp_path / "cache"
    _run(_torchrun("cache-teacher", *teacher_cache["args"], "deepspeed=zero3", "deepspeed.param_persistence_threshold=0",
                   f"cache.dir={cache_dir}", f"hydra.run.dir={tmp_path / 'run'}"), demo_cache)
    got, ref = TeacherCache(cache_dir), TeacherCache(teacher_cache["dir"])
    shards = got.manifest["shards"]
    assert got.manifest["last_pass_world_size"] == 2
    assert [s["writer_rank"] for s in shards] == [0, 1, 0, 1, 0, 1, 0]  # disjoint shares, round robin
    assert [(s["first_sequence"], s["num_sequences"]) for s in shards] == \
        [(s["first_sequence"], s["num_sequences"]) for s in ref.manifest["shards"]]
    for i in range(got.num_sequences):
        tok_a, rec_a = got.read(i)
        tok_b, rec_b = ref.read(i)
        np.testing.assert_array_equal(tok_a, tok_b)
        if i % 25 == 0 or i == got.num_sequences - 1:
            (codes_a, idx_a, tail_a), (codes_b, idx_b, tail_b) = decode_codes(rec_a, got.layout), decode_codes(rec_b,
                                                                                                          ref.layout)
            assert (idx_a == idx_b).mean() > 0.99, i
            assert np.abs(codes_a.astype(np.int64) - codes_b.astype(np.int64)).max() <= 1, i
            assert np.abs(tail_a.astype(np.int64) - tail_b.astype(np.int64)).max() <= 1, i


def test_two_ranks_read_every_sequence_exactly_once(teacher_cache, run_two_ranks):
    import hashlib

    result = run_two_ranks(READ_WORKER, str(teacher_cache["dir"]))
    blocks = TeacherCache(teacher_cache["dir"], verify=False).packed_data().train
    want: Counter = Counter()  # a multiset: the corpus has a few identical blocks
    for i in range(len(blocks)):
        b = blocks.decode(blocks.get_batch([i]))
        h = hashlib.sha1()
        for key in ("input_ids", "teacher_lp", "teacher_idx"):
            h.update(b[key].numpy().tobytes())
        want[h.hexdigest()] += 1
    rank0, rank1 = result["digests"]
    assert len(rank0) == len(rank1) == len(blocks) // 2
    assert Counter(rank0 + rank1) == want  # every sequence exactly once, nothing else
    assert result["consumed"] == len(blocks)


def test_two_rank_zero2_cached_distill_matches_one_process(teacher_cache, demo_cache, tmp_path, sapling_main):
    base = ["distill", f"teacher.cache={teacher_cache['dir']}", *STUDENT]
    single, double = tmp_path / "single", tmp_path / "zero2"
    code, err = sapling_main(*base, "trainer.grad_accum=2", f"hydra.run.dir={single}")  # the reference: in this process
    assert code == 0, err[-4000:]
    _run(_torchrun(*base, "deepspeed=zero2", f"hydra.run.dir={double}"), demo_cache)
    ref, got = _train(single), _train(double)
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5]
    for a, b in zip(ref, got, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), a["step"]
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), a["step"]
        assert b["tokens"] == a["tokens"]
    assert (double / "model" / "config.json").exists()
