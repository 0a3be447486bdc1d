"""The `train`, `distill` and `eval` commands: build components from config, run, write outputs."""

from __future__ import annotations

import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from sapling.config import ConfigError, check_prune_shape, check_shape, check_source_shape, check_vocab
from sapling.data import PackedData, build_packed_data
from sapling.dist import barrier, broadcast_object, init_distributed, is_main, launch_env, rank_world
from sapling.errors import DataError, OutputError, SaplingError
from sapling.eval.perplexity import PERPLEXITY_COLUMNS, perplexity_rows
from sapling.eval.report import write_report
from sapling.io import check_output, claim_output, write_text_atomically
from sapling.models import (
    build_model,
    count_parameters,
    load_tokenizer,
    resolve_dtype,
    save_hf_checkpoint,
    source_config,
)
from sapling.prune.hook import prune_teacher
from sapling.prune.select import TARGET_FIELDS
from sapling.train.checkpoint import latest_tag, read_state
from sapling.train.ds_config import student_ds_config, teacher_ds_config
from sapling.train.hooks import HookContext, run_hooks
from sapling.train.loop import TrainResult, fit
from sapling.train.metrics import MetricsLogger, NullMetrics
from sapling.train.resume import ResumePlan, mark_finished, mark_started, plan_resume

log = logging.getLogger("sapling")


def select_device(cfg: DictConfig) -> torch.device:
    want = cfg.trainer.device
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device", want, "no CUDA device is visible", "use trainer.device=auto or cpu")
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(want)


def command_inputs(cfg: DictConfig) -> list[tuple[str, str]]:
    """(key, local path) of everything a command reads: no output may equal, contain or lie inside one."""
    items = [(f"{k}.path", cfg[k].path) for k in ("teacher", "student", "model")]
    items += [("teacher.cache", cfg.teacher.cache), ("prune.scores", cfg.prune.scores),
              ("data.tokenizer", cfg.data.tokenizer)]
    items += [(f"data.files[{i}]", f) for i, f in enumerate(cfg.data.files)]
    return [(k, v) for k, v in items if v is not None and Path(os.path.expanduser(str(v))).exists()]


