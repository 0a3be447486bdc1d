"""`sapling distill`: a student distilled from a teacher (online, or from a `sapling cache-teacher` cache),
given (`student.path`, `student.config`) or made by `hooks.pre=[prune]`."""

from __future__ import annotations

import logging
import math
from pathlib import Path

from omegaconf import DictConfig

from sapling.errors import ConfigError
from sapling.models import build_model, check_same_tokenizer, load_tokenizer, source_config
from sapling.models.shapes import check_vocab
from sapling.recipes.common import (
    check_prune_target,
    check_tokenizer_fits,
    engine_ds_config,
    finished_result,
    load_data_once,
    prepare_training_output,
    setup_distributed,
    student_config,
    tokenizer_path,
    train_with_hooks,
)
from sapling.train.loop import TrainResult

log = logging.getLogger("sapling")


def run_distill(cfg: DictConfig) -> TrainResult:
    """Distil `teacher` into a student: `student.path`, the teacher's architecture with `student.config`
    (random init), or the teacher pruned to `prune.target` by `hooks.pre=[prune]`. With `teacher.cache`
    the teacher's top-k distributions (and the data) come from a `sapling cache-teacher` cache."""
    if cfg.teacher.cache is not None:
        return run_distill_from_cache(cfg)
    teacher_cfg = source_config(cfg.teacher)
    tokenizer = load_tokenizer(tokenizer_path(cfg, "teacher", "student"))
    pruning = "prune" in cfg.hooks.pre
    kd_vocab = None
    if pruning:
        check_prune_target(cfg, teacher_cfg)
    else:
        check_same_tokenizer(cfg.teacher.path, cfg.student.path)
        student_cfg = student_config(cfg, teacher_cfg, tokenizer_size=len(tokenizer))
        kd_vocab = check_vocab(teacher_cfg, student_cfg, len(tokenizer))
    check_tokenizer_fits(tokenizer, teacher_cfg, "teacher.config")
    device = setup_distributed(cfg)
    out, plan = prepare_training_output(cfg)
    if plan.action == "finished":
        return finished_result(cfg, plan)
    data = load_data_once(cfg, tokenizer)
    # Each model is built for its own engine (under ZeRO-3: partitioned while it loads).
    teacher = build_model(cfg.teacher, teacher_cfg, device, seed=cfg.seed,
                          ds_config=engine_ds_config(cfg, "teacher", cfg.teacher, device))
    student = None if pruning else build_model(cfg.student, student_cfg, device, seed=cfg.seed + 1,
                                               ds_config=engine_ds_config(cfg, "student", cfg.student, device))
    return train_with_hooks(cfg, "distill", teacher=teacher, student=student, tokenizer=tokenizer, data=data,
                            out=out, device=device, kd_vocab=kd_vocab)


def run_distill_from_cache(cfg: DictConfig) -> TrainResult:
    """`sapling distill teacher.cache=C`: no teacher model (except to prune from, `hooks.pre=[prune]`); the
    training blocks and the teacher's top-k come from the cache, each rank reading its share."""
    from transformers import AutoConfig

    from sapling.data.cache import tokenizer_hash
    from sapling.distill.teacher_cache import TeacherCache, teacher_fingerprint

    cache = TeacherCache(cfg.teacher.cache, verify=False)  # manifest and shard sizes; sha256 once ranks are up
    m = cache.manifest
    teacher_cfg = AutoConfig.from_pretrained(cache.teacher_config_dir)
    if cfg.cache.top_k is not None and cfg.cache.top_k != cache.top_k:
        raise ConfigError("cache.top_k", cfg.cache.top_k, f"teacher.cache={cfg.teacher.cache} holds top-{cache.top_k} "
                          "distributions", f"drop cache.top_k (or set {cache.top_k}), or write a cache with "
                          f"cache.top_k={cfg.cache.top_k}")
    if not math.isclose(cfg.distill.temperature, cache.temperature, rel_tol=1e-9):
        raise ConfigError("distill.temperature", cfg.distill.temperature, f"teacher.cache={cfg.teacher.cache} holds "
                          f"the teacher's distributions at temperature {cache.temperature}",
                          f"set distill.temperature={cache.temperature}, or write a cache with "
                          f"cache.temperature={cfg.distill.temperature}")
    tok_key, tok_dir = ("data.tokenizer", cfg.data.tokenizer) if cfg.data.tokenizer else (
        ("student.path", cfg.student.path) if cfg.student.path and Path(cfg.student.path, "tokenizer_config.json").exists()
        else ("teacher.cache", str(cache.tokenizer_dir)))
    tokenizer = load_tokenizer(tok_dir)
    if tokenizer_hash(tokenizer) != m["tokenizer_hash"]:
        raise ConfigError(tok_key, tok_dir, f"its tokenizer is not the one teacher.cache={cfg.teacher.cache} was "
                          f"written with (sha256 {tokenizer_hash(tokenizer)[:12]} vs {m['tokenizer_hash'][:12]})",
                          f"use the cache's tokenizer ({cache.tokenizer_dir}) or write a cache with this tokenizer")
    pruning = "prune" in cfg.hooks.pre
    kd_vocab = None
    if pruning:
        source_cfg = source_config(cfg.teacher)
        if teacher_fingerprint(cfg.teacher, source_cfg, cfg.seed) != m["teacher_hash"]:
            raise ConfigError("teacher.path", cfg.teacher.path or cfg.teacher.tiny, "not the teacher teacher.cache="
                              f"{cfg.teacher.cache} was written from ({m['teacher_source']})",
                              "prune the teacher the cache came from, or write a cache from this teacher")
        check_prune_target(cfg, source_cfg, seq_len=cache.seq_len)
    else:
        check_same_tokenizer(str(cache.tokenizer_dir), cfg.student.path)
        student_cfg = student_config(cfg, teacher_cfg, seq_len=cache.seq_len, tokenizer_size=len(tokenizer))
        kd_vocab = check_vocab(teacher_cfg, student_cfg, len(tokenizer))
    device = setup_distributed(cfg)
    if cfg.cache.verify:
        cache.verify()
    if cfg.data.files or cfg.data.hub_name or cfg.data.mix:
        fp = load_data_once(cfg, tokenizer).fingerprint
        if fp != m["data_fingerprint"]:
            d = m.get("data_config", {})
            raise ConfigError("data.files", list(cfg.data.files) or cfg.data.hub_name, "these data settings give "
                              f"fingerprint {fp[:12]}, but teacher.cache={cfg.teacher.cache} was written for data "
                              f"{m['data_fingerprint'][:12]} ({', '.join(f'{k}={v}' for k, v in d.items())})",
                              "drop data.files (the cache holds the token ids) or pass the data the cache was written for")
    out, plan = prepare_training_output(cfg)
    if plan.action == "finished":
        return finished_result(cfg, plan)
    data = cache.packed_data()
    teacher = None
    if pruning:
        teacher = build_model(cfg.teacher, source_cfg, device, seed=cfg.seed,
                              ds_config=engine_ds_config(cfg, "teacher", cfg.teacher, device))
    student = None if pruning else build_model(cfg.student, student_cfg, device, seed=cfg.seed + 1,
                                               ds_config=engine_ds_config(cfg, "student", cfg.student, device))
    return train_with_hooks(cfg, "distill", teacher=teacher, student=student, tokenizer=tokenizer, data=data,
                            out=out, device=device, teacher_for_hooks_only=True, kd_vocab=kd_vocab)
