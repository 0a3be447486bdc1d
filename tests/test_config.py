"""Config validation: each bad value fails with one line naming the key and the fix."""

from __future__ import annotations

from importlib.resources import files

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from sapling.config import ConfigError, register_configs, validate


def composed(*overrides: str):
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(files("sapling.conf")), version_base=None):
        return compose(config_name="config", overrides=list(overrides))


def test_defaults_compose_and_validate():
    cfg = composed("command=pipeline", "experiment=demo")
    validate(cfg)
    assert cfg.teacher.tiny == "llama-tiny"
    assert cfg.trainer.max_steps > 0


def test_deepspeed_and_logger_groups_select():
    cfg = composed("command=pipeline", "logger=none")
    assert cfg.logger.name == "none"


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["data.seq_len=0"], "data.seq_len"),
        (["data.seq_len=-5"], "data.seq_len"),
        (["data.files=[/nonexistent/corpus.txt]"], "data.files[0]"),
        (["data.files=[corpus.csv]"], "data.files[0]"),
        (["data.val_fraction=1.5"], "data.val_fraction"),
        (["distill.divergence=kl"], "distill.divergence"),
        (["distill.temperature=0"], "distill.temperature"),
        (["distill.beta=2"], "distill.beta"),
        (["distill.kd_weight=0", "distill.ce_weight=0"], "distill.kd_weight"),
        (["trainer.micro_batch_size=0"], "trainer.micro_batch_size"),
        (["trainer.grad_accum=0"], "trainer.grad_accum"),
        (["trainer.lr=0"], "trainer.lr"),
        (["trainer.device=tpu"], "trainer.device"),
        (["hooks.pre=[nonsense]"], "hooks.pre[0]"),
        (["teacher.path=/nonexistent/teacher"], "teacher.path"),
        (["teacher.tiny=gpt-huge"], "teacher.tiny"),
    ],
)
def test_bad_value_names_key_and_fix(overrides, key):
    cfg = composed("command=pipeline", *overrides)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    msg = str(err.value)
    assert msg.startswith(f"{key}=")
    assert "fix:" in msg
    assert "\n" not in msg


def test_commands_require_their_inputs():
    with pytest.raises(ConfigError, match=r"^teacher\.path="):
        validate(composed("command=distill"))
    with pytest.raises(ConfigError, match=r"^model\.path="):
        validate(composed("command=eval"))


def test_distill_requires_data(teacher_dir):
    with pytest.raises(ConfigError, match=r"^data\.files="):
        validate(composed("command=distill", f"teacher.path={teacher_dir}"))


