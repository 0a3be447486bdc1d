"""Parameter-budget targets: analytic counts, candidate shapes, ranking by LM loss after pruning."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from sapling.config import ConfigError
from sapling.models import count_parameters, tiny_config
from sapling.prune.importance import estimate_importance
from sapling.prune.search import (
    GROUPS,
    candidate_shapes,
    count_params,
    default_multiple,
    format_table,
    search_target,
)
from sapling.prune.select import TARGET_FIELDS, plan_from_scores, resolve_target
from sapling.prune.slicing import slice_model

# Demo-sized teacher (hidden 256, intermediate 768): default multiple 64.
DEMO = dict(vocab_size=384, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2)
# Smaller teacher for the end-to-end searches (fast on CPU).
SMALL = dict(vocab_size=256, hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, head_dim=16)
LLAMA_70B = AutoConfig.for_model("llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                                 num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8)
VARIANTS = {
    "llama": ("llama-tiny", {}),
    "llama-bias": ("llama-tiny", {"attention_bias": True, "mlp_bias": True}),
    "mistral": ("mistral-tiny", {}),
    "qwen2": ("qwen2-tiny", {}),
    "qwen3": ("qwen3-tiny", {}),
    "qwen3-bias": ("qwen3-tiny", {"attention_bias": True}),
    "granite-bias": ("granite-tiny", {"attention_bias": True, "mlp_bias": True}),
    "gemma2": ("gemma2-tiny", {}),
    "gemma3-bias": ("gemma3-tiny", {"attention_bias": True}),
    "olmo2": ("olmo2-tiny", {}),
    "phi3": ("phi3-tiny", {}),
    "cohere-bias": ("cohere-tiny", {"attention_bias": True}),
    "cohere2": ("cohere2-tiny", {}),
}


def _shape(cfg) -> dict[str, int]:
    return {k: getattr(cfg, k) for k in TARGET_FIELDS}


def _model(cfg, seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).eval()


def _batches(vocab: int, n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, vocab, (2, 24), generator=g)} for _ in range(n)]


@pytest.fixture(scope="module")
def small_teacher():
    model = _model(tiny_config("llama-tiny", **SMALL))
    scores = estimate_importance(model, _batches(SMALL["vocab_size"], 2, seed=1))
    return model, scores


# ------------------------------------------------------------------------------------------- counts


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_count_params_matches_hf_models(variant, tied):
    name, extra = VARIANTS[variant]
    cfg = tiny_config(name, tie_word_embeddings=tied, **extra)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    assert count_params(cfg) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("variant", ["llama-bias", "qwen2", "qwen3-bias", "granite-bias", "gemma2", "gemma3-bias",
                                     "olmo2", "phi3", "cohere-bias", "cohere2"])
def test_count_params_of_a_shape_matches_slice_model(variant):
    name, extra = VARIANTS[variant]
    cfg = tiny_config(name, tie_word_embeddings=False, num_hidden_layers=3, num_attention_heads=8,
                      num_key_value_heads=4, head_dim=8, **extra)
    teacher = _model(cfg)
    shape = {"num_hidden_layers": 2, "hidden_size": 48, "intermediate_size": 80, "num_attention_heads": 4,
             "num_key_value_heads": 2}
    scores = estimate_importance(teacher, _batches(cfg.vocab_size, 1, seed=2))
    student = slice_model(teacher, plan_from_scores(scores, cfg, shape))
    assert _shape(student.config) == shape
    assert count_params(cfg, shape) == count_params(student.config) == count_parameters(student)
    assert count_params(cfg, shape) < count_params(cfg)


def test_count_params_is_analytic_for_large_configs():
    start = time.perf_counter()
    assert count_params(LLAMA_70B) == 70_553_706_496  # Llama-3-70B, as published
    shapes = candidate_shapes(LLAMA_70B, 35_000_000_000, multiple=None)
    assert time.perf_counter() - start < 5.0
    assert len(shapes) == 12
    assert all(s["hidden_size"] % 128 == 0 and s["intermediate_size"] % 128 == 0 for s in shapes)


def test_count_params_rejects_unsupported_models():
    with pytest.raises(ValueError, match="gpt2"):
        count_params(AutoConfig.for_model("gpt2"))


@pytest.mark.parametrize(("sizes", "expected"), [
    ((8192, 28672), 128),  # Llama-3-70B
    ((896, 4864), 128),  # Qwen2.5-0.5B: 7 steps of 128 in the hidden size
    ((256, 768), 64),  # the demo teacher
    ((64, 128), 16),
    ((100, 300), 4),
    ((7, 21), 1),
])
def test_default_multiple(sizes, expected):
    cfg = SimpleNamespace(hidden_size=sizes[0], intermediate_size=sizes[1])  # all it reads
    assert default_multiple(cfg) == expected


# --------------------------------------------------------------------------------------- candidates


def _check_candidates(teacher_cfg, shapes, budget, multiple, tolerance=0.01):
    teacher = _shape(teacher_cfg)
    group = teacher["num_attention_heads"] // teacher["num_key_value_heads"]
    keys = [tuple(s[k] for k in TARGET_FIELDS) for s in shapes]
    assert len(set(keys)) == len(keys) and shapes
    for s in shapes:
        assert set(s) == set(TARGET_FIELDS)
        assert s != teacher
        assert abs(count_params(teacher_cfg, s) - budget) <= tolerance * budget
        assert all(1 <= s[k] <= teacher[k] for k in TARGET_FIELDS)
        for k in ("hidden_size", "intermediate_size"):
            assert s[k] % multiple == 0 or s[k] == teacher[k], (k, s)
        assert s["num_attention_heads"] % s["num_key_value_heads"] == 0
        assert s["num_attention_heads"] // s["num_key_value_heads"] <= group
        assert resolve_target(teacher_cfg, s) == s  # the explicit-target rules accept it as is


@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.7, 0.9])
@pytest.mark.parametrize("multiple", [32, None])
def test_candidates_meet_budget_and_constraints(fraction, multiple):
    cfg = tiny_config("llama-tiny", **DEMO)
    budget = int(fraction * count_params(cfg))
    try:
        shapes = candidate_shapes(cfg, budget, multiple=multiple)
    except ConfigError:
        assert multiple == 32  # the automatic multiple goes finer until shapes fit
        return
    assert len(shapes) <= 12
    _check_candidates(cfg, shapes, budget, 8 if multiple is None else multiple)


def _group(teacher, shape) -> str:
    if shape["num_attention_heads"] < teacher["num_attention_heads"]:
        return "attention"
    if shape["num_hidden_layers"] == teacher["num_hidden_layers"]:
        return "width"
    narrower = shape["hidden_size"] < teacher["hidden_size"] or shape["intermediate_size"] < teacher["intermediate_size"]
    return "mixed" if narrower else "depth"


def test_families_are_spread_and_capped():
    cfg = tiny_config("llama-tiny", **DEMO)
    teacher = _shape(cfg)
    depth_only = {**teacher, "num_hidden_layers": 3}
    budget = int(0.995 * count_params(cfg, depth_only))  # within 1% of a depth-only shape
    every = candidate_shapes(cfg, budget, multiple=8, max_candidates=1000)
    shapes = candidate_shapes(cfg, budget, multiple=8, max_candidates=12)
    _check_candidates(cfg, every, budget, 8)
    assert depth_only in shapes and all(s in every for s in shapes)
    by_group = {g: [s for s in every if _group(teacher, s) == g] for g in GROUPS}
    picked = {g: [s for s in shapes if _group(teacher, s) == g] for g in GROUPS}
    # round-robin over the groups: one each for mixed and depth (all they have), the rest shared
    assert {g: len(v) for g, v in picked.items()} == {"width": 5, "mixed": 1, "depth": 1, "attention": 5}
    assert picked["attention"] == by_group["attention"]  # all it has
    # evenly spread over the width-only shapes: both ends included, no two with the same hidden size
    width, picked_width = by_group["width"], picked["width"]
    assert len(width) > len(picked_width)
    assert picked_width[0] == width[0] and picked_width[-1] == width[-1]
    assert len({s["hidden_size"] for s in picked_width}) == len(picked_width)
    # a cap of 4 deals one slot per group, in GROUPS order
    few = candidate_shapes(cfg, budget, multiple=8, max_candidates=4)
    assert [_group(teacher, s) for s in few] == list(GROUPS)
    assert len(candidate_shapes(cfg, budget, multiple=8, max_candidates=1)) == 1
    assert candidate_shapes(cfg, budget, multiple=8, max_candidates=12) == shapes  # deterministic


def test_automatic_multiple_prefers_coarse_widths():
    cfg = tiny_config("llama-tiny", **DEMO)
    budget = count_params(cfg, {**_shape(cfg), "hidden_size": 192, "intermediate_size": 512})
    shapes = candidate_shapes(cfg, budget, multiple=None, max_candidates=4)
    _check_candidates(cfg, shapes, budget, 64)  # 64 (the default) gives enough shapes here


def test_candidates_are_shapes_the_hf_config_class_accepts():
    """A SmolLM2-135M-like teacher (9 heads of head_dim 64, hidden 576): LlamaConfig refuses a hidden size that
    9 does not divide, even with head_dim given. The search used to propose hidden 512/448/384 with 9 heads."""
    from transformers import LlamaConfig

    from sapling.models.shapes import shape_problem
    from sapling.prune.select import target_config

    cfg = LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536,
                      num_hidden_layers=30, vocab_size=49152, tie_word_embeddings=True, head_dim=64)
    shapes = candidate_shapes(cfg, count_params(cfg) // 2, multiple=None)
    assert shapes
    for s in shapes:
        assert shape_problem(target_config(cfg, s), cfg) is None, s
        assert resolve_target(cfg, s) == s


@pytest.mark.parametrize(("budget", "multiple", "text"), [
    (10**9, 64, "teacher's 3,246,336 parameters"),
    (0, 64, "must be between 0"),
    (1_000, 64, "nearest: 61,632 (+"),  # smaller than the smallest shape
    (973_900, 64, "prune.search.multiple=32"),  # between two shapes: a finer multiple reaches it
])
def test_impossible_budgets_fail_with_one_clear_line(budget, multiple, text):
    cfg = tiny_config("llama-tiny", **DEMO)
    assert count_params(cfg) == 3_246_336
    with pytest.raises(ConfigError) as err:
        candidate_shapes(cfg, budget, multiple=multiple)
    msg = str(err.value)
    assert msg.startswith(f"prune.target.params={budget}:") and "fix:" in msg and "\n" not in msg
    assert text in msg
    assert err.value.key == "prune.target.params"


# ------------------------------------------------------------------------------------------- search


def test_search_picks_the_lowest_loss_shape_within_budget(small_teacher, tmp_path):
    teacher, scores = small_teacher
    before = count_parameters(teacher)
    budget = int(0.6 * before)
    batches = _batches(SMALL["vocab_size"], 2, seed=3)
    lines: list[str] = []
    best, rows = search_target(teacher, scores, budget, eval_batches=batches, max_candidates=6, log=lines.append)
    assert count_parameters(teacher) == before  # the teacher is left as it was
    assert len(rows) == 6 and [r["rank"] for r in rows] == list(range(1, 7))
    losses = [r["loss_pruned"] for r in rows]
    assert losses == sorted(losses) and len(set(losses)) > 1
    assert best == {k: rows[0][k] for k in TARGET_FIELDS}
    assert all(r["loss_distilled"] is None for r in rows)
    assert {r["family"] for r in rows} <= {"width", "mixed", "depth"}

    student = slice_model(teacher, plan_from_scores(scores, teacher.config, best))
    assert abs(count_parameters(student) - budget) <= 0.01 * budget
    assert count_parameters(student) == rows[0]["params"]
    with torch.no_grad():  # the table's loss is this model's held-out loss
        logits = student(input_ids=torch.cat([b["input_ids"] for b in batches])).logits
        ids = torch.cat([b["input_ids"] for b in batches])
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    assert rows[0]["loss_pruned"] == pytest.approx(loss.item(), rel=1e-5)

    student.save_pretrained(tmp_path)
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert _shape(reloaded.config) == best

    table = format_table(rows)
    assert lines[1:] == table.splitlines() and "6 candidate shapes" in lines[0]
    assert len(table.splitlines()) == len(rows) + 2 and table.count("| - |") == len(rows)
    first = table.splitlines()[2]
    assert first.startswith(f"| 1 | {rows[0]['family']} | {best['num_hidden_layers']} | {best['hidden_size']} |")
    assert f"{rows[0]['params']:,}" in first and f"{rows[0]['loss_pruned']:.4f}" in first

    again = search_target(teacher, scores, budget, eval_batches=batches, max_candidates=6, log=lambda _: None)
    assert again == (best, rows)  # deterministic


def test_distillation_reranks_the_top_k(small_teacher):
    teacher, scores = small_teacher
    budget = int(0.6 * count_parameters(teacher))
    seen = []

    def distill(model) -> float:  # prefers the narrowest hidden size, unlike the prune-time loss
        assert model.training and all(p.requires_grad for p in model.parameters())
        seen.append(model.config.hidden_size)
        return float(model.config.hidden_size)

    best, rows = search_target(teacher, scores, budget, eval_batches=_batches(SMALL["vocab_size"], 1, seed=4),
                               max_candidates=6, distill=distill, distill_top_k=3, log=lambda _: None)
    top, rest = rows[:3], rows[3:]
    assert len(seen) == 3 and all(r["loss_distilled"] is not None for r in top)
    assert [r["loss_distilled"] for r in top] == sorted(r["loss_distilled"] for r in top)
    assert best["hidden_size"] == min(seen) == rows[0]["hidden_size"]
    assert all(r["loss_distilled"] is None for r in rest)
    assert [r["loss_pruned"] for r in rest] == sorted(r["loss_pruned"] for r in rest)
    assert max(r["loss_pruned"] for r in top) <= min(r["loss_pruned"] for r in rest)
    assert "| - |" in format_table(rows) and f"{rows[0]['loss_distilled']:.4f}" in format_table(rows)
