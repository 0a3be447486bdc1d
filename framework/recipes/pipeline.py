"""`sapling pipeline`: the whole recipe end to end on one machine, as a recipe of recipes.

With `experiment=demo` (the default) it runs on CPU in minutes on a corpus every machine has, the
Python standard library's own source files:

1. corpus -> byte-level BPE tokenizer (trained here with `tokenizers`) -> packed train/val blocks;
2. a small teacher trained with CE (cached under `cache_dir`, so a second run skips it);
3. a smaller student, pruned from the teacher (`hooks.pre=[prune]`, Minitron-style importance) or the
   teacher's architecture at the `student.config` shape with random weights, distilled from it;
4. the same student shape from random weights trained with CE for the same steps, as the baseline;
5. the distilled student quantized (GPTQ int4 by default, `quant.*`) and exported as a compressed-tensors
   checkpoint (`model-w4a16/`), its perplexity measured on the export as transformers loads it;
6. perplexities of all of them and of a unigram model on held-out files -> `report.md`.

Each training stage runs its command's code path into its own sub-directory: the teacher (`teacher/`) and
the baseline (`scratch/`) train as `sapling train` does, the student (`distill/`) as `sapling distill` does,
with `hooks.pre` / `hooks.post` (so the prune pre-hook writes `distill/prune_scores.pt`, and a post-hook runs
as it would after `sapling distill`); the export is `sapling quantize`'s `quantize_student`.

A stop signal (SIGTERM, SIGUSR1/2, Ctrl-C) stops the whole pipeline at the next safe point: a training
stage checkpoints at its next step boundary, any other stage finishes first; the CLI then exits 3. A rerun
with the same output_dir skips the stages whose outputs are complete (`distill/model`, `scratch/model`,
`model-<scheme>/`; the teacher is cached) and resumes the stopped one from its checkpoint.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sapling.data import unigram_cross_entropy
from sapling.data.demo import cached_dir, content_key, stdlib_corpus, train_bpe_tokenizer
from sapling.errors import ConfigError, Stopped
from sapling.eval.perplexity import evaluate_lm
from sapling.eval.plots import plot_validation_curves, read_metrics
from sapling.eval.report import write_report
from sapling.io import write_bytes_atomically, write_dir_atomically
from sapling.models import apply_overrides, build_model, count_parameters, load_tokenizer, source_config
from sapling.models.shapes import check_shape
from sapling.prune.plan import main_run_cfg
from sapling.recipes.common import (
    check_prune_target,
    load_data,
    prepare_output,
    select_device,
    student_config,
    train_with_hooks,
)
from sapling.recipes.hooks import HookContext
from sapling.train.loop import StopRequest, TrainResult
from sapling.train.metrics import MetricsLogger

log = logging.getLogger("sapling")
PRUNED_EVAL = "pruned_eval"  # the distill stage's record of the pruned student's perplexity before training
PRUNE_EVENTS = ("prune", "prune_search", "prune_round", PRUNED_EVAL)  # forwarded to the pipeline's metrics


def _finished(stage_dir: Path, steps: int) -> bool:
    """A training stage that completed: its HF export exists (written atomically) and its metrics record
    the end at `steps` (a rerun with another `trainer.max_steps` trains again, resuming where it can)."""
    if not (stage_dir / "model" / "config.json").exists() or not (stage_dir / "metrics.jsonl").exists():
        return False
    return any(r.get("event") == "done" and r.get("step") == steps for r in read_metrics(stage_dir / "metrics.jsonl"))


def _stage_cfg(cfg: DictConfig, **trainer: Any) -> DictConfig:
    stage = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    for k, v in trainer.items():
        stage.trainer[k] = v
    return stage


def _in_dir(cfg: DictConfig, stage_dir: Path, *, hooks: bool) -> DictConfig:
    """`cfg` for a command's code path run into `stage_dir`; without `hooks` (the teacher, the CE baseline)
    no pre/post-hooks and no quantization-aware training, as before they existed."""
    stage = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    stage.output_dir = str(stage_dir)
    if not hooks:
        stage.hooks.pre, stage.hooks.post, stage.quant.aware = [], [], False
    return stage


def _last_pruning(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records of the last prune pre-hook in a distill stage's metrics that pruned (a resumed run takes
    the shape from its checkpoint instead: the pruning it resumes is the one reported)."""
    passes: list[list[dict[str, Any]]] = []
    for r in records:
        if r.get("event") == "hook" and r.get("name") == "prune":
            passes.append([])
        elif passes and r.get("event") in PRUNE_EVENTS:
            passes[-1].append(r)
    return next((p for p in reversed(passes) if any(r["event"] == "prune" for r in p)), [])