def prepare_output(cfg: DictConfig) -> Path:
    """`output_dir`, checked (`sapling.io.check_output`: never an input, never another command's or a user's
    directory), made, as rank 0 resolved it: every rank composes its own config, and a time-stamped
    run dir (`${now:...}`) may differ between ranks that started a second apart. Every rank writes its
    checkpoint shards there, so all must agree (a rank's own Hydra dir then holds only its log).

    Rank 0 decides; a refusal reaches every rank as the same OutputError (no rank waits for a peer that
    gave up)."""
    agreed = broadcast_object(str(cfg.output_dir))
    if agreed != str(cfg.output_dir):
        cfg.output_dir = agreed
    error = None
    if is_main():
        try:
            claim_output("output_dir", cfg.output_dir, command=cfg.command, inputs=command_inputs(cfg))
        except OutputError as err:
            error = str(err)
    error = broadcast_object(error)
    if error is not None:
        raise OutputError(error)
    out = Path(cfg.output_dir)
    if is_main():
        write_text_atomically(out / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    return out


def prepare_training_output(cfg: DictConfig) -> tuple[Path, ResumePlan]:
    """:func:`prepare_output`, then what to do with an earlier run there (`sapling.train.resume`), decided on
    rank 0 before any model loads and shared with every rank."""
    agreed = broadcast_object(str(cfg.output_dir))
    if agreed != str(cfg.output_dir):
        cfg.output_dir = agreed
    out, plan, error = Path(cfg.output_dir), None, None
    if is_main():
        try:
            # the plan needs the run record, which claim_output writes: check first, then claim
            check_output("output_dir", out, command=cfg.command, inputs=command_inputs(cfg))
            plan = plan_resume(out, cfg.trainer, cfg.command)
        except SaplingError as err:
            error = str(err)
    plan, error = broadcast_object((plan, error))
    if error is not None:
        raise OutputError(error)
    if plan.action == "finished":
        return out, plan
    out = prepare_output(cfg)
    if is_main():
        mark_started(out, plan)
    return out, plan


def finished_result(cfg: DictConfig, plan: ResumePlan) -> TrainResult:
    """The result of a rerun of a finished run: nothing trained, nothing written."""
    if is_main():
        print(f"sapling {cfg.command}: the run in {cfg.output_dir} already finished at step {plan.step} (model in "
              f"{Path(cfg.output_dir) / 'model'}); nothing to do. Raise trainer.max_steps to train on, or choose a "
              "new output_dir", file=sys.stderr)
    return TrainResult(steps=plan.step, tokens=0, wall_s=0.0, model_dir=Path(cfg.output_dir) / "model",
                       already_finished=True)


def setup_distributed(cfg: DictConfig) -> torch.device:
    """This process's device; with `deepspeed=zero*` also joins the process group (torchrun/Slurm env)."""
    device = select_device(cfg)
    if cfg.deepspeed.name == "none":
        launch = launch_env()
        if launch.world_size > 1:
            raise ConfigError("deepspeed", "none", f"launched as {launch.world_size} processes ({launch.source}), "
                              "but deepspeed=none trains in one", "add deepspeed=zero1|zero2|zero3 (or launch one process)")
        return device
    return init_distributed(device.type).device


def engine_ds_config(cfg: DictConfig, role: str, src: Any, device: torch.device) -> dict | None:
    """The DeepSpeed config of the engine a model will run in ("teacher" or "student"), or None without one."""
    if cfg.deepspeed.name == "none":
        return None
    world = rank_world()[1]
    dtype = resolve_dtype(src.dtype, device)
    return teacher_ds_config(cfg, world, dtype) if role == "teacher" else student_ds_config(cfg, world, dtype)


def load_data_once(cfg: DictConfig, tokenizer: Any) -> PackedData:
    """`load_data` on rank 0 first (it tokenizes and fills the cache), then on the other ranks from the cache."""
    data = load_data(cfg, tokenizer) if is_main() else None
    barrier()
    return data if data is not None else load_data(cfg, tokenizer)


def tokenizer_path(cfg: DictConfig, *fallback_keys: str) -> str:
    if cfg.data.tokenizer is not None:
        return cfg.data.tokenizer
    for key in fallback_keys:
        if OmegaConf.select(cfg, f"{key}.path") is not None:
            return OmegaConf.select(cfg, f"{key}.path")
    raise ConfigError("data.tokenizer", None, f"no tokenizer: {' and '.join(fallback_keys)} have no path",
                      "pass data.tokenizer=<dir with tokenizer files>")


def load_data(cfg: DictConfig, tokenizer: Any, *, val_fraction: float | None = None) -> PackedData:
    d = cfg.data
    return build_packed_data(
        list(d.files) or None, tokenizer, d.seq_len, hub_name=d.hub_name, hub_config=d.hub_config,
        hub_split=d.hub_split, text_field=d.text_field,
        val_fraction=d.val_fraction if val_fraction is None else val_fraction, seed=d.seed,
        max_tokens=d.max_tokens, cache_dir=d.cache_dir or str(Path(cfg.cache_dir) / "data"), num_proc=d.num_proc,
    )


def check_tokenizer_fits(tokenizer: Any, model_cfg: Any, key: str) -> None:
    if len(tokenizer) > model_cfg.vocab_size:
        raise ConfigError(f"{key}.vocab_size", model_cfg.vocab_size, f"smaller than the tokenizer's {len(tokenizer)} "
                          "tokens", f"use the tokenizer the model was trained with, or set {key}.config.vocab_size")


def student_config(cfg: DictConfig, teacher_cfg: Any, *, seq_len: int | None = None) -> Any:
    """The student's HF config: `student.path`'s, or the teacher's with `student.config` overrides; checked
    (with the teacher's, against `seq_len`, default data.seq_len) before any weights load."""
    seq_len = cfg.data.seq_len if seq_len is None else seq_len
    check_shape("teacher.config", teacher_cfg, seq_len=seq_len)
    base = teacher_cfg if cfg.student.path is None else None
    student_cfg = source_config(cfg.student, base=base)
    check_source_shape("student.config", cfg.student, student_cfg, base=base, seq_len=seq_len)
    check_vocab(teacher_cfg, student_cfg)
    return student_cfg


def check_prune_target(cfg: DictConfig, teacher_cfg: Any, *, seq_len: int | None = None) -> None:
    """Fail before any model loads when `prune.target` cannot be met (explicit fields or a budget): the
    target's HF config is built as the pruner will and checked with the teacher's (`check_shape`)."""
    seq_len = cfg.data.seq_len if seq_len is None else seq_len
    check_shape("teacher.config", teacher_cfg, seq_len=seq_len)
    check_prune_shape(teacher_cfg, OmegaConf.to_container(cfg.prune.target), seq_len=seq_len)
    if cfg.prune.target.params is not None:
        from sapling.prune.search import candidate_shapes

        s = cfg.prune.search
        candidate_shapes(teacher_cfg, int(cfg.prune.target.params), multiple=s.multiple, tolerance=s.tolerance,
                         max_candidates=s.max_candidates)


def train_with_hooks(cfg: DictConfig, command: str, *, teacher: torch.nn.Module | None,
                     student: torch.nn.Module | None,
                     tokenizer: Any, data: PackedData, out: Path, device: torch.device,
                     teacher_for_hooks_only: bool = False) -> TrainResult:
    """Pre-hooks, the training loop, post-hooks; metrics to `out/metrics.jsonl` (and wandb).

    `teacher_for_hooks_only`: the teacher is there for the pre-hooks (pruning) and dropped before training
    (the run distils from a teacher cache).

    In a distributed run every rank runs all of it (hooks may run ZeRO-3 forwards, which need every rank),
    but only rank 0 writes into `out`: the other ranks log nowhere and give hooks a scratch directory.
    """
    main = is_main()
    if main:
        metrics = MetricsLogger(out, cfg.logger, OmegaConf.to_container(cfg, resolve=True),
                                run_id=resumed_wandb_run_id(cfg, out))
    else:
        metrics = NullMetrics()
    scratch = None if main else tempfile.TemporaryDirectory(prefix="sapling-rank-")
    ctx = HookContext(cfg=cfg, teacher=teacher, student=student, tokenizer=tokenizer, data=data,
                      output_dir=out if scratch is None else Path(scratch.name), metrics=metrics, device=device)
    if cfg.trainer.resume and not cfg.trainer.overwrite:
        tag = latest_tag(out / "checkpoints")
        if tag is not None and (tag / "hf" / "config.json").is_file():
            ctx.extras["resume_shape_dir"] = tag / "hf"  # the prune hook takes the shape, not a new calibration
    try:
        run_hooks("pre", cfg.hooks.pre, ctx)
        if ctx.student is None:
            raise ConfigError("student.path", None, "no student", "give student.path=<HF checkpoint dir>, "
                              "student.config.<hf_field>=N overrides of the teacher's shape, or hooks.pre=[prune]")
        if teacher_for_hooks_only:
            ctx.teacher = teacher = None
        if cfg.quant.aware:  # train through the export's quantized weights (straight-through)
            from sapling.quant.numerics import spec_from_config
            from sapling.quant.qat import enable_quant_aware

            names = enable_quant_aware(ctx.student, spec_from_config(cfg.quant), list(cfg.quant.ignore),
                                       cfg.quant.skip_incompatible)
            metrics.log({"event": "quant_aware", "linears": len(names), "format": spec_from_config(cfg.quant).label})
            if "quantize" not in cfg.hooks.post:
                log.warning("quant.aware=true without hooks.post=[quantize]: the run saves the latent weights "
                            "only; export them with `sapling quantize model.path=%s/model quant.method=rtn`", out)
        start = {"event": "start", "command": command, "student_params": count_parameters(ctx.student),
                 "teacher_params": count_parameters(teacher) if teacher is not None else 0,
                 "train_tokens": data.train.num_tokens}
        if data.meta.get("teacher_cache"):
            start.update({k: data.meta[k] for k in ("teacher_cache", "top_k", "temperature")})
        metrics.log(start)
        fit_cfg = ctx.extras.get("fit_cfg", cfg)  # a pre-hook may have spent part of the step budget
        ctx.result = fit(fit_cfg, student=ctx.student, teacher=teacher, tokenizer=tokenizer, data=data, output_dir=out,
                         metrics=metrics, device=device, desc=command)
        if not ctx.result.stopped:  # a preempted run resumes later; post-hooks run when it finishes
            run_hooks("post", cfg.hooks.post, ctx)
            if main:
                mark_finished(out, cfg.trainer.max_steps)  # the command's budget (prune rounds spent part of it)
    finally:
        metrics.close()
        if scratch is not None:
            scratch.cleanup()
    return ctx.result


def resumed_wandb_run_id(cfg: DictConfig, out: Path) -> str | None:
    """The wandb run id stored in the checkpoint this run will resume from, so wandb continues that run."""
    if not cfg.trainer.resume:
        return None
    try:
        tag = latest_tag(out / "checkpoints")
        return read_state(tag).get("wandb_run_id") if tag is not None else None
    except (OSError, ValueError, RuntimeError):
        return None  # the loop reports an unreadable checkpoint itself


def run_distill(cfg: DictConfig) -> TrainResult:
    """Distil `teacher` into a student: `student.path`, the teacher's architecture with `student.config`
    (random init), or the teacher pruned to `prune.target` by `hooks.pre=[prune]`. With `teacher.cache`
    the teacher's top-k distributions (and the data) come from a `sapling cache-teacher` cache."""
    if cfg.teacher.cache is not None:
        return run_distill_from_cache(cfg)
    teacher_cfg = source_config(cfg.teacher)
    pruning = "prune" in cfg.hooks.pre
    if pruning:
        check_prune_target(cfg, teacher_cfg)
    else:
        student_cfg = student_config(cfg, teacher_cfg)
    tokenizer = load_tokenizer(tokenizer_path(cfg, "teacher", "student"))
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
                            out=out, device=device)


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
    if pruning:
        source_cfg = source_config(cfg.teacher)
        if teacher_fingerprint(cfg.teacher, source_cfg, cfg.seed) != m["teacher_hash"]:
            raise ConfigError("teacher.path", cfg.teacher.path or cfg.teacher.tiny, "not the teacher teacher.cache="
                              f"{cfg.teacher.cache} was written from ({m['teacher_source']})",
                              "prune the teacher the cache came from, or write a cache from this teacher")
        check_prune_target(cfg, source_cfg, seq_len=cache.seq_len)
    else:
        student_cfg = student_config(cfg, teacher_cfg, seq_len=cache.seq_len)
    device = setup_distributed(cfg)
    if cfg.cache.verify:
        cache.verify()
    if cfg.data.files or cfg.data.hub_name:
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
                            out=out, device=device, teacher_for_hooks_only=True)


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
    d = cfg.data
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


