"""Teacher-logit cache: one teacher pass writes top-k distributions that any number of students read.

A cache directory holds:

    plan.json             what the cache holds (written first; a rerun with another plan is refused)
    teacher/config.json   the teacher's HF config (a student's shape can be derived from it)
    tokenizer/            the tokenizer the token ids were made with
    val_tokens.npy        validation blocks [n_val, L]: students validate without the data files
    shards/shard-00000.bin, shard-00000.json
                          training blocks [i*S, (i+1)*S) and the shard's sidecar (size, sha256, writer)
    manifest.json         the plan plus every shard's size and sha256; written last, so a cache without
                          it is unfinished (rerun the same `sapling cache-teacher` command to finish it)

A shard file is ``tokens [S, L] | records [S, L-1, R] uint8 | crc32 [S] uint32``: the token ids, one
packed top-k record (see :mod:`sapling.distill.topk_format`) per position that predicts a next token, and
a CRC-32 per sequence, checked on every read. The sha256 of each whole shard is checked when a run opens
the cache (``cache.verify``). Shards are written under a temporary name and renamed, their sidecars after
them, so a killed writer leaves only whole shards behind and a rerun writes exactly the missing ones.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from sapling import faults
from sapling.data.blocks import PackedBlocks, PackedData
from sapling.dist import barrier, broadcast_object, gathered, rank_world
from sapling.distill.topk_format import RecordLayout, decode_records, encode_records
from sapling.errors import DataError
from sapling.io import (
    write_atomically,
    write_bytes_atomically,
    write_dir_atomically,
    write_text_atomically,
)

log = logging.getLogger("sapling")

FORMAT = "sapling-teacher-topk"
VERSION = 1
DEFAULT_TOP_K = 64
# Plan fields a rerun must agree on (the rest: bookkeeping).
PLAN_KEYS = ("format", "version", "data_fingerprint", "tokenizer_hash", "teacher_hash", "top_k", "temperature",
             "layout", "seq_len", "num_sequences", "num_val_sequences", "shard_sequences", "token_dtype")
_HASH_EDGE = 1 << 20  # bytes hashed at each end of a large weight file


class CacheError(DataError):
    """A teacher cache that cannot be used: unfinished, corrupted, or written for other inputs."""


# ---------------------------------------------------------------------------------------------- fingerprints


def teacher_fingerprint(src: Any, config: Any, seed: int) -> str:
    """sha256 identifying the teacher's weights without reading all of them.

    A local checkpoint: its config.json and, per weight file, the name, size and the first and last MiB
    (a full hash of a 70B teacher would take minutes; a different fine-tune differs in both). A model
    built from a config (tiny / random init): the config and the seed it was initialised with.
    """
    h = hashlib.sha256()
    path = Path(os.path.expanduser(src.path)) if src.path is not None else None
    if path is not None and path.is_dir():
        h.update((path / "config.json").read_bytes())
        weights = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt"))
        for p in weights:
            size = p.stat().st_size
            h.update(f"{p.name}:{size}".encode())
            with open(p, "rb") as f:
                h.update(f.read(_HASH_EDGE))
                if size > 2 * _HASH_EDGE:
                    f.seek(size - _HASH_EDGE)
                    h.update(f.read(_HASH_EDGE))
    else:
        h.update(json.dumps({"source": src.path or src.tiny, "config": config.to_dict(), "seed": seed},
                            sort_keys=True, default=str).encode())
    return h.hexdigest()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class ShardGeometry:
    """Byte layout of the shard files of one cache."""

    seq_len: int
    num_sequences: int
    shard_sequences: int
    token_dtype: np.dtype
    record_bytes: int

    @property
    def num_shards(self) -> int:
        return math.ceil(self.num_sequences / self.shard_sequences)

    def sequences(self, shard: int) -> range:
        start = shard * self.shard_sequences
        return range(start, min(self.num_sequences, start + self.shard_sequences))

    def sizes(self, count: int) -> tuple[int, int, int]:
        """Bytes of the token, record and checksum sections of a shard of `count` sequences."""
        return (count * self.seq_len * self.token_dtype.itemsize, count * (self.seq_len - 1) * self.record_bytes,
                count * 4)

    def shard_bytes(self, shard: int) -> int:
        return sum(self.sizes(len(self.sequences(shard))))

    @staticmethod
    def from_plan(plan: dict[str, Any]) -> ShardGeometry:
        return ShardGeometry(int(plan["seq_len"]), int(plan["num_sequences"]), int(plan["shard_sequences"]),
                             np.dtype(plan["token_dtype"]), int(plan["layout"]["record_bytes"]))


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}"


def _sequence_crc(tokens: np.ndarray, records: np.ndarray) -> int:
    return zlib.crc32(records.data if records.flags.c_contiguous else records.tobytes(),
                      zlib.crc32(tokens.data if tokens.flags.c_contiguous else tokens.tobytes()))


def _atomic_json(path: Path, obj: Any) -> None:
    write_text_atomically(path, json.dumps(obj, indent=2, sort_keys=True))


def _read_json(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------- writing


@torch.no_grad()
def teacher_topk(teacher: torch.nn.Module, input_ids: torch.Tensor, top_k: int, temperature: float,
                 chunk_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The teacher's top-k log-probs at `temperature`, their indices and the log tail mass, for every
    position that predicts a next token ([B*(L-1), k], [B*(L-1), k], [B*(L-1)]), on the teacher's device.

    Logits are formed chunk by chunk from the final hidden states (float32 softmax), so [tokens x vocab]
    never exists; the tail is the logsumexp of everything outside the top k (no 1 - sum cancellation).
    """
    from sapling.models import decoder_and_head, final_hidden, model_logit_transform

    transform = model_logit_transform(teacher, "teacher")
    hidden = final_hidden(teacher, input_ids)
    _, head = decoder_and_head(teacher)
    vocab = head.out_features
    rows = chunk_rows or max(1, (256 << 20) // (4 * vocab))  # ~256 MiB of float32 logits per chunk
    out_lp, out_idx, out_tail = [], [], []
    with gathered(list(head.parameters())):
        for start in range(0, hidden.shape[0], rows):
            z = torch.nn.functional.linear(hidden[start:start + rows], head.weight, head.bias).float()
            if transform is not None:  # the teacher's own logits (softcap / scale)
                transform.apply_(z, want_factor=False)
            lp = torch.log_softmax(z.div_(temperature), dim=-1)
            values, idx = lp.topk(top_k, dim=-1)
            tail = lp.scatter_(1, idx, float("-inf")).logsumexp(dim=-1)
            out_lp.append(values)
            out_idx.append(idx)
            out_tail.append(tail)
    return torch.cat(out_lp), torch.cat(out_idx), torch.cat(out_tail)


@dataclass
class CachePlan:
    """What `write_teacher_cache` writes (everything a later student run checks)."""

    data_fingerprint: str
    tokenizer_hash: str
    teacher_hash: str
    teacher_source: str
    top_k: int
    temperature: float
    layout: RecordLayout
    seq_len: int
    num_sequences: int
    num_val_sequences: int
    shard_sequences: int
    token_dtype: str
    data_config: dict[str, Any] | None = None  # the data settings, for error messages only

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "data_fingerprint": self.data_fingerprint,
                "tokenizer_hash": self.tokenizer_hash, "teacher_hash": self.teacher_hash,
                "teacher_source": self.teacher_source, "top_k": self.top_k, "temperature": float(self.temperature),
                "layout": self.layout.to_dict(), "seq_len": self.seq_len, "num_sequences": self.num_sequences,
                "num_val_sequences": self.num_val_sequences, "shard_sequences": self.shard_sequences,
                "token_dtype": self.token_dtype, "data_config": self.data_config or {}}