def trained_demo_teacher(cfg: DictConfig, tokenizer: Any, data: Any, device: Any, out: Path) -> tuple[Path, Any, str]:
    """The `teacher.config`-shaped teacher trained with CE for `pipeline.teacher_steps` on `data` (as `sapling
    train` trains, into `out`), cached in `cache_dir/demo` per (data, shape, schedule): (checkpoint dir, its
    config, a note saying whether it was trained now). The benchmarks on the demo teacher get it here too, so
    they and the pipeline share it."""
    cache = Path(cfg.cache_dir) / "demo"
    teacher_cfg = apply_overrides(source_config(cfg.teacher), {"vocab_size": len(tokenizer)})
    check_shape("teacher.config", teacher_cfg)
    tcfg = _stage_cfg(cfg, max_steps=cfg.pipeline.teacher_steps, lr=cfg.pipeline.teacher_lr, save_every=0)
    key = content_key(data.fingerprint, teacher_cfg.to_dict(), OmegaConf.to_container(tcfg.trainer))[:12]
    cached = cache / f"teacher-{key}"
    if (cached / "config.json").exists():
        return cached, teacher_cfg, f"cached: {cached}"
    log.info("training the demo teacher (%d steps), to be cached at %s", cfg.pipeline.teacher_steps, cached)
    src = OmegaConf.create({"path": None, "tiny": None, "config": {}, "init": "random", "dtype": cfg.teacher.dtype,
                            "attn_implementation": "sdpa"})
    model = build_model(src, teacher_cfg, device, seed=cfg.seed)
    res = train_with_hooks(_in_dir(tcfg, Path(out), hooks=False), "train", teacher=None, student=model,
                           tokenizer=tokenizer, data=data, out=Path(out), device=device, desc="teacher",
                           prefix="teacher/")
    if res.stopped:  # checkpointed in `out/checkpoints`; the rerun resumes it
        raise Stopped("the teacher's training", res)
    cached_dir(cached, lambda tmp: shutil.copytree(res.model_dir, tmp, dirs_exist_ok=True))
    return cached, teacher_cfg, f"trained now ({cfg.pipeline.teacher_steps} steps), cached at {cached}"


def quantize_sections(summary: dict[str, Any] | None, out: Path) -> list[tuple]:
    """The report's quantization section: the student in 16 bits vs quantized, perplexity and size."""
    if summary is None:
        return []
    from sapling.quant.apply import SUMMARY_COLUMNS, summary_rows

    where = Path(summary["model_dir"]).relative_to(out) if Path(summary["model_dir"]).is_relative_to(out) else \
        summary["model_dir"]
    return [("Quantized student (validation perplexity and size)", SUMMARY_COLUMNS, summary_rows(summary)),
            ("Export", f"- `{where}`: compressed-tensors pack-quantized, {summary['quantized_linears']} linears "
                       f"quantized in {summary['quantize_s']:.1f} s; lm_head and embeddings stay 16-bit; load it with "
                       "`AutoModelForCausalLM.from_pretrained` or serve it with vLLM / SGLang")]


