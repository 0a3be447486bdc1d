"""Shared by the benchmarks that run on the demo teacher (`benchmarks/prune.py`, `benchmarks/cache.py`).

The demo assets (corpus, tokenizer, trained teacher) come from the pipeline's cache, exactly as `sapling
pipeline experiment=demo` builds them; `distill_overrides` gives the `sapling distill experiment=demo
hooks.pre=[prune]` command line the benchmarks run through the Python API; `reference` builds the teacher
as those runs do; the rest is bookkeeping for the results files.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from sapling.config import register_configs, validate
from sapling.eval.perplexity import evaluate_lm
from sapling.models import build_model, count_parameters, load_tokenizer, source_config
from sapling.recipes.common import load_data, select_device

REPO = Path(__file__).resolve().parents[1]

TARGET_KEYS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")
ALL_VAL = "trainer.eval_tokens=null"  # validate on the whole validation split (no token budget)


# ---------------------------------------------------------------------------------------------------- config


def compose_cfg(*overrides: str) -> DictConfig:
    """The project's config tree composed with Hydra overrides, as `sapling <command> ...` would."""
    register_configs()
    with initialize_config_dir(config_dir=str(files("sapling.conf")), version_base=None):
        cfg = compose(config_name="config", overrides=list(overrides))
    validate(cfg)
    return cfg


@dataclass
class DemoAssets:
    corpus: Path
    tokenizer_dir: Path
    teacher_dir: Path
    teacher_note: str
    demo_teacher_fields: list[str]  # the demo's teacher.config shape overrides, cleared when loading the checkpoint


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    """The options every demo-teacher benchmark takes (see `start_benchmark`)."""
    p.add_argument("--calibration-samples", type=int, default=None, help="prune.calibration.samples (demo: 256)")
    p.add_argument("--teacher-steps", type=int, default=None, help="pipeline.teacher_steps (demo: 400)")
    p.add_argument("--teacher-lr", type=float, default=None,
                   help="pipeline.teacher_lr (demo: 3e-3, best for its 400 steps; for 3,000 steps use 1e-3: at 3e-3 "
                        "the 3.67M teacher ends 0.25 nats worse, README 'Headline')")
    p.add_argument("--corpus-bytes", type=int, default=None,
                   help="a larger corpus: pipeline.corpus.max_bytes with the standard library's subpackages too "
                        "(demo: 3 MB of top-level modules); another tokenizer and teacher, cached apart")
    p.add_argument("--cache-dir", default=None, help="cache_dir (default: $SAPLING_CACHE or ~/.cache/sapling)")
    p.add_argument("--work", default=None, help="where the runs write (default: a new temp dir)")


def quick_defaults(args: argparse.Namespace) -> None:
    """`--quick`: a 20-step teacher (cached apart from the demo's) and a small calibration sample."""
    args.teacher_steps = args.teacher_steps or 20
    args.calibration_samples = args.calibration_samples or 32


