"""Builders every recipe shares: device, process group, output dir, data, tokenizer, shape checks, and
the pre-hooks -> training loop -> post-hooks sequence of the training commands (`train_with_hooks`)."""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from sapling.data import PackedData, build_packed_data
from sapling.data.chat import ChatFormat, template_text
from sapling.data.mixture import mix_entry, mix_packed_data
from sapling.dist import barrier, broadcast_object, init_distributed, is_main, launch_env, rank_world
from sapling.errors import ConfigError, OutputError, SaplingError
from sapling.io import check_output, claim_output, write_text_atomically
from sapling.models import count_parameters, install_kd_head, resolve_dtype, source_config
from sapling.models.families import is_moe
from sapling.models.shapes import check_shape, check_source_shape, check_vocab
from sapling.prune.select import check_prune_shape
from sapling.recipes.hooks import HookContext, run_hooks
from sapling.train.checkpoint import latest_tag, read_state
from sapling.train.ds_config import student_ds_config, teacher_ds_config
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
    items += [(f"data.mix[{i}].files[{j}]", f) for i, e in enumerate(cfg.data.mix) for j, f in enumerate(e.get("files") or [])]
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


_DATA_DEFAULTS = {"hub_name": None, "hub_config": None, "hub_split": "train", "text_field": "text", "max_tokens": None,
                  "num_proc": 1, "cache_dir": None, "format": "text", "packing": None, "messages_field": "messages",
                  "role_key": None, "content_key": None, "chat_template": None, "loss_on": "assistant", "mix": []}


def load_data(cfg: DictConfig, tokenizer: Any, *, val_fraction: float | None = None) -> PackedData:
    """`data.*` packed into blocks; with `data.mix`, every source packed alike and mixed (sapling.data.mixture).
    Keys a hand-made `cfg.data` leaves out take their defaults."""
    d = OmegaConf.merge(_DATA_DEFAULTS, OmegaConf.to_container(cfg.data, resolve=True))
    chat = ChatFormat(messages_field=d.messages_field, role_key=d.role_key, content_key=d.content_key,
                      chat_template=template_text(d.chat_template), loss_on=d.loss_on)
    cache_dir = d.cache_dir or str(Path(cfg.cache_dir) / "data")
    entries = [mix_entry(d, i) for i in range(len(d.mix))] or [{**d, "files": list(d.files)}]
    packing = d.packing or ("per_document" if any(e["format"] == "chat" for e in entries) else "stream")
    parts = [build_packed_data(
        list(e["files"]) or None, tokenizer, d.seq_len, hub_name=e["hub_name"], hub_config=e["hub_config"],
        hub_split=e["hub_split"], text_field=e["text_field"],
        val_fraction=d.val_fraction if val_fraction is None else val_fraction, seed=d.seed,
        max_tokens=e["max_tokens"], cache_dir=cache_dir, num_proc=d.num_proc, format=e["format"], packing=packing,
        chat=replace(chat, messages_field=e["messages_field"]),
    ) for e in entries]
    if not d.mix:
        return parts[0]
    return mix_packed_data(parts, [str(e["name"]) for e in entries], [float(e["weight"]) for e in entries],
                           cache_dir=cache_dir)


def check_tokenizer_fits(tokenizer: Any, model_cfg: Any, key: str) -> None:
    if len(tokenizer) > model_cfg.vocab_size:
        raise ConfigError(f"{key}.vocab_size", model_cfg.vocab_size, f"smaller than the tokenizer's {len(tokenizer)} "
                          "tokens", f"use the tokenizer the model was trained with, or set {key}.config.vocab_size")


def student_config(cfg: DictConfig, teacher_cfg: Any, *, seq_len: int | None = None,
                   tokenizer_size: int | None = None) -> Any:
    """The student's HF config: `student.path`'s, or the teacher's with `student.config` overrides; checked
    (with the teacher's, against `seq_len`, default data.seq_len) before any weights load. A vocabulary that
    differs from the teacher's only in padded rows is allowed when `tokenizer_size` fits both (check_vocab)."""
    seq_len = cfg.data.seq_len if seq_len is None else seq_len
    check_shape("teacher.config", teacher_cfg, seq_len=seq_len)
    base = teacher_cfg if cfg.student.path is None else None
    student_cfg = source_config(cfg.student, base=base)
    check_source_shape("student.config", cfg.student, student_cfg, base=base, seq_len=seq_len)
    check_vocab(teacher_cfg, student_cfg, tokenizer_size)
    return student_cfg


def check_prune_target(cfg: DictConfig, teacher_cfg: Any, *, seq_len: int | None = None) -> None:
    """Fail before any model loads when `prune.target` cannot be met (explicit fields or a budget): the
    target's HF config is built as the pruner will and checked with the teacher's (`check_shape`)."""
    seq_len = cfg.data.seq_len if seq_len is None else seq_len
    check_shape("teacher.config", teacher_cfg, seq_len=seq_len)
    if is_moe(teacher_cfg) and cfg.prune.importance == "magnitude":
        raise ConfigError("prune.importance", "magnitude", f"weight-magnitude scores cover dense MLPs, not the experts "
                          f"of a {teacher_cfg.model_type} model", "use prune.importance=activation (or random)")
    check_prune_shape(teacher_cfg, OmegaConf.to_container(cfg.prune.target), seq_len=seq_len)
    kind = "active_params" if cfg.prune.target.get("active_params") is not None else "params"
    if cfg.prune.target[kind] is not None:
        from sapling.prune.search import candidate_shapes

        s = cfg.prune.search
        candidate_shapes(teacher_cfg, int(cfg.prune.target[kind]), kind=kind, multiple=s.multiple, tolerance=s.tolerance,
                         max_candidates=s.max_candidates)


def train_with_hooks(cfg: DictConfig, command: str, *, teacher: torch.nn.Module | None,
                     student: torch.nn.Module | None,
                     tokenizer: Any, data: PackedData, out: Path, device: torch.device,
                     teacher_for_hooks_only: bool = False, desc: str | None = None, prefix: str = "",
                     after_pre: Callable[[HookContext], None] | None = None,
                     kd_vocab: int | None = None) -> TrainResult:
    """Pre-hooks, the training loop, post-hooks; metrics to `out/metrics.jsonl` (and wandb).

    `teacher_for_hooks_only`: the teacher is there for the pre-hooks (pruning) and dropped before training
    (the run distils from a teacher cache). `desc` names the loop (default: `command`), `prefix` its wandb keys;
    `after_pre` runs after the pre-hooks (the pipeline measures the pruned student there). `kd_vocab`: the
    vocabulary the KD loss aligns teacher and student on when their lm_heads differ in padded rows (check_vocab).

    In a distributed run every rank runs all of it (hooks may run ZeRO-3 forwards, which need every rank),
    but only rank 0 writes into `out`: the other ranks log nowhere and give hooks a scratch directory.
    """
    main = is_main()
    if main:
        metrics = MetricsLogger(out, cfg.logger, OmegaConf.to_container(cfg, resolve=True),
                                prefix=prefix, run_id=resumed_wandb_run_id(cfg, out))
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
        if kd_vocab is not None:
            install_kd_head(ctx.student, "student").kd_vocab = kd_vocab
        if after_pre is not None:
            after_pre(ctx)
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
                         metrics=metrics, device=device, desc=desc or command,
                         hidden_index=ctx.extras.get("hidden_index"))
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
