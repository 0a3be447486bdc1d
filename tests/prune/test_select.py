"""Target resolution and the choice of structures to keep from importance scores."""

from __future__ import annotations

import pytest
import torch

from sapling.config import ConfigError
from sapling.models import tiny_config
from sapling.prune.importance import ImportanceScores
from sapling.prune.select import plan_from_scores, resolve_target

TEACHER = tiny_config("llama-tiny", hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=8)


def _scores(seed: int = 0) -> ImportanceScores:
    g = torch.Generator().manual_seed(seed)
    heads = torch.rand(4, 8, generator=g)
    return ImportanceScores(mlp=torch.rand(4, 96, generator=g), heads=heads,
                            kv_groups=heads.view(4, 4, 2).sum(-1), hidden=torch.rand(64, generator=g),
                            block_influence=torch.tensor([0.5, 0.1, 0.9, 0.3]), layer_loss=None, num_tokens=100)


def test_resolve_target_fills_from_teacher():
    shape = resolve_target(TEACHER, {"intermediate_size": 48, "params": None})
    assert shape == {"num_hidden_layers": 4, "hidden_size": 64, "intermediate_size": 48,
                     "num_attention_heads": 8, "num_key_value_heads": 4}
    # fewer KV groups keep all query heads of each kept group unless told otherwise
    assert resolve_target(TEACHER, {"num_key_value_heads": 2})["num_attention_heads"] == 4


@pytest.mark.parametrize(("target", "key", "text"), [
    ({"intermediate_size": 200}, "prune.target.intermediate_size", "larger than the teacher's 96"),
    ({"num_hidden_layers": 0}, "prune.target.num_hidden_layers", "must be > 0"),
    ({"num_attention_heads": 6, "num_key_value_heads": 4}, "prune.target.num_attention_heads", "not divisible"),
    ({"num_attention_heads": 6, "num_key_value_heads": 2}, "prune.target.num_attention_heads", "per KV group"),
])
def test_bad_targets(target, key, text):
    with pytest.raises(ConfigError) as err:
        resolve_target(TEACHER, target)
    assert str(err.value).startswith(f"{key}=") and text in str(err.value)


def test_plan_keeps_top_structures_uniformly():
    scores = _scores()
    shape = resolve_target(TEACHER, {"num_hidden_layers": 2, "hidden_size": 48, "intermediate_size": 40,
                                     "num_attention_heads": 2, "num_key_value_heads": 2})
    plan = plan_from_scores(scores, TEACHER, shape)
    assert plan.layers == [0, 2]  # the two highest block influences, in order
    assert plan.hidden.tolist() == sorted(torch.topk(scores.hidden, 48).indices.tolist())
    for kept, layer in zip(plan.mlp, plan.layers):
        assert kept.tolist() == sorted(torch.topk(scores.mlp[layer], 40).indices.tolist())
    for kv, heads, layer in zip(plan.kv_heads, plan.heads, plan.layers):
        assert len(kv) == 2 and len(heads) == 2
        assert kv.tolist() == sorted(torch.topk(scores.kv_groups[layer], 2).indices.tolist())
        for g, h in zip(kv.tolist(), heads.tolist()):
            assert h // 2 == g  # each kept query head belongs to its kept group, in group order
            assert scores.heads[layer, h] == scores.heads[layer, 2 * g:2 * g + 2].max()


def test_identity_target_keeps_everything():
    shape = resolve_target(TEACHER, {})
    plan = plan_from_scores(_scores(), TEACHER, shape)
    assert plan.layers is None and plan.hidden is None and plan.mlp is None and plan.heads is None
