"""The headline benchmark's bookkeeping (benchmarks/efficiency.py): where a curve first reaches a loss, the
ratio table along the scratch run, and the `--target` parser, on synthetic curves."""

from __future__ import annotations

import argparse
import json

import pytest


@pytest.fixture(scope="module")
def eff(load_benchmark):
    return load_benchmark("efficiency")


def _curve(losses: list[float], tokens_per_point: int, flops_per_token: float, start: int = 1) -> list[dict]:
    return [{"step": start + i, "tokens": (start + i) * tokens_per_point,
             "flops": (start + i) * tokens_per_point * flops_per_token, "val_loss": v} for i, v in enumerate(losses)]


def test_first_reach_interpolates_and_reports_never(eff):
    c = _curve([5.0, 4.0, 3.0, 3.5], 100, 2.0)
    r = eff.first_reach(c, 3.5)  # halfway between the 2nd (4.0, 200 tokens) and 3rd (3.0, 300 tokens) points
    assert r["tokens"] == pytest.approx(250) and r["flops"] == pytest.approx(500) and r["step"] == pytest.approx(2.5)
    assert eff.first_reach(c, 5.5)["tokens"] == 100  # the first point already below
    assert eff.first_reach(c, 2.0) is None


def test_ratios_along_the_scratch_run(eff, tmp_path):
    b = _curve([6.0, 5.0, 4.5, 4.0, 3.8, 3.7, 3.65, 3.6], 1000, 1.0)  # 8 evaluations, 8,000 tokens
    a = [{"step": 0, "tokens": 0, "flops": 50.0, "val_loss": 5.5}] + _curve([4.2, 3.9, 3.75], 100, 3.0)
    table = eff.ratios_along({"a": a, "b": b})
    rows = [line for line in table.splitlines() if line.startswith("| ") and "%" in line]
    assert len(rows) == 5  # 1/8, 1/4, 1/2, 3/4, all: distinct evaluations here
    cells = [[c.strip() for c in r.strip("|").split("|")] for r in rows]
    # 1/8 of the run: (b) at 1,000 tokens has 6.0; (a) is below it right after pruning (0 tokens, 50 FLOPs)
    assert cells[0][1] == "6.0000" and cells[0][3].startswith("0 ") and cells[0][5] == f"{1000 / 50:.1f}x"
    # 1/2 (4,000 tokens, 4.0): (a) crosses 4.0 between 100 (4.2) and 200 (3.9) tokens: at 166.7
    assert cells[2][1] == "4.0000" and cells[2][3] == "167" and cells[2][4] == f"{4000 / (500 / 3):.1f}x"
    # the end (3.6): never reached by (a)
    assert cells[4][1] == "3.6000" and cells[4][3] == "not reached"

    saved = tmp_path / "r.json"
    saved.write_text(json.dumps({"curves": {"a": a, "b": b}}))
    saved.with_suffix(".md").write_text("# results\n\nbody\n")
    eff.add_ratios_along(saved)
    eff.add_ratios_along(saved)  # idempotent: the section is replaced, not appended twice
    md = saved.with_suffix(".md").read_text()
    assert md.startswith("# results\n\nbody\n") and md.count(eff.ALONG_HEADING) == 1 and table in md


@pytest.mark.parametrize("text", ["hidden_size", "hidden_size=0", "depth=2", "hidden_size=x", ""])
def test_target_parser_rejects(eff, text):
    with pytest.raises(argparse.ArgumentTypeError):
        eff.parse_target(text)


def test_target_parser_accepts(eff):
    assert eff.parse_target("hidden_size=176,intermediate_size=512") == {"hidden_size": 176,
                                                                         "intermediate_size": 512}


def test_reuse_scratch_checks_shape_length_and_corpus(eff, tmp_path):
    target = {"num_hidden_layers": 4, "hidden_size": 176}
    b = _curve([6.0, 5.0, 4.0], 1000, 1.0, start=100)  # last evaluation at step 102
    saved = tmp_path / "r.json"
    saved.write_text(json.dumps({"command": "python benchmarks/efficiency.py --corpus-bytes 24000000",
                                 "target": target, "curves": {"a": [], "b": b}, "params": {"b": 7},
                                 "wall_s": {"b": 9.0}}))
    saved.with_suffix(".md").write_text("# r\n\n- date: 2026-12-02; commit abc\n")
    got = eff.reused_scratch(saved, target, 102, 24000000)
    assert got["curves"]["b"] == b and "r.json" in got["source"] and "commit abc" in got["source"]
    for args, word in [(({**target, "hidden_size": 128}, 102, 24000000), "students"),
                       ((target, 200, 24000000), "steps"), ((target, 102, None), "corpus")]:
        with pytest.raises(SystemExit, match=word):
            eff.reused_scratch(saved, *args)


def test_reuse_scratch_refuses_the_file_it_would_replace(eff, tmp_path):
    out = tmp_path / "r.md"
    with pytest.raises(SystemExit):
        eff.main(["--reuse-scratch", str(tmp_path / "r.json"), "--out", str(out)])
