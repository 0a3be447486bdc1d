"""On-policy distillation (GKD): the student writes the continuation, the teacher scores every token of it.

A share `distill.on_policy.fraction` (GKD's lambda) of the micro-batches is replaced, before the step counts
its tokens, by sequences the student generates: the prompts come from the batch's own blocks (for chat data
each conversation up to its last assistant turn, from the label mask and the per-document positions; for text
the first half of each block), the student samples `max_new_tokens` (temperature, top-p), and the loss (the
configured divergence, reverse KL or JSD usually; no CE on the student's own samples) runs on the completion
tokens only, with the teacher's distribution over prompt + completion from one forward.

Sequence-level KD (`teacher_samples`): the micro-batches not drawn for the student are the teacher's greedy
answers to the same prompts instead of the data's, written to disk once per training block (`TeacherSamples`,
in the run's output directory: later epochs and a resumed run read them back); the configured loss runs on
them. With `fraction=0` that is plain sequence-level KD.

Which micro-batches are generated derives from (seed, step, micro-batch) and is the same on every rank, as a
ZeRO-3 student needs (all ranks generate together, `synced_gpus`, until the last one is done); the sampling
noise of each derives from (seed, step, the micro-batch's global index in the loader's order), so a run is
reproducible, resumes mid-run to the same samples (nothing but the step needs saving), and with fraction 1
samples what one process does with the same global batch.
"""

from __future__ import annotations

import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from sapling.dist import all_reduce_sum
from sapling.models import IGNORE_INDEX, unwrap_hf

_MASK64 = (1 << 64) - 1


def draw(seed: int, step: int, micro: int, fraction: float) -> bool:
    """Whether micro-batch `micro` (of every rank) of optimizer step `step` is generated."""
    return bool(np.random.default_rng([seed & _MASK64, 3, step, micro]).random() < fraction)


def sample_seed(seed: int, step: int, global_micro: int) -> int:
    """The sampling seed of the micro-batch at `global_micro` (micro * world + rank) of step `step`."""
    return int(np.random.default_rng([seed & _MASK64, 4, step, global_micro]).integers(0, 2**62))


