"""`sapling eval eval.tasks=[...]`: lm-evaluation-harness on a Sapling checkpoint, with a task defined locally.

The task is a multiple-choice set in a jsonl file beside its YAML (`eval.task_paths`), so nothing is fetched;
the harness's accuracy must equal the one computed here from the checkpoint's own log-likelihoods.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

CONTEXTS = ["import", "def main(", "return", "for i in", "class Foo(", "if x ==", "while", "print(", "with open(",
            "raise", "from os import", "except", "lambda", "yield", "assert", "self."]
CHOICES = ["os", "path", "None", "range(10)", "1)", "True:", "x", "value", "zz", "Error", "q"]


def _docs(seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"context": c, "choices": rng.sample(CHOICES, 3), "label": rng.randrange(3)} for c in CONTEXTS]


def _loglikelihood(model, tok, context: str, continuation: str) -> float:
    """Sum of log p(continuation | context), split where the harness splits it: the context's own tokens."""
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    cont = whole[len(ctx):]
    ids = torch.tensor([whole], dtype=torch.long)
    with torch.no_grad():
        logp = F.log_softmax(model(ids).logits[0].double(), -1)
    return sum(logp[len(ctx) + i - 1, t].item() for i, t in enumerate(cont))


def test_local_task_accuracy_matches_direct_loglikelihoods(tmp_path, teacher_dir, corpus_file, monkeypatch):
    from sapling.cli import main

    docs = _docs()
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "choices.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tasks / "sapling_toy.yaml").write_text(
        "task: sapling_toy\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tasks / 'choices.jsonl'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\n'
        "doc_to_choice: choices\n"
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    run = tmp_path / "run"
    rc = main(["eval", f"model.path={teacher_dir}", f"data.files=[{corpus_file}]", "eval.max_tokens=200",
               "eval.gen_tokens=0", "eval.tasks=[sapling_toy]", f"eval.task_paths=[{tasks}]", "logger=none",
               f"hydra.run.dir={run}"])
    assert rc in (0, None)
    row = next(json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
               if json.loads(line).get("event") == "eval")
    acc = {h["metric"]: h for h in row["harness"] if h["task"] == "sapling_toy"}["acc,none"]

    model = AutoModelForCausalLM.from_pretrained(teacher_dir).float().eval()
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    hits = []
    for d in docs:  # the harness joins context and choice with its default delimiter, a space
        scores = [_loglikelihood(model, tok, d["context"], " " + c) for c in d["choices"]]
        hits.append(float(max(range(3), key=scores.__getitem__) == d["label"]))
    assert acc["value"] == pytest.approx(sum(hits) / len(hits), abs=1e-12)
    assert acc["stderr"] is not None and acc["stderr"] > 0
    assert "## lm-evaluation-harness" in (run / "report.md").read_text()
    from sapling.eval.harness import (
        _task_manager,  # the run indexed only the local task, not the built-in ones
    )

    assert set(_task_manager((str(tasks),), ("sapling_toy",)).all_tasks) == {"sapling_toy"}


def test_task_paths_are_checked_before_loading(tmp_path, teacher_dir, corpus_file, monkeypatch, capsys):
    from sapling.cli import main

    monkeypatch.chdir(tmp_path)
    for extra, needle in ((["eval.tasks=[x]", f"eval.task_paths=[{tmp_path / 'missing'}]"], "does not exist"),
                          ([f"eval.task_paths=[{tmp_path}]"], "eval.tasks is empty")):
        with pytest.raises(SystemExit) as exc:
            main(["eval", f"model.path={teacher_dir}", f"data.files=[{corpus_file}]", *extra, "logger=none",
                  f"hydra.run.dir={tmp_path / 'h'}"])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and "eval.task_paths" in err and needle in err
    assert not (tmp_path / "h" / "metrics.jsonl").exists()