def start_benchmark(args: argparse.Namespace, name: str) -> tuple[Path, DemoAssets, list[str]]:
    """The work directory, the demo assets, and the overrides every run of the benchmark gets."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    work = Path(args.work or tempfile.mkdtemp(prefix=f"sapling-bench-{name}-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"work dir: {work}", flush=True)
    assets = demo_assets(args.cache_dir, work, args.teacher_steps, args.corpus_bytes, getattr(args, "teacher_lr", None))
    extra = [f"prune.calibration.samples={args.calibration_samples}"] if args.calibration_samples else []
    return work, assets, extra


def demo_assets(cache_dir: str | None, work: Path, teacher_steps: int | None = None,
                corpus_bytes: int | None = None, teacher_lr: float | None = None) -> DemoAssets:
    """The demo corpus, tokenizer and trained teacher, from the pipeline's cache (built there when missing).

    Steps 1-2 of `sapling.recipes.pipeline.run_pipeline` (the same functions, so the same cache keys): a teacher
    trained by `sapling pipeline experiment=demo` is reused and one trained here is reused by the pipeline.
    `teacher_steps` overrides `pipeline.teacher_steps` (another cache key: the demo's teacher is not touched);
    `corpus_bytes` builds a corpus of that size from the whole standard library (subpackages included).
    """
    from sapling.data.demo import stdlib_corpus, train_bpe_tokenizer
    from sapling.recipes.pipeline import trained_demo_teacher

    overrides = ["command=pipeline", "experiment=demo", "logger=none", f"output_dir={work / 'teacher'}"]
    if cache_dir:
        overrides.append(f"cache_dir={cache_dir}")
    if teacher_steps is not None:
        overrides.append(f"pipeline.teacher_steps={teacher_steps}")
    if teacher_lr is not None:
        overrides.append(f"pipeline.teacher_lr={teacher_lr}")
    if corpus_bytes is not None:
        overrides += [f"pipeline.corpus.max_bytes={corpus_bytes}", "pipeline.corpus.subpackages=true"]
    cfg = compose_cfg(*overrides)
    cache = Path(cfg.cache_dir) / "demo"
    corpus = stdlib_corpus(cache, cfg.pipeline.corpus.max_bytes, cfg.pipeline.corpus.subpackages)
    tok_dir = train_bpe_tokenizer(corpus, cfg.pipeline.corpus.vocab_size, cache)
    cfg = OmegaConf.merge(cfg, {"data": {"files": [str(corpus)]}})
    tokenizer = load_tokenizer(str(tok_dir))
    cached, _, note = trained_demo_teacher(cfg, tokenizer, load_data(cfg, tokenizer), select_device(cfg),
                                           work / "teacher")
    return DemoAssets(corpus=corpus, tokenizer_dir=tok_dir, teacher_dir=cached, teacher_note=note,
                      demo_teacher_fields=[k for k, v in cfg.teacher.config.items() if v is not None])


@dataclass
class Reference:
    """The teacher as the runs build it, and the validation blocks they are scored on."""

    teacher: torch.nn.Module
    val: Any
    device: torch.device
    micro_batch_size: int
    params: int
    val_loss: float
    val_tokens: int


def reference(cfg: DictConfig) -> Reference:
    """Build the teacher exactly as a run composed as `cfg` does and check it is the trained checkpoint (not a
    random model of its shape) by its validation loss."""
    device = select_device(cfg)
    teacher = build_model(cfg.teacher, source_config(cfg.teacher), device, seed=cfg.seed).eval()
    data = load_data(cfg, load_tokenizer(cfg.data.tokenizer))
    val = evaluate_lm(teacher, data.val, micro_batch_size=cfg.trainer.micro_batch_size,
                      max_batches=cfg.trainer.eval_batches, max_tokens=cfg.trainer.eval_tokens, device=device)
    uniform = math.log(teacher.config.vocab_size)
    if val["loss"] > 0.9 * uniform:
        raise RuntimeError(f"the runs' teacher has validation loss {val['loss']:.3f} (uniform: {uniform:.3f}): "
                           f"it is not the trained checkpoint {cfg.teacher.path}")
    return Reference(teacher, data.val, device, cfg.trainer.micro_batch_size, count_parameters(teacher),
                     val["loss"], val["tokens"])


def demo_overrides(assets: DemoAssets, command: str, out: Path) -> list[str]:
    """`sapling <command> experiment=demo` on the cached teacher and the demo corpus, data and trainer seeds 0."""
    return [
        f"command={command}", "experiment=demo", "logger=none", f"output_dir={out}",
        # The demo's teacher.config shape overrides would make `init=auto` build a random model of that shape
        # (a Hydra override cannot empty a dict): clear them and insist on the checkpoint's weights.
        f"teacher.path={assets.teacher_dir}", "teacher.tiny=null", "teacher.init=pretrained",
        *(f"teacher.config.{k}=null" for k in assets.demo_teacher_fields),
        f"data.files=[{assets.corpus}]", f"data.tokenizer={assets.tokenizer_dir}",
        # `seed` (prune.importance=random draws its scores from it) also seeds the data split and the trainer
        # through interpolation: pin those so every run sees the same data in the same order.
        "data.seed=0", "trainer.seed=0", "trainer.progress=false",
    ]


def distill_overrides(assets: DemoAssets, out: Path, steps: int, target: dict[str, int], *extra: str) -> list[str]:
    """`sapling distill experiment=demo hooks.pre=[prune]` on the cached teacher, evaluated on all of val."""
    shape = {k: target.get(k) for k in TARGET_KEYS}  # unset fields: the teacher's (the demo sets all five)
    return [
        *demo_overrides(assets, "distill", out),
        "hooks.pre=[prune]", f"trainer.max_steps={steps}", "trainer.eval_every=0", ALL_VAL,
        "trainer.resume=false",
        *(f"prune.target.{k}={'null' if v is None else v}" for k, v in shape.items()),
        *extra,
    ]


# ---------------------------------------------------------------------------------------------------- bookkeeping


def events(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
