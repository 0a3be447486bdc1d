"""`sapling quantize`: post-training quantization into a compressed-tensors checkpoint."""

from __future__ import annotations

import logging
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from sapling.eval.report import write_report
from sapling.models import build_model, check_same_tokenizer, load_tokenizer, source_config
from sapling.models.shapes import check_vocab
from sapling.recipes.common import load_data, prepare_output, select_device, tokenizer_path
from sapling.train.metrics import MetricsLogger

log = logging.getLogger("sapling")


def run_quantize(cfg: DictConfig) -> dict[str, Any]:
    """`sapling quantize model.path=S`: post-training quantization of S into `output_dir/model`
    (compressed-tensors), with a report of validation perplexity and size before and after."""
    from sapling.quant.apply import SUMMARY_COLUMNS, quantize_student, summary_rows

    model_cfg = source_config(cfg.model)
    tokenizer = load_tokenizer(tokenizer_path(cfg, "model"))
    teacher_cfg = None
    if cfg.quant.guided and (cfg.teacher.path is not None or cfg.teacher.tiny is not None):
        teacher_cfg = source_config(cfg.teacher)
        check_same_tokenizer(cfg.teacher.path, cfg.model.path, "model.path")
        check_vocab(teacher_cfg, model_cfg, len(tokenizer), key="model.config.vocab_size")
    device = select_device(cfg)
    out = prepare_output(cfg)
    data = load_data(cfg, tokenizer) if (cfg.data.files or cfg.data.hub_name) else None
    src = OmegaConf.merge(cfg.model, {"dtype": "float32"})  # quantize from full-precision weights
    # quant.offload: the model stays in CPU memory and one decoder layer at a time goes to the device
    model = build_model(src, model_cfg, torch.device("cpu") if cfg.quant.offload else device, seed=cfg.seed)
    teacher = None
    if cfg.quant.guided:
        teacher = build_model(cfg.teacher, teacher_cfg or source_config(cfg.teacher), device, seed=cfg.seed)
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