def size_and_speed(cfg: DictConfig, models: dict[str, Any], dirs: dict[str, Path], quantized: dict | None,
                   out: Path, data: Any, device: Any, metrics: Any,
                   tokenizer: Any = None) -> tuple[list[list[str]], dict[str, list[str]]]:
    """Rows of (model, parameters, weights on disk, greedy generation tokens/s) for the report, the
    quantized export loaded as transformers loads it (dequantized: its speed is not an int4 kernel's); and
    each model's greedy answers to `pipeline.sample_prompts`."""
    from sapling.eval.evaluate import disk_bytes, generation_speed, greedy_samples, prompt_batch, token_stream

    e = cfg.eval
    prompts = prompt_batch(token_stream(data.val, e.gen_batch * e.gen_prompt_len), e.gen_batch, e.gen_prompt_len)
    entries = [(name, model, dirs.get(name)) for name, model in models.items()]
    if quantized is not None and "model_dir" in quantized:
        from sapling.quant.apply import load_quantized

        qname = f"student ({quantized['format']} export)"
        entries.append((qname, load_quantized(quantized["model_dir"], device), Path(quantized["model_dir"])))
    rows, samples = [], {}
    for name, model, path in entries:
        speed = generation_speed(model, prompts, e.gen_tokens, device)["gen_tokens_per_s"] \
            if prompts is not None and e.gen_tokens > 0 else None
        size = disk_bytes(path)
        metrics.log({"event": "size", "model": name, "params": count_parameters(model), "disk_bytes": size,
                     "gen_tokens_per_s": speed})
        rows.append([name, f"{count_parameters(model):,}", "" if size is None else f"{size / 2**20:.2f}",
                     "" if speed is None else f"{speed:,.0f}"])
        if cfg.pipeline.sample_prompts and tokenizer is not None:
            samples[name] = greedy_samples(model, tokenizer, list(cfg.pipeline.sample_prompts),
                                           cfg.pipeline.sample_tokens, device)
            metrics.log({"event": "samples", "model": name, "texts": samples[name]})
    return rows, samples


def _sample_sections(cfg: DictConfig, samples: dict[str, list[str]]) -> list[tuple[str, str]]:
    """One report section listing every model's greedy answer to each of `pipeline.sample_prompts`."""
    if not samples:
        return []
    parts = [f"Greedy decoding, {cfg.pipeline.sample_tokens} new tokens at most (the chat template when the "
             "tokenizer has one).", ""]
    for i, prompt in enumerate(cfg.pipeline.sample_prompts):
        parts.append(f"**{prompt}**\n")
        for name, texts in samples.items():
            flat = " ".join(texts[i].split()).replace("`", "'")  # one line, no code-span breaks
            parts.append(f"- {name}: `{flat}`")
        parts.append("")
    return [("Samples", "\n".join(parts))]


def run_pipeline(cfg: DictConfig) -> dict[str, Any]:
    """The report's numbers; raises `Stopped` when a stop signal ended the pipeline (the CLI exits 3)."""
    with StopRequest(pause="stage") as stop:
        return _run_stages(cfg, stop)


def _prune_wall_s(records: list[dict[str, Any]]) -> float | None:
    """Seconds from the last prune pre-hook's start to the training start after it (None: no such pair)."""
    hooks = [i for i, r in enumerate(records) if r.get("event") == "hook" and r.get("name") == "prune"]
    if not hooks:
        return None
    start = next((r for r in records[hooks[-1]:] if r.get("event") == "start"), None)
    return None if start is None else start["time"] - records[hooks[-1]]["time"]


