"""`sapling cache-teacher`: one teacher pass writing its top-k distributions."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from omegaconf import DictConfig

from sapling.dist import is_main, rank_world
from sapling.errors import ConfigError
from sapling.models import build_model, load_tokenizer, source_config
from sapling.models.shapes import check_shape
from sapling.recipes.common import (
    check_tokenizer_fits,
    engine_ds_config,
    load_data_once,
    prepare_output,
    setup_distributed,
    tokenizer_path,
)
from sapling.train.metrics import MetricsLogger, NullMetrics

log = logging.getLogger("sapling")


def run_cache_teacher(cfg: DictConfig) -> dict[str, Any]:
    """`sapling cache-teacher`: one (distributed) teacher pass over the training blocks into `cache.dir`."""
    from sapling.data.cache import tokenizer_hash
    from sapling.distill.teacher_cache import (
        DEFAULT_TOP_K,
        CachePlan,
        teacher_fingerprint,
        write_teacher_cache,
    )
    from sapling.distill.topk_format import RecordLayout, naive_bytes_per_token
    from sapling.train.engine import prepare_teacher

    c = cfg.cache
    d = cfg.data
    if d.format == "chat" or d.packing == "per_document":
        key, value = ("data.format", d.format) if d.format == "chat" else ("data.packing", d.packing)
        raise ConfigError(key, value, "a teacher cache holds token blocks only, not the label masks and position ids "
                          "of chat or per-document data", "distil from the teacher online (sapling distill without "
                          "cache.dir), or cache plain text with data.packing=stream")
    teacher_cfg = source_config(cfg.teacher)
    check_shape("teacher.config", teacher_cfg, seq_len=cfg.data.seq_len)
    top_k = c.top_k or DEFAULT_TOP_K
    if top_k > teacher_cfg.vocab_size:
        raise ConfigError("cache.top_k", top_k, f"larger than the teacher's vocabulary ({teacher_cfg.vocab_size})",
                          "choose a smaller k, e.g. cache.top_k=64")
    tokenizer = load_tokenizer(tokenizer_path(cfg, "teacher"))
    check_tokenizer_fits(tokenizer, teacher_cfg, "teacher.config")
    device = setup_distributed(cfg)
    out = prepare_output(cfg)
    data = load_data_once(cfg, tokenizer)
    world = rank_world()[1]
    teacher = build_model(cfg.teacher, teacher_cfg, device, seed=cfg.seed,
                          ds_config=engine_ds_config(cfg, "teacher", cfg.teacher, device))
    teacher = prepare_teacher(teacher, cfg, world)
    plan = CachePlan(
        data_fingerprint=data.fingerprint, tokenizer_hash=tokenizer_hash(tokenizer),
        teacher_hash=teacher_fingerprint(cfg.teacher, teacher_cfg, cfg.seed),
        teacher_source=cfg.teacher.path or f"tiny:{cfg.teacher.tiny}", top_k=top_k,
        temperature=float(c.temperature or cfg.distill.temperature),
        layout=RecordLayout(top_k, teacher_cfg.vocab_size, c.value_bits), seq_len=data.train.seq_len,
        num_sequences=len(data.train), num_val_sequences=len(data.val), shard_sequences=c.shard_sequences,
        token_dtype=data.train.array.dtype.str,
        data_config={"files": list(d.files), "hub_name": d.hub_name, "seq_len": d.seq_len,
                     "val_fraction": d.val_fraction, "seed": d.seed, "max_tokens": d.max_tokens},
    )
    metrics = MetricsLogger(out, None) if is_main() else NullMetrics()
    t0 = time.perf_counter()
    try:
        metrics.log({"event": "start", "command": "cache-teacher", "cache_dir": c.dir, **plan.to_dict()})
        manifest = write_teacher_cache(
            os.path.expanduser(c.dir), teacher=teacher, data=data, tokenizer=tokenizer, plan=plan,
            micro_batch_size=c.micro_batch_size or cfg.trainer.micro_batch_size, device=device,
            lockstep=world > 1 and cfg.deepspeed.teacher_stage == 3, metrics=metrics, progress=cfg.trainer.progress)
        wall = time.perf_counter() - t0
        tokens = plan.num_sequences * (plan.seq_len - 1)
        summary = {"event": "done", "tokens": tokens, "wall_s": wall, "bytes": manifest["total_bytes"],
                   "bytes_per_token": manifest["bytes_per_token"], "naive_bytes_per_token": naive_bytes_per_token(top_k)}
        metrics.log(summary)
    finally:
        metrics.close()
    if is_main():
        log.info("teacher cache %s: %d shards, %.1f MB, %.1f bytes/token (fp32 + int64 top-%d: %d)", c.dir,
                 len(manifest["shards"]), manifest["total_bytes"] / 1e6, manifest["bytes_per_token"], top_k,
                 naive_bytes_per_token(top_k))
    return manifest
