"""DeepSpeed presets, their validation and the engine configs built from them (no process group needed)."""

from __future__ import annotations

from importlib.resources import files

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from sapling.config import ConfigError, register_configs, validate
from sapling.models import model_init_scope
from sapling.train.ds_config import student_ds_config, teacher_ds_config


def composed(*overrides: str):
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(files("sapling.conf")), version_base=None):
        return compose(config_name="config", overrides=["command=distill", "teacher.tiny=llama-tiny",
                                                        "data.files=[]", *overrides])


@pytest.mark.parametrize(("preset", "stage", "teacher_stage"),
                         [("zero1", 1, 0), ("zero2", 2, 0), ("zero3", 3, 3), ("zero3_offload", 3, 3)])
def test_presets_select_stages(preset, stage, teacher_stage):
    cfg = composed(f"deepspeed={preset}", "trainer.micro_batch_size=3", "trainer.grad_accum=5",
                   "trainer.grad_clip=0.5")
    assert (cfg.deepspeed.stage, cfg.deepspeed.teacher_stage) == (stage, teacher_stage)
    s = student_ds_config(cfg, world_size=4, dtype=torch.bfloat16)
    assert s["train_batch_size"] == 3 * 5 * 4 and s["gradient_accumulation_steps"] == 5
    assert s["zero_optimization"]["stage"] == stage and s["gradient_clipping"] == 0.5
    assert s["bf16"]["enabled"] and not s["fp16"]["enabled"]
    assert ("offload_optimizer" in s["zero_optimization"]) == (preset == "zero3_offload")
    t = teacher_ds_config(cfg, world_size=4, dtype=torch.float32)
    assert t["zero_optimization"]["stage"] == teacher_stage and not t["bf16"]["enabled"]
    assert "optimizer" not in t and ("offload_param" in t["zero_optimization"]) == (preset == "zero3_offload")


def test_extra_keys_merge_into_student_config():
    cfg = composed("deepspeed=zero2", "+deepspeed.extra.zero_optimization.reduce_bucket_size=1000")
    zero = student_ds_config(cfg, world_size=1, dtype=torch.float32)["zero_optimization"]
    assert zero["reduce_bucket_size"] == 1000 and zero["stage"] == 2


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["deepspeed=zero3", "command=pipeline"], "deepspeed"),
        (["deepspeed=zero3", "command=prune"], "deepspeed"),
        (["deepspeed=zero2", "deepspeed.offload_param=true"], "deepspeed.offload_param"),
        (["deepspeed=zero1", "deepspeed.teacher_stage=2"], "deepspeed.teacher_stage"),
        (["deepspeed=zero2", "deepspeed.teacher_offload_param=true"], "deepspeed.teacher_offload_param"),
        (["deepspeed.stage=3"], "deepspeed.stage"),
        (["deepspeed=zero3", "hooks.pre=[prune]", "prune.rounds=2", "prune.target.num_hidden_layers=1"],
         "prune.rounds"),
    ],
)
def test_bad_deepspeed_settings_name_key_and_fix(overrides, key):
    cfg = composed(*overrides)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert str(err.value).startswith(f"{key}=") and "fix:" in str(err.value)


def test_model_init_scope_shows_only_its_own_config():
    from transformers.integrations import deepspeed_config, is_deepspeed_zero3_enabled

    z3 = {"zero_optimization": {"stage": 3}}
    with model_init_scope(z3) as partitioned:
        assert partitioned and is_deepspeed_zero3_enabled() and deepspeed_config() is z3
    assert not is_deepspeed_zero3_enabled()
    with model_init_scope({"zero_optimization": {"stage": 2}}) as partitioned:
        assert not partitioned and not is_deepspeed_zero3_enabled()
    with pytest.raises(RuntimeError), model_init_scope(z3):
        raise RuntimeError("a failed load")
    assert deepspeed_config() is None
