"""benchmarks/real_model.py without running it: its shape budgets, the report it writes from saved results, and
the prune part's saving and resuming (its distillation runs stubbed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module")
def real_model(load_benchmark):
    return load_benchmark("real_model")


@pytest.fixture(scope="module")
def smol_like_dir(tmp_path_factory):
    """A SmolLM2-like toy: 9 query / 3 KV heads of 8 channels, tied embeddings, a vocabulary that dominates."""
    from transformers import LlamaConfig

    d = tmp_path_factory.mktemp("teacher")
    LlamaConfig(vocab_size=600, hidden_size=72, intermediate_size=192, num_hidden_layers=6, num_attention_heads=9,
                num_key_value_heads=3, head_dim=8, tie_word_embeddings=True).save_pretrained(d)
    return d


def test_budget_shapes_land_near_the_budget_and_count_exactly(real_model, smol_like_dir):
    from transformers import AutoConfig, AutoModelForCausalLM

    total = real_model.count_shape(smol_like_dir, {})
    budget = total // 2
    shapes = real_model.budget_shapes(smol_like_dir, budget)
    assert set(shapes) == {"width", "depth", "mixed"}
    assert set(shapes["width"]) == {"hidden_size", "intermediate_size"} and shapes["width"]["hidden_size"] % 9 == 0
    assert shapes["width"]["hidden_size"] < 72
    assert set(shapes["depth"]) == {"num_hidden_layers"} and shapes["depth"]["num_hidden_layers"] < 6
    assert shapes["mixed"]["num_hidden_layers"] == 4 and shapes["mixed"]["intermediate_size"] < 192
    for name, shape in shapes.items():
        count = real_model.count_shape(smol_like_dir, shape)
        assert abs(count - budget) < 0.2 * budget, (name, shape, count, budget)
        config = AutoConfig.from_pretrained(smol_like_dir, **shape, head_dim=8)  # a model built at it: same count
        model = AutoModelForCausalLM.from_config(config)
        assert count == sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _curve(losses, tokens_per_point=1000, flops_per_token=10.0):
    return [{"step": i, "tokens": i * tokens_per_point, "flops": i * tokens_per_point * flops_per_token,
             "val_loss": v} for i, v in enumerate(losses)]


def test_report_from_saved_results(real_model, tmp_path):
    meta = {"command": "python benchmarks/real_model.py --part x", "date": "2026-12-03", "commit": "abc",
            "device": "CPU", "wall_s": 1.0}
    prune_rows = [
        {"case": case, "shape_name": case.split(" / ")[0], "shape": {}, "importance": "activation",
         "depth_metric": "block_influence", "params": 50, "loss_pruned": lp, "loss_distilled": ld, "tokens": 4096,
         "wall_s": 3.0, "dir": "/nowhere"}
        for case, lp, ld in [("width / activation", 5.0, 3.1), ("width / magnitude", 6.0, 3.4),
                             ("width / random", 9.0, 4.0), ("depth / block influence", 7.0, 3.3),
                             ("depth / layer loss", 6.5, 3.2), ("mixed / activation", 5.5, 3.0)]]
    val = lambda loss: {"loss": loss, "ppl": float(torch.tensor(loss).exp())}  # noqa: E731
    quant_rows = {
        "teacher: RTN w4 g64": {"model": "teacher", "recipe": "RTN w4 g64", "val_16bit": val(2.0),
                                "val_quantized": val(2.4), "bytes": 30, "bytes_16bit": 100, "quantize_s": 5.0},
        "teacher: GPTQ w4 g64": {"model": "teacher", "recipe": "GPTQ w4 g64", "val_16bit": val(2.0),
                                 "val_quantized": val(2.1), "bytes": 30, "bytes_16bit": 100, "quantize_s": 50.0},
    }
    results = {
        "corpus": "a corpus",
        "prune": {"kd_steps": 4, "budget": 50, "shapes": {"width": {"hidden_size": 8}}, "rows": prune_rows,
                  "teacher_params": 100, "meta": meta},
        "recovery": {"case": "mixed / activation", "shape": {}, "params": 50, "steps": 4, "eval_every": 1,
                     "loss_pruned": 5.0, "teacher": {"loss": 2.0, "tokens": 10},
                     "curves": {"a": _curve([5.0, 3.5, 3.0, 2.8, 2.6]), "b": _curve([5.0, 4.0, 3.6, 3.4, 3.2]),
                                "c": _curve([9.0, 6.0, 4.5, 3.5, 3.0])},
                     "wall_s": {"a": 1.0, "b": 1.0, "c": 1.0}, "tokens_per_step": 1000, "meta": meta},
        "quant": {"rows": quant_rows, "qad": None, "params": {"teacher": 1e9}, "calibration": 8,
                  "student_case": None, "meta": meta},
    }
    out = tmp_path / "real.md"
    text = real_model.write_report(results, out)
    assert out.read_text() == text and out.with_suffix(".png").stat().st_size > 0
    assert "| mixed / activation **(best)** |" in text
    assert "- width: activation 3.1000 vs magnitude 3.4000 vs random 4.0000 after distillation" in text
    assert "- depth: block influence 7.0000 -> 3.3000, layer loss 6.5000 -> 3.2000" in text
    # (c) ends at 3.0: (a) reaches it at 2,000 tokens, (c) used 4,000 -> 2.0x; (b) ends at 3.2: (a) crosses it
    # between 2,000 (3.0) ... i.e. between 1,000 (3.5) and 2,000 (3.0), at 1,600 tokens -> 4000/1600 = 2.5x
    assert "(a) reaches (c) same shape from scratch (CE)'s final loss 3.0000 after 2,000 tokens: **2.0x fewer " \
           "tokens, 2.0x fewer FLOPs**" in text
    assert "final loss 3.2000 after 1,600 tokens: **2.5x fewer tokens" in text
    # gap 5.0 - 2.0 = 3.0; after 1,000 tokens 1.5 recovered = 50%, 50% per million tokens x 1000 = 50000%
    assert "after 1,000 tokens (a) has recovered 50% of the pruning gap" in text
    # perplexity increases: RTN e^0.4 - 1 = 49.18%, GPTQ e^0.1 - 1 = 10.52%: ratio 0.21 <= 0.35
    assert "| teacher | RTN w4 g64 | 2.0000 | 2.4000 | +49.18% | 0.300 | 5 | 5 |" in text
    assert "- teacher: GPTQ's w4 perplexity increase is 0.21x RTN's (goal <= 0.35x: **met**)" in text
    assert "not run yet: (d)" in text and "--runs d" in text

    # a recovery spread over sessions: only (b) saved so far -> its row, the missing runs named, no ratios
    results["recovery"]["curves"] = {"b": results["recovery"]["curves"]["b"]}
    del results["recovery"]["tokens_per_step"]
    text = real_model.write_report(results, out)
    assert "| (b) pruned + retrained (CE only) | 3.2000 |" in text and "not run yet: (a), (c), (d)" in text
    assert "fewer tokens" not in text


def test_prune_part_saves_each_case_and_resumes(real_model, tmp_path, monkeypatch):
    """Each pruning case is saved as it finishes; a rerun with the same budget and steps runs only the missing
    ones (an interrupted ~1 h part loses at most one case)."""
    import json
    import types

    import sapling.recipes.distill as distill_recipe

    ran: list[str] = []

    def fake_distill(overrides):
        out = Path(next(o.split("=", 1)[1] for o in overrides if o.startswith("output_dir=")))
        out.mkdir(parents=True, exist_ok=True)
        ran.append(out.name)
        shape = {f"{who}_{k}": 4 for k in real_model.SHAPE_KEYS for who in ("teacher", "student")}
        records = [{"event": "prune", "student_params": 50, "teacher_params": 100, "val_loss": 6.0, **shape},
                   {"event": "done", "val_loss": 3.0 + len(ran), "tokens": 1024}]
        (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    monkeypatch.setattr(distill_recipe, "run_distill", fake_distill)
    monkeypatch.setattr(real_model, "compose_cfg", lambda *overrides: list(overrides))
    monkeypatch.setattr(real_model, "budget_shapes", lambda *_: {"width": {"hidden_size": 8}, "depth": {},
                                                                   "mixed": {}})
    monkeypatch.setattr(real_model, "count_shape", lambda *_: 50)
    setup = types.SimpleNamespace(teacher_dir=tmp_path, work=tmp_path / "work",
                                  overrides=lambda command, out: [f"command={command}", f"output_dir={out}"])
    args = types.SimpleNamespace(budget=50, kd_steps=2, cases=3)
    results: dict = {}
    saves: list[int] = []

    def save(part):
        results["prune"] = part
        saves.append(len(part["rows"]))

    first = real_model.prune_part(setup, args, results, save)
    assert [r["case"] for r in first["rows"]] == [c[0] for c in real_model.PRUNE_CASES[:3]] and saves == [1, 2, 3]
    ran.clear()
    args.cases = 5  # two more cases: only those run
    again = real_model.prune_part(setup, args, results, save)
    assert len(ran) == 2 and [r["case"] for r in again["rows"]] == [c[0] for c in real_model.PRUNE_CASES[:5]]
    assert again["rows"][:3] == first["rows"][:3]
    ran.clear()
    args.kd_steps = 3  # other settings: everything runs again
    assert len(real_model.prune_part(setup, args, results, save)["rows"]) == 5 and len(ran) == 5