def prompts_from_batch(batch: dict[str, torch.Tensor], chat: bool) -> list[torch.Tensor]:
    """One prompt per block: for chat data its first conversation that has an assistant turn, up to the start of
    that conversation's last assistant turn (the turn's header included); for text, the block's first half."""
    ids, labels = batch["input_ids"], batch["labels"]
    positions = batch.get("position_ids")
    out = []
    for b in range(ids.shape[0]):
        prompt = None
        if chat:
            starts = (torch.nonzero(positions[b] == 0).flatten().tolist() if positions is not None else [0])
            for s, e in zip(starts, [*starts[1:], ids.shape[1]], strict=True):
                labelled = torch.nonzero(labels[b, s:e] != IGNORE_INDEX).flatten()
                if labelled.numel() == 0:
                    continue
                gaps = torch.nonzero(labelled[1:] - labelled[:-1] > 1).flatten()
                last = int(labelled[gaps[-1] + 1] if gaps.numel() else labelled[0])  # the last labelled run
                if last > 0:
                    prompt = ids[b, s:s + last]
                    break
        out.append(prompt if prompt is not None else ids[b, : max(1, ids.shape[1] // 2)])
    return out


@dataclass
class Generated:
    batch: dict[str, torch.Tensor]  # input_ids / labels (completion only) [B, L]
    new_tokens: int  # completion tokens sampled (all sequences)


def _layout(prompts: list[torch.Tensor], completions: list[torch.Tensor], seq_len: int, pad_id: int) -> Generated:
    """Prompt + completion right-padded in `seq_len` columns, labels on the completion only."""
    device = prompts[0].device
    ids = torch.full((len(prompts), seq_len), pad_id, dtype=torch.long, device=device)
    labels = torch.full_like(ids, IGNORE_INDEX)
    new = 0
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        n = min(c.numel(), seq_len - p.numel())
        ids[i, : p.numel()] = p
        ids[i, p.numel(): p.numel() + n] = c[:n]
        labels[i, p.numel(): p.numel() + n] = c[:n]
        new += n
    return Generated({"input_ids": ids, "labels": labels}, new)


@torch.no_grad()
def generate_batch(model: torch.nn.Module, prompts: list[torch.Tensor], *, seq_len: int, max_new_tokens: int,
                   temperature: float, top_p: float, seed: int, pad_id: int, synced: bool = False,
                   greedy: bool = False) -> Generated:
    """Sample a completion of each prompt from `model` (left-padded, HF `generate`; `greedy`: the argmax) and lay
    prompt + completion out right-padded in `seq_len` columns, labels on the completion only. The prompt is cut
    from the left so that prompt + `max_new_tokens` fit."""
    hf = unwrap_hf(model)
    device = prompts[0].device
    keep = max(1, seq_len - max_new_tokens)
    prompts = [p[-keep:] for p in prompts]
    width = max(p.numel() for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    attn = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - p.numel():] = p
        attn[i, width - p.numel():] = 1
    was_training = hf.training
    hf.eval()
    gen_cfg = getattr(hf, "generation_config", None)
    eos = getattr(gen_cfg, "eos_token_id", None) or getattr(hf.config, "eos_token_id", None)
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):  # the run's own RNG streams are left as they were
            torch.manual_seed(seed)
            sampling = {} if greedy else {"temperature": temperature, "top_p": top_p, "top_k": 0}
            out = hf.generate(input_ids=ids, attention_mask=attn, do_sample=not greedy, **sampling,
                              max_new_tokens=max_new_tokens, min_new_tokens=1, pad_token_id=pad_id,
                              eos_token_id=eos, synced_gpus=synced, use_cache=True)
    finally:
        hf.train(was_training)
    eos_ids = torch.as_tensor([eos] if isinstance(eos, int) else list(eos or []), device=device)
    completions = []
    for c in out[:, width:]:
        if eos_ids.numel():  # up to and including the first end-of-sequence token
            ends = torch.nonzero(torch.isin(c, eos_ids)).flatten()
            c = c[: int(ends[0]) + 1] if ends.numel() else c
        completions.append(c)
    return _layout(prompts, completions, seq_len, pad_id)


class TeacherSamples:
    """The teacher's completion of each training block's prompt, on disk once: every rank appends the ones it
    generates to its own file (records: block index, length, tokens; a record cut short by a crash is ignored)
    and reads every rank's file when it starts."""

    def __init__(self, root: str | os.PathLike, rank: int = 0) -> None:
        self.root = Path(root)
        self.path = self.root / f"samples-rank{rank}.bin"
        self.samples: dict[int, torch.Tensor] = {}
        for f in sorted(self.root.glob("samples-rank*.bin")) if self.root.is_dir() else []:
            data, pos = f.read_bytes(), 0
            while pos + 12 <= len(data):
                index, n = struct.unpack_from("<qi", data, pos)
                if pos + 12 + 4 * n > len(data):
                    break  # a torn last record
                self.samples[index] = torch.from_numpy(np.frombuffer(data, "<i4", n, pos + 12).astype(np.int64))
                pos += 12 + 4 * n

    def get(self, index: int) -> torch.Tensor | None:
        return self.samples.get(int(index))

    def put(self, items: dict[int, torch.Tensor]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.path, "ab") as f:
            for index, tokens in items.items():
                t = tokens.detach().cpu().numpy().astype("<i4")
                f.write(struct.pack("<qi", int(index), t.size) + t.tobytes())
                self.samples[int(index)] = tokens.detach().cpu()
            f.flush()
            os.fsync(f.fileno())


LOSS_KEYS = ("divergence", "beta", "temperature", "kd_weight", "ce_weight", "chunk_size", "router_aux_weight")


class OnPolicy:
    """Replaces the drawn micro-batches of each step with the student's samples (module docstring)."""

    def __init__(self, model: torch.nn.Module, distill_cfg: Any, *, seed: int, seq_len: int, chat: bool,
                 pad_id: int, synced: bool, rank: int = 0, world: int = 1, teacher: torch.nn.Module | None = None,
                 samples_dir: str | os.PathLike | None = None) -> None:
        op = distill_cfg.on_policy
        self.model, self.seed, self.seq_len, self.chat, self.pad_id, self.synced = \
            model, int(seed), int(seq_len), chat, int(pad_id), synced
        self.rank, self.world = rank, world
        self.teacher = teacher if op.get("teacher_samples") else None
        self.cache = TeacherSamples(samples_dir, rank) if self.teacher is not None else None
        self.fraction, self.max_new_tokens = float(op.fraction), int(op.max_new_tokens)
        self.temperature, self.top_p = float(op.temperature), float(op.top_p)
        # the loss on the student's own samples: the divergence alone (CE on them would teach its own mistakes)
        self.loss_cfg = SimpleNamespace(**{k: getattr(distill_cfg, k, None) for k in LOSS_KEYS})
        self.loss_cfg.divergence = op.divergence or distill_cfg.divergence
        self.loss_cfg.ce_weight = 0.0

    @classmethod
    def from_config(cls, cfg: Any, model: torch.nn.Module, tokenizer: Any, data: Any, synced: bool,
                    rank: int = 0, world: int = 1, teacher: torch.nn.Module | None = None,
                    output_dir: str | os.PathLike = ".") -> OnPolicy | None:
        """The run's sampler, or None when `distill.on_policy.fraction` is 0 and teacher samples are off."""
        op = cfg.distill.on_policy
        if not op.fraction and not op.get("teacher_samples"):
            return None
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return cls(model, cfg.distill, seed=cfg.trainer.seed, seq_len=data.train.seq_len,
                   chat=data.meta.get("format") == "chat" or any(m.get("format") == "chat"
                                                                  for m in data.meta.get("sources", [])),
                   pad_id=pad or 0, synced=synced, rank=rank, world=world, teacher=teacher,
                   samples_dir=Path(output_dir) / "teacher_samples")

    def replace(self, micro: list[dict[str, torch.Tensor]], step: int) -> tuple[list[dict[str, Any]], dict[str, float]]:
        """`micro` with its drawn micro-batches generated (marked `on_policy`), and what generating took."""
        out, stats = [], {"batches": 0, "tokens": 0, "seconds": 0.0}
        for j, mb in enumerate(micro):
            if not draw(self.seed, step, j, self.fraction):
                out.append(mb if self.teacher is None else self.teacher_batch(mb, stats))
                continue
            t0 = time.perf_counter()
            g = generate_batch(self.model, prompts_from_batch(mb, self.chat), seq_len=self.seq_len,
                               max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                               seed=sample_seed(self.seed, step, j * self.world + self.rank), pad_id=self.pad_id,
                               synced=self.synced)
            stats["seconds"] += time.perf_counter() - t0
            stats["batches"] += 1
            stats["tokens"] += g.new_tokens
            out.append({**g.batch, "on_policy": True})
        return out, stats


    def teacher_batch(self, mb: dict[str, torch.Tensor], stats: dict[str, float]) -> dict[str, torch.Tensor]:
        """The teacher's (cached, else generated and cached) greedy completions of the micro-batch's prompts."""
        prompts = prompts_from_batch(mb, self.chat)
        keep = max(1, self.seq_len - self.max_new_tokens)
        prompts = [p[-keep:] for p in prompts]
        indices = mb["index"].tolist()
        missing = torch.tensor(float(any(self.cache.get(i) is None for i in indices)), device=prompts[0].device)
        if self.synced:  # a ZeRO-3 teacher: generate on every rank whenever one needs to
            all_reduce_sum(missing)
        if float(missing) > 0:
            t0 = time.perf_counter()
            g = generate_batch(self.teacher, prompts, seq_len=self.seq_len, max_new_tokens=self.max_new_tokens,
                               temperature=1.0, top_p=1.0, seed=0, pad_id=self.pad_id, synced=self.synced,
                               greedy=True)
            self.cache.put({i: g.batch["input_ids"][k][g.batch["labels"][k] != IGNORE_INDEX]
                            for k, i in enumerate(indices) if self.cache.get(i) is None})
            stats["seconds"] += time.perf_counter() - t0
            stats["tokens"] += g.new_tokens
        device = prompts[0].device
        return _layout(prompts, [self.cache.get(i).to(device) for i in indices], self.seq_len, self.pad_id).batch


class GenerationWindow:
    """Generation throughput between two logged steps: sampled tokens/s and the share of the time generating."""

    def __init__(self) -> None:
        self.batches, self.tokens, self.seconds = 0, 0, 0.0

    def add(self, stats: dict[str, float]) -> None:
        self.batches += int(stats["batches"])
        self.tokens += int(stats["tokens"])
        self.seconds += stats["seconds"]

    def record(self, window_s: float) -> dict[str, float]:
        rec = {"on_policy_batches": self.batches, "gen_tokens": self.tokens,
               "gen_tokens_per_s": self.tokens / self.seconds if self.seconds else 0.0,
               "gen_share": self.seconds / window_s if window_s > 0 else 0.0}
        self.__init__()
        return rec