def _plan_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in PLAN_KEYS if old.get(k) != new.get(k)]


def _shard_complete(root: Path, geo: ShardGeometry, shard: int) -> bool:
    name = shard_name(shard)
    bin_path, side = root / "shards" / f"{name}.bin", root / "shards" / f"{name}.json"
    return side.is_file() and bin_path.is_file() and bin_path.stat().st_size == geo.shard_bytes(shard)


def _prepare(root: Path, plan: dict[str, Any], data: PackedData, tokenizer: Any, teacher_config: Any) -> list[int]:
    """Rank 0: create or check the directory; return the shards still to write."""
    geo = ShardGeometry.from_plan(plan)
    (root / "shards").mkdir(parents=True, exist_ok=True)
    plan_path = root / "plan.json"
    if plan_path.exists():
        diff = _plan_differences(_read_json(plan_path), plan)
        if diff:
            raise CacheError(f"cache.dir={root} holds a teacher cache written for other inputs ({'; '.join(diff)}); "
                             "use a new cache.dir, or delete this one to rebuild it")
    for stale in (root / "shards").glob("*.tmp-*"):  # a killed writer's partial file (sapling.io's temp names)
        stale.unlink()
    if not (root / "teacher" / "config.json").exists():
        write_dir_atomically(root / "teacher", lambda tmp: teacher_config.to_json_file(tmp / "config.json"))
    if not (root / "tokenizer").exists():
        write_dir_atomically(root / "tokenizer", tokenizer.save_pretrained)
    if not (root / "val_tokens.npy").exists():
        val = np.ascontiguousarray(data.val.array)
        write_atomically(root / "val_tokens.npy", lambda f: np.save(f, val))
    if not plan_path.exists():
        _atomic_json(plan_path, plan)
    pending = [i for i in range(geo.num_shards) if not _shard_complete(root, geo, i)]
    if pending and (root / "manifest.json").exists():
        (root / "manifest.json").unlink()  # shards were deleted (e.g. a corrupted one): the cache is unfinished again
    return pending