def _run_stages(cfg: DictConfig, stop: StopRequest) -> dict[str, Any]:
    t_start = time.perf_counter()
    out = prepare_output(cfg)
    cache = Path(cfg.cache_dir) / "demo"
    device = select_device(cfg)
    metrics = MetricsLogger(out, None)
    timings: dict[str, float] = {}
    reused: set[str] = set()  # training stages a finished earlier run (same output_dir) already did

    def stopped(name: str, result: TrainResult | None = None) -> Stopped:
        result = result or TrainResult(steps=0, tokens=0, wall_s=time.perf_counter() - t_start, stopped=True,
                                       signal=stop.signum)
        metrics.log({"event": "stopped", "stage": name, "step": result.steps,
                     "signal": signal.Signals(stop.signum).name if stop.signum else "peer"})
        metrics.close()
        return Stopped(f"the pipeline's {name} stage", result)

    def stage(name: str, t0: float) -> None:
        timings[name] = time.perf_counter() - t0
        metrics.log({"event": "stage", "name": name, "wall_s": timings[name]})
        log.info("stage %s: %.1f s", name, timings[name])
        if stop.signum is not None:  # a signal during (or before) this stage: stop before the next one
            raise stopped(name)

    def train_stage(name: str, command: str, stage_cfg: DictConfig, model: Any, teacher_model: Any, *, steps: int,
                    hooks: bool, after_pre: Any = None) -> Any:
        """`command`'s training code path (`train_with_hooks`) into `out/name`, resuming its checkpoint; or the
        model a finished earlier run exported there."""
        stage_dir = out / name
        if _finished(stage_dir, steps):
            log.info("stage %s: finished earlier, loading %s", name, stage_dir / "model")
            reused.add(name)
            src = OmegaConf.create({"path": str(stage_dir / "model"), "tiny": None, "config": {}, "init": "pretrained",
                                    "dtype": cfg.student.dtype, "attn_implementation": cfg.student.attn_implementation})
            return build_model(src, source_config(src), device)
        try:
            res = train_with_hooks(_in_dir(stage_cfg, stage_dir, hooks=hooks), command, teacher=teacher_model,
                                   student=model, tokenizer=tokenizer, data=data, out=stage_dir, device=device,
                                   desc=name, prefix=f"{name}/", after_pre=after_pre)
        except Stopped as s:  # the training inside a pre-hook (prune rounds) stopped
            raise stopped(name, s.result) from None
        if res.stopped:
            raise stopped(name, res)
        return res.model

    # 1. corpus, tokenizer, data
    t0 = time.perf_counter()
    if cfg.data.files or cfg.data.hub_name or cfg.data.mix:
        corpus_note = "data.files" if cfg.data.files else "data.mix" if cfg.data.mix else \
            f"hub data set {cfg.data.hub_name}"
        tok_path = cfg.data.tokenizer or cfg.teacher.path
        if tok_path is None:
            raise ConfigError("data.tokenizer", None, "the pipeline with your own data needs a tokenizer",
                              "pass data.tokenizer=<dir with tokenizer files> or teacher.path=<HF checkpoint dir>")
    else:
        corpus = stdlib_corpus(cache, cfg.pipeline.corpus.max_bytes, cfg.pipeline.corpus.subpackages)
        corpus_note = f"Python {sys.version_info.major}.{sys.version_info.minor} standard library sources"
        # a pretrained teacher brings its tokenizer; the demo's own teacher gets one trained on the corpus
        tok_path = cfg.data.tokenizer or cfg.teacher.path or \
            str(train_bpe_tokenizer(corpus, cfg.pipeline.corpus.vocab_size, cache))
        cfg = OmegaConf.merge(cfg, {"data": {"files": [str(corpus)]}})
    tokenizer = load_tokenizer(tok_path)
    data = load_data(cfg, tokenizer)
    unigram = unigram_cross_entropy(data.train, data.val, len(tokenizer))
    stage("data", t0)

    # 2. teacher: trained once per (corpus, tokenizer, shape, schedule), then cached
    t0 = time.perf_counter()
    # every shape (teacher, student or prune target, against data.seq_len) is checked before a model is built
    planned = source_config(cfg.teacher) if cfg.teacher.path is not None else \
        apply_overrides(source_config(cfg.teacher), {"vocab_size": len(tokenizer)})
    if "prune" in cfg.hooks.pre:
        check_prune_target(cfg, planned)
    else:
        student_config(cfg, planned)
    if cfg.teacher.path is not None:
        teacher_cfg = source_config(cfg.teacher)
        teacher = build_model(cfg.teacher, teacher_cfg, device)
        teacher_note = cfg.teacher.path
        teacher_dir = Path(os.path.expanduser(cfg.teacher.path))
        steps = cfg.pipeline.teacher_correction_steps
        if steps > 0:  # Minitron's teacher correction: CE fine-tuning on this data, as `sapling train model.path=T`
            lr = cfg.pipeline.teacher_correction_lr
            teacher = train_stage("teacher_correction", "train", _stage_cfg(cfg, max_steps=steps, lr=lr), teacher,
                                  None, steps=steps, hooks=False)
            teacher_dir = out / "teacher_correction" / "model"
            teacher_note = f"{cfg.teacher.path}, corrected on this data ({steps} CE steps, lr {lr:g}): {teacher_dir}"
    else:
        try:
            cached, teacher_cfg, teacher_note = trained_demo_teacher(cfg, tokenizer, data, device, out / "teacher")
        except Stopped as s:
            raise stopped("teacher", s.result) from None
        teacher_dir = Path(cached)
        teacher = build_model(OmegaConf.create({**OmegaConf.to_container(cfg.teacher), "path": str(cached),
                                                "config": {}, "tiny": None}), teacher_cfg, device)
    stage("teacher", t0)

    # 3. student: the teacher pruned to prune.target by the distill stage's pre-hook (hooks.pre=[prune]), or
    #    its architecture at the student.config shape with random weights; then distilled, as `sapling distill`
    t0 = time.perf_counter()
    evals: dict[str, dict[str, float]] = {}
    pruned = "prune" in cfg.hooks.pre
    student = None
    if not pruned:
        student = build_model(cfg.student, student_config(cfg, teacher_cfg), device, seed=cfg.seed + 1)

    def eval_pruned(ctx: HookContext) -> None:
        """After the pre-hooks: the pruned student's perplexity before distillation (a resumed stage took its
        shape from the checkpoint, without pruned weights: the record of the run it resumes stands)."""
        if "resume_shape_dir" in ctx.extras:
            return
        e = evaluate_lm(ctx.student, data.val, micro_batch_size=cfg.eval.micro_batch_size, max_batches=cfg.eval.batches,
                        device=device, progress=cfg.trainer.progress, desc="eval: pruned student")
        ctx.metrics.log({"event": PRUNED_EVAL, "val_loss": e["loss"], "val_ppl": e["ppl"]})

    kd_name = "student (pruned + distilled)" if pruned else "student (distilled)"
    kd_steps = main_run_cfg(cfg).trainer.max_steps if pruned else cfg.trainer.max_steps  # rounds spend some
    student = train_stage("distill", "distill", cfg, student, teacher, steps=kd_steps, hooks=True,
                          after_pre=eval_pruned if pruned else None)
    student_cfg = student.config
    if pruned:  # the pruning's records and scores, where the pipeline's own outputs are
        records = read_metrics(out / "distill" / "metrics.jsonl")
        pruning = _last_pruning(records)
        prune_s = _prune_wall_s(records)
        if prune_s is not None and "distill" not in reused:  # reported as its own stage, as the table splits it
            timings["prune"] = prune_s
            metrics.log({"event": "stage", "name": "prune", "wall_s": prune_s})
            t0 += prune_s
        for r in pruning:
            metrics.log({k: v for k, v in r.items() if k != "time"})
        for before in [r for r in pruning if r["event"] == PRUNED_EVAL][-1:]:  # none: a stage of an older version
            evals["student (pruned, before KD)"] = {"loss": before["val_loss"], "ppl": before["val_ppl"]}
        scores = out / "distill" / "prune_scores.pt"
        if scores.exists():
            write_bytes_atomically(out / "prune_scores.pt", scores.read_bytes())
    stage("distill", t0)

    # 4. the same shape from a random init, CE only, same steps, as `sapling train`
    scratch = None
    if cfg.pipeline.scratch_baseline:
        t0 = time.perf_counter()
        random_src = OmegaConf.create({"path": None, "tiny": None, "config": {}, "init": "random",
                                       "dtype": cfg.student.dtype, "attn_implementation": cfg.student.attn_implementation})
        baseline = build_model(random_src, student_cfg, device, seed=cfg.seed + 1)
        baseline = scratch = train_stage("scratch", "train", cfg, baseline, None, steps=cfg.trainer.max_steps,
                                         hooks=False)
        stage("scratch", t0)

    # 5. the distilled student quantized (quant.*) and exported as compressed-tensors; its perplexity is the
    #    exported checkpoint's, loaded by transformers
    quantized = None
    if cfg.pipeline.quantize:
        from sapling.quant.apply import quantize_student

        t0 = time.perf_counter()
        export = out / f"model-{cfg.quant.scheme}"
        earlier = [r for r in read_metrics(out / "metrics.jsonl") if r.get("event") == "quantize"
                   and r.get("model_dir") == str(export)] if "distill" in reused else []
        if earlier and (export / "config.json").exists():  # this distilled student's export, from a stopped run
            log.info("stage quantize: finished earlier, reusing %s", export)
            quantized = {k: v for k, v in earlier[-1].items() if k != "event"}
        else:
            fresh = build_model(OmegaConf.create({"path": str(out / "distill" / "model"), "tiny": None, "config": {},
                                                  "init": "pretrained", "dtype": "float32",
                                                  "attn_implementation": cfg.student.attn_implementation}),
                                student.config, device)
            quantized = quantize_student(cfg, fresh, teacher=teacher, data=data, tokenizer=tokenizer, device=device,
                                         out_dir=export, metrics=metrics)
            del fresh
        stage("quantize", t0)

    # 6. evaluation on the whole held-out split + report
    t0 = time.perf_counter()
    models = {"teacher": teacher, kd_name: student}
    if scratch is not None:
        models["student (CE from scratch)"] = baseline
    for name, model in models.items():
        evals[name] = evaluate_lm(model, data.val, micro_batch_size=cfg.eval.micro_batch_size,
                                  max_batches=cfg.eval.batches, device=device, progress=cfg.trainer.progress,
                                  desc=f"eval: {name}")
        metrics.log({"event": "eval", "model": name, "params": count_parameters(model),
                     "val_loss": evals[name]["loss"], "val_ppl": evals[name]["ppl"]})
    if "student (pruned, before KD)" in evals:
        name = "student (pruned, before KD)"
        metrics.log({"event": "eval", "model": name, "params": count_parameters(student),
                     "val_loss": evals[name]["loss"], "val_ppl": evals[name]["ppl"]})
    metrics.log({"event": "eval", "model": "unigram", "val_loss": unigram, "val_ppl": math.exp(unigram)})
    size_rows, samples = size_and_speed(cfg, models, {"teacher": teacher_dir, kd_name: out / "distill" / "model",
                                                      "student (CE from scratch)": out / "scratch" / "model"},
                                        quantized, out, data, device, metrics, tokenizer)
    curves = plot_validation_curves(
        {name: read_metrics(path) for name, path in ((kd_name, out / "distill" / "metrics.jsonl"),
                                                     ("student (CE from scratch)", out / "scratch" / "metrics.jsonl"))
         if path.exists()},
        out / "curves.png", title="student validation loss: distilled from the teacher vs trained from scratch")
    stage("eval", t0)
    write_dir_atomically(out / "model",
                         lambda tmp: shutil.copytree(out / "distill" / "model", tmp, dirs_exist_ok=True))
    timings["total"] = time.perf_counter() - t_start
    metrics.log({"event": "done", "wall_s": timings["total"]})
    metrics.close()

    rows = [["unigram (train-split token frequencies)", "-", f"{unigram:.4f}", f"{math.exp(unigram):.2f}", "-"]]
    teacher_steps = str(cfg.pipeline.teacher_steps) if cfg.teacher.path is None else "-"
    rows.append(["teacher", f"{count_parameters(teacher):,}", f"{evals['teacher']['loss']:.4f}",
                 f"{evals['teacher']['ppl']:.2f}", teacher_steps])
    if "student (pruned, before KD)" in evals:
        e = evals["student (pruned, before KD)"]
        rows.append(["student (pruned, before KD)", f"{count_parameters(student):,}", f"{e['loss']:.4f}",
                     f"{e['ppl']:.2f}", "0"])
    for name in [n for n in models if n != "teacher"]:
        rows.append([name, f"{count_parameters(models[name]):,}", f"{evals[name]['loss']:.4f}",
                     f"{evals[name]['ppl']:.2f}", str(cfg.trainer.max_steps)])
        if name == kd_name and quantized is not None and "val_quantized" in quantized:
            q = quantized["val_quantized"]
            qname = f"{kd_name[:-1]}, {quantized['format']} {quantized['method']}" + \
                (" + guided" if quantized["guided"] else "") + ")"
            rows.append([qname, f"{count_parameters(models[name]):,}", f"{q['loss']:.4f}", f"{q['ppl']:.2f}",
                         str(cfg.trainer.max_steps)])
    shape_keys = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                  "num_key_value_heads", "vocab_size")
    shapes = [[k, getattr(teacher_cfg, k), getattr(student_cfg, k)] for k in shape_keys]
    verdict = "n/a"
    if scratch is not None:
        a, b = evals[kd_name]["ppl"], evals["student (CE from scratch)"]["ppl"]
        label = kd_name.removeprefix("student (").rstrip(")")
        verdict = (f"{label} student perplexity {a:.2f} vs {b:.2f} from scratch: "
                   f"{f'the {label} student wins' if a < b else 'training from scratch wins'} "
                   f"({abs(a - b) / b * 100:.1f}% {'lower' if a < b else 'higher'}) at {cfg.trainer.max_steps} steps")
    write_report(out / "report.md", "Sapling pipeline report", [
        ("Setup", "\n".join([
            f"- corpus: {corpus_note}; {data.train.num_tokens:,} train tokens, {data.val.num_tokens:,} validation "
            f"tokens (held-out documents), seq_len {cfg.data.seq_len}, tokenizer vocab {len(tokenizer):,}",
            f"- teacher: {teacher_note}",
            f"- student: {cfg.trainer.max_steps} steps x {cfg.trainer.micro_batch_size * cfg.trainer.grad_accum} "
            f"sequences, lr {cfg.trainer.lr}, divergence {cfg.distill.divergence}, T={cfg.distill.temperature}, "
            f"kd_weight {cfg.distill.kd_weight}, ce_weight {cfg.distill.ce_weight}",
            f"- device: {device.type}; wall time {timings['total']:.0f} s "
            f"({', '.join(f'{k} {v:.0f} s' for k, v in timings.items() if k != 'total')})",
        ])),
        ("Validation perplexity", ["model", "params", "loss (nats/token)", "perplexity", "train steps"], rows),
        ("Result", verdict),
        ("Shapes", ["field", "teacher", "student"], shapes),
        *quantize_sections(quantized, out),
        ("Size and speed", ["model", "params", "weights on disk (MB)", f"generation on {device.type} (tokens/s)"],
         size_rows),
        *_sample_sections(cfg, samples),
        ("Validation curves", f"Validation loss against training tokens and training FLOPs (the distilled "
                              f"student's count the teacher's forward passes):\n\n![validation curves]({curves.name})"),
    ])
    print((out / "report.md").read_text())
    return {"evals": evals, "unigram": unigram, "timings": timings, "output_dir": str(out), "quantized": quantized}
