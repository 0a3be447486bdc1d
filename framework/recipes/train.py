"""`sapling train`: a model trained with cross-entropy (from scratch or fine-tuned)."""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from sapling.models import build_model, load_tokenizer, source_config
from sapling.models.shapes import check_source_shape
from sapling.recipes.common import (
    check_tokenizer_fits,
    engine_ds_config,
    finished_result,
    load_data_once,
    prepare_training_output,
    setup_distributed,
    tokenizer_path,
    train_with_hooks,
)
from sapling.train.loop import TrainResult

log = logging.getLogger("sapling")


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
