"""The private DeepSpeed and transformers APIs Sapling uses are still where it expects them.

Each sits behind one adapter (`sapling.train.ds_compat`, `model_init_scope`); these tests fail loudly, naming
the API, when an upgrade moves one, instead of a ZeRO-3 export, a resume at another world size or a ZeRO-3
model load failing on a GPU cluster hours into a run.
"""

from __future__ import annotations

import inspect
import re
from importlib.metadata import version
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement

from sapling.train import ds_compat

REPO = Path(__file__).resolve().parents[2]


def _requirement(name: str) -> Requirement:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(r for r in map(Requirement, deps) if r.name == name)


def test_deepspeed_is_pinned_to_the_tested_minor_release():
    req = _requirement("deepspeed")
    assert req.specifier.contains(version("deepspeed")), f"installed deepspeed {version('deepspeed')}, pinned {req}"
    assert any(s.operator == "<" for s in req.specifier), f"{req}: pin an upper bound (the private APIs move)"


def test_private_deepspeed_methods_exist():
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    assert callable(getattr(DeepSpeedEngine, ds_compat.ENGINE_PRIVATE, None)), ds_compat.ENGINE_PRIVATE
    params = inspect.signature(getattr(DeepSpeedEngine, ds_compat.ENGINE_PRIVATE)).parameters
    assert [p for p in params.values() if p.default is inspect.Parameter.empty] == [params["self"]]
    for optimizer in (DeepSpeedZeroOptimizer, DeepSpeedZeroOptimizer_Stage3):  # ZeRO 1/2 and 3
        method = getattr(optimizer, ds_compat.OPTIMIZER_PRIVATE, None)
        assert callable(method), f"{optimizer.__name__}.{ds_compat.OPTIMIZER_PRIVATE}"
        assert list(inspect.signature(method).parameters) == ["self"]


def test_ds_to_universal_takes_the_arguments_main_reads(tmp_path):
    from deepspeed.checkpoint import ds_to_universal

    args = ds_compat.universal_args(tmp_path / "in", tmp_path / "out")
    assert (args.input_folder, args.output_folder) == (str(tmp_path / "in"), str(tmp_path / "out"))
    assert (args.num_extract_workers, args.num_merge_workers, args.inject_missing_state) == (1, 1, True)
    assert args.strict and not args.keep_temp_folder
    # every attribute the converter reads from its arguments is there
    read = set(re.findall(r"\bargs\.(\w+)", inspect.getsource(ds_to_universal)))
    assert read <= set(vars(args)), read - set(vars(args))
    assert list(inspect.signature(ds_to_universal.main).parameters) == ["args"]


def test_transformers_asks_the_zero_scope_only_for_what_it_has():
    """`model_init_scope` registers a small object with transformers instead of an HfDeepSpeedConfig (which
    would need a whole DeepSpeed config): transformers must ask it for `config` and `is_zero3()` alone."""
    from transformers.integrations import deepspeed as hf_ds

    for name in ("set_hf_deepspeed_config", "unset_hf_deepspeed_config", "is_deepspeed_zero3_enabled",
                 "deepspeed_config"):
        assert callable(getattr(hf_ds, name, None)), f"transformers.integrations.deepspeed.{name}"
    asked = set(re.findall(r"_hf_deepspeed_config_weak_ref\(\)\.(\w+)", inspect.getsource(hf_ds)))
    assert asked == {"config", "is_zero3"}, asked
    with pytest.raises(TypeError):  # a weakref is what transformers keeps (hence the scope object kept alive)
        hf_ds.set_hf_deepspeed_config(None)


def test_transformers_attn_implementation_is_a_settable_config_attribute():
    """Sapling reads a model's `config._attn_implementation` and sets it on configs it builds from."""
    from transformers import LlamaConfig

    config = LlamaConfig(num_hidden_layers=1, hidden_size=8, intermediate_size=16, num_attention_heads=2)
    config._attn_implementation = "eager"
    assert config._attn_implementation == "eager"
