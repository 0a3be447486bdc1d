"""Device placement has one owner (`sapling.models.place`): the pruned student is made on the recipe's device,
feature projections beside the student (its device and dtype), and LocalEngine moves all it trains.

The `meta` device stands in for a GPU: a model on another device than the recipe's shows as a mismatch.
"""

from __future__ import annotations

from importlib.resources import files
from types import SimpleNamespace

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from transformers import AutoModelForCausalLM

import sapling.eval.perplexity as perplexity
from sapling.config import register_configs
from sapling.distill.features import FeatureDistiller, StudentWithFeatures
from sapling.models import place, tiny_config
from sapling.prune.plan import prune_teacher
from sapling.train.engine import LocalEngine
from sapling.train.metrics import NullMetrics

META = torch.device("meta")


def _cfg(tmp_path, *overrides: str):
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(files("sapling.conf")), version_base=None):
        return compose(config_name="config", overrides=["command=distill", f"output_dir={tmp_path}", "logger=none",
                                                        "trainer.progress=false", *overrides])


def _tiny(hidden: int = 64) -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config("llama-tiny", vocab_size=64, hidden_size=hidden,
                                                        num_hidden_layers=2))


def _devices(module: torch.nn.Module) -> set[torch.device]:
    return {p.device for p in module.parameters()} | {b.device for b in module.buffers()}


def test_pruned_student_is_made_on_the_recipe_device(tmp_path, monkeypatch):
    # The teacher's weights are not on the recipe's device (a ZeRO-3 teacher: shards, gathered one layer at a
    # time): the student must still come out on the device the recipe evaluates and trains it on.
    cfg = _cfg(tmp_path, "prune.importance=magnitude", "prune.target.hidden_size=48",
               "prune.target.intermediate_size=64")
    evaluated = []

    def evaluate_lm(model, blocks, *, device, **kwargs):
        evaluated.append((_devices(model), device))
        return {"loss": 1.0, "ppl": 2.7}

    monkeypatch.setattr(perplexity, "evaluate_lm", evaluate_lm)
    outcome = prune_teacher(cfg, _tiny(), SimpleNamespace(val=None), META, tmp_path, NullMetrics())
    assert evaluated == [({META}, META)]
    assert _devices(outcome.student) == {META} and outcome.student.config.hidden_size == 48


def test_projection_is_made_beside_the_student_and_the_engine_moves_it_all(tmp_path):
    fd = FeatureDistiller(24, 40, [(0, 0)], device=META, dtype=torch.bfloat16)
    assert fd.proj.device == META and fd.proj.dtype == torch.bfloat16
    ref = FeatureDistiller(24, 40, [(0, 0)])  # the same seeded start, wherever it is made
    assert torch.equal(FeatureDistiller(24, 40, [(0, 0)], dtype=torch.float64).proj, ref.proj.double())

    cfg = _cfg(tmp_path)
    student = _tiny(hidden=32)
    trained = StudentWithFeatures(student, FeatureDistiller(32, 64, [(0, 0)]))  # both on the CPU
    engine = LocalEngine(trained, cfg.trainer, META)
    assert _devices(engine.module) == {META}
    assert all(p.device == META for group in engine.optimizer.param_groups for p in group["params"])


def test_place_leaves_zero3_partitioned_models_to_deepspeed():
    model = torch.nn.Linear(2, 2)
    model.weight.ds_id = 0  # a ZeRO-3 parameter: its shard lives where DeepSpeed put it
    assert place(model, META) is model and _devices(model) == {torch.device("cpu")}
    del model.weight.ds_id
    assert _devices(place(model, META)) == {META}
