"""`sapling prune`: the teacher pruned to `prune.target`; writes `model/` and a report."""

from __future__ import annotations

import logging
from typing import Any

from omegaconf import DictConfig

from sapling.eval.perplexity import PERPLEXITY_COLUMNS, perplexity_rows
from sapling.eval.report import write_report
from sapling.models import build_model, load_tokenizer, save_hf_checkpoint, source_config
from sapling.prune.select import target_fields
from sapling.recipes.common import (
    check_prune_target,
    check_tokenizer_fits,
    load_data,
    prepare_output,
    select_device,
    tokenizer_path,
)
from sapling.recipes.hooks import prune_and_train
from sapling.train.metrics import MetricsLogger

log = logging.getLogger("sapling")


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
        outcome = prune_and_train(cfg, teacher, data, device, out, metrics, tokenizer=tokenizer)
        student = outcome.student
        save_hf_checkpoint(student, tokenizer, out / "model")
        rows = perplexity_rows([("teacher", teacher), ("pruned", student)], data.val, cfg.eval, device, metrics,
                               max_tokens=cfg.trainer.eval_tokens, progress=cfg.trainer.progress)
    finally:
        metrics.close()
    shapes = [[k, getattr(teacher.config, k), getattr(student.config, k)] for k in target_fields(teacher.config)]
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
