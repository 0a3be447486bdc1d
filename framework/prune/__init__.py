"""Structured pruning (Minitron-style): activation importance, uniform width/depth slicing, targets."""

from sapling.prune.importance import (
    ImportanceAccumulator,
    ImportanceScores,
    estimate_importance,
    layer_drop_loss,
)
from sapling.prune.select import plan_from_scores, resolve_target
from sapling.prune.slicing import KeepPlan, pruned_config, slice_model

__all__ = [
    "ImportanceAccumulator",
    "ImportanceScores",
    "KeepPlan",
    "estimate_importance",
    "layer_drop_loss",
    "plan_from_scores",
    "pruned_config",
    "resolve_target",
    "slice_model",
]