def test_checkpoint_dir_without_config_json(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        validate(composed("command=distill", f"teacher.path={tmp_path}"))


def test_shape_checks():
    from sapling.models import apply_overrides, tiny_config
    from sapling.models.shapes import check_shape, check_vocab

    base = tiny_config("llama-tiny")
    with pytest.raises(ConfigError, match=r"^student\.config\.num_attention_heads=6: not divisible by num_key_v"):
        check_shape("student.config", apply_overrides(base, {"num_attention_heads": 6, "num_key_value_heads": 4,
                                                             "hidden_size": 96}))
    with pytest.raises(ConfigError, match=r"^student\.config\.hidden_size=70"):
        check_shape("student.config", apply_overrides(base, {"hidden_size": 70}))
    with pytest.raises(ConfigError, match=r"^student\.config\.num_hidden_layers=-1: must be > 0"):
        check_shape("student.config", apply_overrides(base, {"num_hidden_layers": -1}))
    with pytest.raises(ConfigError, match=r"^student\.config\.vocab_size=100: .*teacher vocab 512"):
        check_vocab(base, tiny_config("llama-tiny", vocab_size=100))
    check_shape("student.config", apply_overrides(base, {"num_hidden_layers": 1, "hidden_size": 32}))


@pytest.mark.parametrize(
    ("command", "overrides", "key"),
    [
        ("cache-teacher", ["teacher.tiny=llama-tiny", "data.files=[{data}]"], "cache.dir"),
        ("cache-teacher", ["teacher.tiny=llama-tiny", "data.files=[{data}]", "cache.dir=c", "cache.top_k=0"],
         "cache.top_k"),
        ("cache-teacher", ["teacher.tiny=llama-tiny", "data.files=[{data}]", "cache.dir=c", "cache.value_bits=30"],
         "cache.value_bits"),
        ("cache-teacher", ["teacher.tiny=llama-tiny", "cache.dir=c"], "data.files"),
        ("distill", ["teacher.cache=/nonexistent/cache"], "teacher.cache"),
        ("prune", ["teacher.cache={tmp}", "teacher.tiny=llama-tiny", "prune.target.num_hidden_layers=1",
                   "data.files=[{data}]"], "teacher.cache"),
        ("distill", ["teacher.cache={tmp}", "distill.features.weight=1"], "distill.features.weight"),
        ("distill", ["teacher.cache={tmp}", "hooks.pre=[prune]", "prune.target.num_hidden_layers=1"], "teacher.path"),
        ("distill", ["teacher.cache={tmp}", "student.cache={tmp}"], "student.cache"),
    ],
)
def test_cache_keys_are_validated(command, overrides, key, tmp_path):
    data = tmp_path / "a.txt"
    data.write_text("hello")
    cfg = composed(f"command={command}", *(o.format(tmp=tmp_path, data=data) for o in overrides))
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert str(err.value).startswith(f"{key}=") and "fix:" in str(err.value)


def test_cached_distill_needs_no_teacher_path_or_data(tmp_path):
    validate(composed("command=distill", f"teacher.cache={tmp_path}"))


def _fake_checkpoint(path) -> None:
    """A directory that passes the model-path checks: a config.json and a (whole) safetensors file."""
    import torch
    from safetensors.torch import save_file

    (path / "config.json").write_text("{}")
    save_file({"w": torch.zeros(1)}, str(path / "model.safetensors"))


@pytest.mark.parametrize(
    "command, overrides, key",
    [
        ("quantize", ["model.tiny=llama-tiny"], "model.path"),
        ("quantize", ["model.path={tmp}", "quant.scheme=w3a16"], "quant.scheme"),
        ("quantize", ["model.path={tmp}", "quant.group_size=100"], "quant.group_size"),
        ("quantize", ["model.path={tmp}", "quant.method=awq"], "quant.method"),
        ("quantize", ["model.path={tmp}", "quant.damp=0"], "quant.damp"),
        ("quantize", ["model.path={tmp}", "quant.observer=percentile"], "quant.observer"),
        ("quantize", ["model.path={tmp}"], "data.files"),  # GPTQ calibration needs data
        ("quantize", ["model.path={tmp}", "data.files=[{data}]", "quant.guided=true"], "quant.guided"),
        ("quantize", ["model.path={tmp}", "data.files=[{data}]", "quant.aware=true"], "quant.aware"),
        ("distill", ["teacher.tiny=llama-tiny", "data.files=[{data}]", "quant.aware=true", "quant.method=gptq"],
         "quant.method"),
        ("distill", ["teacher.tiny=llama-tiny", "data.files=[{data}]", "hooks.post=[quantize]", "quant.guided=true",
                     "quant.method=rtn"], "quant.method"),
    ],
)
def test_quant_keys_are_validated(command, overrides, key, tmp_path):
    data = tmp_path / "a.txt"
    data.write_text("hello")
    _fake_checkpoint(tmp_path)
    cfg = composed(f"command={command}", *(o.format(tmp=tmp_path, data=data) for o in overrides))
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert str(err.value).startswith(f"{key}=") and "fix:" in str(err.value)


def test_quant_configs_that_are_fine(tmp_path):
    data = tmp_path / "a.txt"
    data.write_text("hello")
    _fake_checkpoint(tmp_path)
    validate(composed("command=quantize", f"model.path={tmp_path}", "quant.method=rtn", "quant.eval=false"))
    validate(composed("command=distill", "teacher.tiny=llama-tiny", f"data.files=[{data}]", "quant.aware=true",
                      "hooks.post=[quantize]"))
    validate(composed("command=pipeline", "experiment=demo"))  # the demo quantizes with quant.guided=true


def test_prune_round_steps_leave_steps_for_the_pipeline_distill_stage():
    """The pipeline's distill stage spends trainer.max_steps on the rounds first, as `sapling distill` does:
    rounds that use them all would leave its last run none."""
    cfg = composed("command=pipeline", "experiment=demo", "trainer.max_steps=300", "prune.rounds=2",
                   "prune.round_steps=[300]")
    with pytest.raises(ConfigError, match=r"prune\.round_steps=\[300\]: uses all of trainer.max_steps=300"):
        validate(cfg)
    validate(composed("command=pipeline", "experiment=demo", "trainer.max_steps=300", "prune.rounds=2",
                      "prune.round_steps=[299]"))


@pytest.fixture(scope="module")
def pipeline_cfg():
    return composed("command=pipeline")


@pytest.mark.parametrize(("key", "shown", "choices"), [
    ("command", "command", "COMMANDS"),
    ("distill.divergence", "distill.divergence", "DIVERGENCES"),
    ("distill.features.loss", "distill.features.loss", None),
    ("prune.importance", "prune.importance", "PRUNE_IMPORTANCES"),
    ("prune.depth_metric", "prune.depth_metric", "DEPTH_METRICS"),
    ("prune.calibration.aggregation", "prune.calibration.aggregation", "AGGREGATIONS"),
    ("quant.scheme", "quant.scheme", "QUANT_SCHEMES"),
    ("quant.method", "quant.method", "QUANT_METHODS"),
    ("quant.dtype", "quant.dtype", "QUANT_DTYPES"),
    ("teacher.init", "teacher.init", "SOURCE_INITS"),
    ("student.dtype", "student.dtype", "SOURCE_DTYPES"),
    ("model.attn_implementation", "model.attn_implementation", "ATTN_IMPLEMENTATIONS"),
    ("trainer.device", "trainer.device", "DEVICES"),
    ("logger.name", "logger", "LOGGERS"),
    ("deepspeed.name", "deepspeed", "DEEPSPEED_PRESETS"),
])
def test_unknown_names_list_the_valid_ones(pipeline_cfg, key, shown, choices):
    """Every key that takes one of a few names (checked by the validator beside its dataclass): one line naming
    the key, the value and every valid name."""
    import copy

    from omegaconf import OmegaConf

    import sapling.config as config
    from sapling.distill.features import FEATURE_LOSSES

    cfg = copy.deepcopy(pipeline_cfg)
    OmegaConf.update(cfg, key, "bogus")
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    msg = str(err.value)
    assert msg.startswith(f"{shown}='bogus': unknown ") and "fix:" in msg and "\n" not in msg
    for name in getattr(config, choices) if choices else FEATURE_LOSSES:
        assert name in msg.split("fix:", 1)[1], (name, msg)