def run_prune(cfg: DictConfig) -> dict[str, Any]:
    """Prune `teacher` to `prune.target`; writes `model/` and a report with perplexity before and after."""
    teacher_cfg = source_config(cfg.teacher)
    check_prune_target(cfg, teacher_cfg)
    tokenizer = load_tokenizer(tokenizer_path(cfg, "teacher"))
    check_tokenizer_fits(tokenizer, teacher_cfg, "teacher.config")
    device = select_device(cfg)
    out = prepare_output(cfg)
    data = load_data(cfg, tokenizer)
    teacher = build_model(cfg.teacher, teacher_cfg, device, seed=cfg.seed)
    metrics = MetricsLogger(out, None)
    try:
        outcome = prune_teacher(cfg, teacher, data, device, out, metrics, tokenizer=tokenizer)
        student = outcome.student
        save_hf_checkpoint(student, tokenizer, out / "model")
        rows = perplexity_rows([("teacher", teacher), ("pruned", student)], data.val, cfg.eval, device, metrics,
                               max_tokens=cfg.trainer.eval_tokens, progress=cfg.trainer.progress)
    finally:
        metrics.close()
    shapes = [[k, getattr(teacher.config, k), getattr(student.config, k)] for k in TARGET_FIELDS]
    sections = [
        ("Validation perplexity (before any distillation)", PERPLEXITY_COLUMNS, rows),
        ("Shapes", ["field", "teacher", "pruned"], shapes),
    ]
    if outcome.search_rows:
        from sapling.prune.search import format_table

        sections.append(("Parameter-budget search (candidates ranked by held-out LM loss)",
                         format_table(outcome.search_rows)))
    write_report(out / "report.md", "Sapling pruning report", sections)
    return {"model_dir": str(out / "model")}