def write_teacher_cache(
    root: str | Path,
    *,
    teacher: torch.nn.Module,
    data: PackedData,
    tokenizer: Any,
    plan: CachePlan,
    micro_batch_size: int,
    device: torch.device,
    lockstep: bool,
    metrics: Any = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the teacher over every training block and write the cache; every rank calls this.

    Shards still missing are dealt round-robin to the ranks (disjoint parts of the data). With `lockstep`
    (a ZeRO-3 teacher, whose every forward is a collective) ranks run the same number of forwards, padding
    with throw-away batches where their share runs out. Returns the manifest.
    """
    from tqdm.auto import tqdm

    root = Path(root)
    rank, world = rank_world()
    plan_dict = plan.to_dict()
    geo = ShardGeometry.from_plan(plan_dict)
    prepared: Any = None
    if rank == 0:
        try:
            prepared = _prepare(root, plan_dict, data, tokenizer, getattr(teacher, "config", None))
        except (CacheError, OSError) as err:
            prepared = f"{type(err).__name__}: {err}"
    prepared = broadcast_object(prepared)
    if isinstance(prepared, str):
        raise CacheError(prepared.split(": ", 1)[1])
    pending: list[int] = prepared
    if not pending and (root / "manifest.json").exists():
        log.info("teacher cache %s is complete (%d shards); nothing to do", root, geo.num_shards)
        return _read_json(root / "manifest.json")

    mine = pending[rank::world]
    rounds = math.ceil(len(pending) / world)
    batches_per_shard = math.ceil(geo.shard_sequences / micro_batch_size)
    todo = sum(len(geo.sequences(i)) for i in pending)
    bar = tqdm(total=todo, desc="cache-teacher", disable=not (progress and rank == 0), dynamic_ncols=True,
               unit="seq", mininterval=1.0 if sys.stderr.isatty() else 30.0)
    t0, written = time.perf_counter(), 0
    blocks = data.train
    dummy = blocks.get_batch(np.zeros(micro_batch_size, dtype=np.int64)).to(device)
    for r in range(rounds):
        shard = mine[r] if r < len(mine) else None
        seqs = geo.sequences(shard) if shard is not None else range(0)
        n_batches = batches_per_shard if lockstep else math.ceil(len(seqs) / micro_batch_size)
        records: list[np.ndarray] = []
        ts = time.perf_counter()
        for b in range(n_batches):
            ids_range = seqs[b * micro_batch_size:(b + 1) * micro_batch_size]
            if len(ids_range) == 0:
                teacher_topk(teacher, dummy, plan.top_k, plan.temperature)  # keeps ZeRO-3 collectives in step
                continue
            ids = blocks.get_batch(np.asarray(ids_range, dtype=np.int64)).to(device)
            lp, idx, tail = teacher_topk(teacher, ids, plan.top_k, plan.temperature)
            records.append(encode_records(lp, idx, tail, plan.layout).reshape(len(ids_range), geo.seq_len - 1, -1))
            if rank == 0:
                bar.update(len(ids_range) * world)
        if shard is None:
            continue
        tokens = np.ascontiguousarray(data.train.array[seqs.start:seqs.stop], dtype=geo.token_dtype)
        recs = np.concatenate(records)
        crcs = np.array([_sequence_crc(tokens[i], recs[i]) for i in range(len(seqs))], dtype="<u4")
        name = shard_name(shard)
        path = root / "shards" / f"{name}.bin"
        sections = [tokens.data, recs.data, crcs.data]
        digest = hashlib.sha256()
        for section in sections:  # hashed from memory: no second read of the file just written
            digest.update(section)
        write_bytes_atomically(path, sections)
        sidecar = {"shard": shard, "file": f"shards/{name}.bin", "first_sequence": seqs.start,
                   "num_sequences": len(seqs), "bytes": path.stat().st_size, "sha256": digest.hexdigest(),
                   "writer_rank": rank, "writer_world_size": world, "wall_s": round(time.perf_counter() - ts, 3)}
        _atomic_json(root / "shards" / f"{name}.json", sidecar)
        written += 1
        if metrics is not None:
            metrics.log({"event": "cache_shard", **sidecar})
        faults.after_shard(written)  # test-only seam (sapling.faults), a no-op in real runs
    bar.close()
    barrier()
    manifest: Any = None
    if rank == 0:
        try:
            manifest = _finish(root, plan_dict, geo, wall_s=time.perf_counter() - t0, world=world)
        except CacheError as err:
            manifest = f"CacheError: {err}"
    manifest = broadcast_object(manifest)
    if isinstance(manifest, str):
        raise CacheError(manifest.split(": ", 1)[1])
    return manifest


def _finish(root: Path, plan: dict[str, Any], geo: ShardGeometry, *, wall_s: float, world: int) -> dict[str, Any]:
    """Rank 0: check that the shards cover every sequence exactly once, then write manifest.json."""
    shards, covered = [], 0
    for i in range(geo.num_shards):
        side_path = root / "shards" / f"{shard_name(i)}.json"
        if not _shard_complete(root, geo, i):
            raise CacheError(f"{root}: shard {shard_name(i)} is missing after the pass; rerun to write it")
        side = _read_json(side_path)
        seqs = geo.sequences(i)
        if (side["first_sequence"], side["num_sequences"]) != (seqs.start, len(seqs)):
            raise CacheError(f"{side_path} describes sequences {side['first_sequence']}+{side['num_sequences']}, "
                             f"expected {seqs.start}+{len(seqs)}")
        covered += side["num_sequences"]
        shards.append({k: side[k] for k in ("file", "first_sequence", "num_sequences", "bytes", "sha256",
                                            "writer_rank")})
    if covered != geo.num_sequences:
        raise CacheError(f"{root}: shards cover {covered} sequences, expected {geo.num_sequences}")
    total = sum(s["bytes"] for s in shards)
    manifest = {**plan, "shards": shards, "total_bytes": total,
                "bytes_per_token": total / max(1, geo.num_sequences * (geo.seq_len - 1)),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "last_pass_wall_s": round(wall_s, 3),
                "last_pass_world_size": world}
    _atomic_json(root / "manifest.json", manifest)
    return manifest


# ---------------------------------------------------------------------------------------------- reading


class TeacherCache:
    """A finished teacher cache, opened for reading (every rank opens it; reads are memory-mapped)."""

    def __init__(self, root: str | Path, *, verify: bool = True) -> None:
        self.root = Path(os.path.expanduser(str(root)))
        manifest_path = self.root / "manifest.json"
        if not self.root.is_dir():
            raise CacheError(f"teacher.cache={root}: no such directory; write one with `sapling cache-teacher "
                             f"teacher.path=T data.files=[...] cache.dir={root}`")
        if not manifest_path.is_file():
            hint = ("the `sapling cache-teacher` run that writes it did not finish; rerun that same command to "
                    "complete it" if (self.root / "plan.json").exists() else "not a teacher cache")
            raise CacheError(f"teacher.cache={root}: no manifest.json: {hint}")
        self.manifest = _read_json(manifest_path)
        if self.manifest.get("format") != FORMAT or self.manifest.get("version") != VERSION:
            raise CacheError(f"teacher.cache={root}: format {self.manifest.get('format')!r} version "
                             f"{self.manifest.get('version')!r}; this Sapling reads {FORMAT!r} version {VERSION}")
        lay = self.manifest["layout"]
        self.layout = RecordLayout(int(lay["top_k"]), int(lay["vocab_size"]), int(lay["value_bits"]),
                                   float(lay["max_nll"]))
        if self.layout.record_bytes != int(lay["record_bytes"]):
            raise CacheError(f"teacher.cache={root}: record size {lay['record_bytes']} does not match its layout")
        self.geometry = ShardGeometry.from_plan(self.manifest)
        self._maps: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._check_sizes()
        if verify:
            self.verify()

    # -- properties
    @property
    def top_k(self) -> int:
        return int(self.manifest["top_k"])

    @property
    def temperature(self) -> float:
        return float(self.manifest["temperature"])

    @property
    def seq_len(self) -> int:
        return self.geometry.seq_len

    @property
    def num_sequences(self) -> int:
        return self.geometry.num_sequences

    @property
    def tokenizer_dir(self) -> Path:
        return self.root / "tokenizer"

    @property
    def teacher_config_dir(self) -> Path:
        return self.root / "teacher"

    def shard_path(self, shard: int) -> Path:
        return self.root / self.manifest["shards"][shard]["file"]

    # -- integrity
    def _check_sizes(self) -> None:
        for i, entry in enumerate(self.manifest["shards"]):
            path = self.shard_path(i)
            if not path.is_file():
                raise CacheError(f"teacher cache {self.root}: shard {path.name} is missing; rerun the "
                                 "`sapling cache-teacher` command that wrote the cache to rewrite it")
            size, want = path.stat().st_size, self.geometry.shard_bytes(i)
            if size != want or size != int(entry["bytes"]):
                raise CacheError(f"teacher cache {self.root}: shard {path.name} is truncated or overwritten "
                                 f"({size} bytes, expected {want}); delete it and its .json and rerun the "
                                 "`sapling cache-teacher` command to rewrite it")

    def verify(self) -> None:
        """sha256 of every shard against the manifest (split over the ranks of a process group)."""
        rank, world = rank_world()
        bad = [self.shard_path(i).name for i in range(rank, self.geometry.num_shards, world)
               if _sha256_file(self.shard_path(i)) != self.manifest["shards"][i]["sha256"]]
        if world > 1:
            everyone: list[Any] = [None] * world
            dist.all_gather_object(everyone, bad)
            bad = sorted(name for part in everyone for name in part)
        if bad:
            raise CacheError(f"teacher cache {self.root}: shard(s) {', '.join(bad)} fail their sha256 checksum "
                             "(corrupted); delete them and their .json files and rerun the `sapling cache-teacher` "
                             "command to rewrite them")

    def _shard_arrays(self, shard: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        maps = self._maps.get(shard)
        if maps is None:
            geo = self.geometry
            count = len(geo.sequences(shard))
            tok_bytes, rec_bytes, _ = geo.sizes(count)
            path = self.shard_path(shard)
            tokens = np.memmap(path, dtype=geo.token_dtype, mode="r", shape=(count, geo.seq_len))
            records = np.memmap(path, dtype=np.uint8, mode="r", offset=tok_bytes,
                                shape=(count, geo.seq_len - 1, geo.record_bytes))
            crcs = np.memmap(path, dtype="<u4", mode="r", offset=tok_bytes + rec_bytes, shape=(count,))
            maps = self._maps[shard] = (tokens, records, crcs)
        return maps

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(token ids [L], records [L-1, R]) of training sequence `index`, its CRC-32 checked."""
        if not 0 <= index < self.num_sequences:
            raise IndexError(f"sequence {index} out of range for {self.num_sequences}")
        shard, local = divmod(index, self.geometry.shard_sequences)
        tokens, records, crcs = self._shard_arrays(shard)
        tok, rec = tokens[local], records[local]
        if _sequence_crc(tok, rec) != int(crcs[local]):
            raise CacheError(f"teacher cache {self.root}: shard {self.shard_path(shard).name}, sequence {local} "
                             f"(global {index}) fails its CRC-32 checksum (corrupted); delete the shard and its .json "
                             "and rerun the `sapling cache-teacher` command to rewrite it")
        return tok, rec

    # -- data for the trainer
    def packed_data(self) -> PackedData:
        """Training blocks with the teacher's top-k attached, and the validation blocks."""
        val = np.load(self.root / "val_tokens.npy", mmap_mode="r")
        meta = {"teacher_cache": str(self.root), "top_k": self.top_k, "temperature": self.temperature,
                "num_sequences": self.num_sequences}
        return PackedData(CachedTeacherBlocks(self), PackedBlocks(val), self.manifest["data_fingerprint"], meta)


class CachedTeacherBlocks:
    """Training blocks read from a teacher cache: ``blocks[i]`` is a LongTensor [L] of token ids, and
    ``get_batch(indices)`` also returns the packed top-k records of every position that predicts a next
    token (``teacher_records`` uint8 [B*(L-1), R], row order of the flattened ``labels[:, 1:]``): a quarter
    of the bytes of decoded fp32 + int64 top-k to copy to the device. ``decode(batch)``, called by the
    training loop once the batch is on its device, turns them into ``teacher_lp`` (float32) and
    ``teacher_idx`` (int64) [B*(L-1), k] for the fused loss's top-k path."""

    has_teacher = True

    def __init__(self, cache: TeacherCache) -> None:
        self.cache = cache

    def __len__(self) -> int:
        return self.cache.num_sequences

    @property
    def seq_len(self) -> int:
        return self.cache.seq_len

    @property
    def num_tokens(self) -> int:
        return len(self) * self.seq_len

    def __getitem__(self, i: int) -> torch.Tensor:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"block index {i} out of range for {n} blocks")
        tokens, _ = self.cache.read(int(i) % n)
        return torch.from_numpy(tokens.astype(np.int64))

    def get_batch(self, indices: Any) -> dict[str, torch.Tensor]:
        read = [self.cache.read(int(i)) for i in np.asarray(indices, dtype=np.int64)]
        ids = torch.from_numpy(np.stack([t for t, _ in read]).astype(np.int64))
        records = torch.from_numpy(np.concatenate([r for _, r in read]))
        return {"input_ids": ids, "teacher_records": records}

    def decode(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``batch`` with its packed records replaced by the decoded top-k, on the records' device."""
        out = dict(batch)
        out["teacher_lp"], out["teacher_idx"] = decode_records(out.pop("teacher_records"), self.cache.layout)
        return out

    def __repr__(self) -> str:
        return f"CachedTeacherBlocks({self.cache.root}, num_blocks={len(self)}, seq_len={self.seq_len})"