def run_train(cfg: DictConfig) -> TrainResult:
    """Train `model` with CE only: from scratch (model.tiny / model.config) or fine-tuning model.path."""
    model_cfg = source_config(cfg.model)
    check_source_shape("model.config", cfg.model, model_cfg, seq_len=cfg.data.seq_len)
    tokenizer = load_tokenizer(tokenizer_path(cfg, "model"))
    check_tokenizer_fits(tokenizer, model_cfg, "model.config")
    device = setup_distributed(cfg)
    out, plan = prepare_training_output(cfg)
    if plan.action == "finished":
        return finished_result(cfg, plan)
    data = load_data_once(cfg, tokenizer)
    model = build_model(cfg.model, model_cfg, device, seed=cfg.seed,
                        ds_config=engine_ds_config(cfg, "student", cfg.model, device))
    return train_with_hooks(cfg, "train", teacher=None, student=model, tokenizer=tokenizer, data=data, out=out,
                            device=device)


def run_quantize(cfg: DictConfig) -> dict[str, Any]:
    """`sapling quantize model.path=S`: post-training quantization of S into `output_dir/model`
    (compressed-tensors), with a report of validation perplexity and size before and after."""
    from sapling.quant.hook import SUMMARY_COLUMNS, quantize_student, summary_rows

    model_cfg = source_config(cfg.model)
    tokenizer = load_tokenizer(tokenizer_path(cfg, "model"))
    device = select_device(cfg)
    out = prepare_output(cfg)
    data = load_data(cfg, tokenizer) if (cfg.data.files or cfg.data.hub_name) else None
    src = OmegaConf.merge(cfg.model, {"dtype": "float32"})  # quantize from full-precision weights
    # quant.offload: the model stays in CPU memory and one decoder layer at a time goes to the device
    model = build_model(src, model_cfg, torch.device("cpu") if cfg.quant.offload else device, seed=cfg.seed)
    teacher = None
    if cfg.quant.guided:
        teacher = build_model(cfg.teacher, source_config(cfg.teacher), device, seed=cfg.seed)
    metrics = MetricsLogger(out, None)
    try:
        summary = quantize_student(cfg, model, teacher=teacher, data=data, tokenizer=tokenizer, device=device,
                                   out_dir=out / "model", metrics=metrics)
    finally:
        metrics.close()
    write_report(out / "report.md", "Sapling quantization report", [
        ("Validation perplexity and size", SUMMARY_COLUMNS, summary_rows(summary)),
        ("Export", f"- {cfg.model.path} -> {out / 'model'} (compressed-tensors pack-quantized, "
                   f"{summary['quantized_linears']} linears quantized, {len(summary['skipped'])} left 16-bit; "
                   f"quantization took {summary['quantize_s']:.1f} s)"),
    ])
    return summary


def run_eval(cfg: DictConfig) -> dict[str, Any]:
    """`sapling eval model.path=M [teacher.path=T]`: sliding-window perplexity of M (and T) on all of
    `data.files`, agreement of M with T, generation speed, size and peak memory; writes report.md.

    M may be any HF checkpoint dir or a compressed-tensors export (`sapling quantize`), which is loaded
    with its weights dequantized: the numbers are those of the quantized weights.
    """
    from sapling.eval.evaluate import (
        disk_bytes,
        generation_speed,
        is_quantized_checkpoint,
        peak_memory_gib,
        prompt_batch,
        sliding_window_eval,
        token_stream,
    )
    from sapling.eval.harness import check_harness, run_harness
    from sapling.quant.hook import load_quantized

    e = cfg.eval
    check_harness(list(e.tasks), list(e.task_paths))
    model_cfg = source_config(cfg.model)
    tokenizer = load_tokenizer(tokenizer_path(cfg, "model"))
    device = select_device(cfg)
    window = int(e.window or cfg.data.seq_len)
    stride = int(e.stride or max(1, window // 2))
    limit = getattr(model_cfg, "max_position_embeddings", None)
    if limit is not None and window > limit:
        raise ConfigError("eval.window", window, f"longer than the model's max_position_embeddings ({limit})",
                          f"set eval.window={limit} or less")
    out = prepare_output(cfg)
    stream = token_stream(load_data(cfg, tokenizer, val_fraction=0.0).train, e.max_tokens)
    if stream.numel() < 2:
        raise DataError(f"data.files hold {stream.numel()} token(s) after packing: nothing to evaluate; fix: pass "
                        "data.files with some text in them")
    prompts = prompt_batch(stream, e.gen_batch, e.gen_prompt_len)

    def load(key: str, mcfg: Any) -> torch.nn.Module:
        src = cfg[key]
        if is_quantized_checkpoint(src.path):
            return load_quantized(os.path.expanduser(src.path), device)
        return build_model(src, mcfg, device, seed=cfg.seed)

    teacher = None
    if cfg.teacher.path is not None or cfg.teacher.tiny is not None:
        teacher_cfg = source_config(cfg.teacher)
        check_vocab(teacher_cfg, model_cfg)
        teacher = load("teacher", teacher_cfg)
    rows: list[dict[str, Any]] = []
    metrics = MetricsLogger(out, None)
    try:
        for key in ("model", "teacher"):
            if key == "teacher" and teacher is None:
                continue
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            model = load("model", model_cfg) if key == "model" else teacher
            src = cfg[key]
            t0 = time.perf_counter()
            res = sliding_window_eval(model, stream, window=window, stride=stride, micro_batch_size=e.micro_batch_size,
                                      device=device, teacher=teacher if key == "model" else None)
            res["eval_s"] = time.perf_counter() - t0
            if prompts is not None and e.gen_tokens > 0:
                res.update(generation_speed(model, prompts, e.gen_tokens, device))
            harness = run_harness(model, tokenizer, list(e.tasks), task_paths=list(e.task_paths),
                                  num_fewshot=e.num_fewshot, limit=e.limit, batch_size=e.micro_batch_size,
                                  device=device) if e.tasks else []
            mem_kind, mem = peak_memory_gib(device)
            row = {"model": key, "path": src.path or src.tiny, "params": count_parameters(model),
                   "disk_bytes": disk_bytes(src.path), "quantized": is_quantized_checkpoint(src.path),
                   "window": window, "stride": stride, f"peak_{mem_kind}_gib": mem, **res}
            if harness:
                row["harness"] = harness
            metrics.log({"event": "eval", **row})
            rows.append(row)
            if key == "model":
                del model
    finally:
        metrics.close()
    write_report(out / "report.md", "Sapling evaluation", eval_report_sections(rows, window, stride, device))
    return {"rows": rows}


def eval_report_sections(rows: list[dict[str, Any]], window: int, stride: int, device: torch.device) -> list:
    """The report.md tables of `sapling eval`: perplexity, agreement with the teacher, speed and size."""
    def mb(n: int | None) -> str:
        return "" if n is None else f"{n / 2**20:.2f}"

    mem_key = next((k for k in rows[0] if k.startswith("peak_")), "peak_rss_gib")
    sections: list = [
        ("Perplexity", ["model", "path", "tokens scored", "loss (nats/token)", "perplexity"],
         [[r["model"], r["path"], f"{r['tokens']:,}", f"{r['loss']:.4f}", f"{r['ppl']:.2f}"] for r in rows]),
        ("Method", f"Sliding windows of {window} tokens every {stride} tokens over the files' token stream; each "
                   "token is scored once, with the context its window gives it."),
    ]
    agree = [r for r in rows if "kl" in r]
    if agree:
        sections.append(("Agreement with the teacher", ["model", "top-1 agreement", "mean KL(teacher ‖ model)"],
                         [[r["model"], f"{r['top1_agreement']:.2%}", f"{r['kl']:.4f}"] for r in agree]))
    sections.append((f"Size and speed ({device.type})",
                     ["model", "parameters", "weights on disk (MB)", "quantized", "generation (tokens/s)",
                      mem_key.replace("_gib", " (GiB)").replace("_", " ")],
                     [[r["model"], f"{r['params']:,}", mb(r["disk_bytes"]), "yes" if r["quantized"] else "no",
                       f"{r['gen_tokens_per_s']:,.1f}" if "gen_tokens_per_s" in r else "",
                       f"{r[mem_key]:.2f}"] for r in rows]))
    harness = [[r["model"], h["task"], h["metric"], f"{h['value']:.4f}",
                "" if h["stderr"] is None else f"{h['stderr']:.4f}"] for r in rows for h in r.get("harness", [])]
    if harness:
        sections.append(("lm-evaluation-harness", ["model", "task", "metric", "value", "stderr"], harness))
    return sections
