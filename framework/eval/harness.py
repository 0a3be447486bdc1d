"""lm-evaluation-harness on Sapling checkpoints (`sapling eval ... eval.tasks=[arc_easy,hellaswag]`).

The harness is an optional extra (`pip install 'sapling[eval]'`); its tasks read their data sets from the
Hugging Face hub or the local datasets cache, so offline machines need them cached beforehand. The model
is handed to the harness as the object `sapling eval` already loaded (a plain HF checkpoint, or a
compressed-tensors export dequantized), with its tokenizer.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import Any

from sapling.errors import ConfigError


def check_harness(tasks: list[str], task_paths: list[str] = ()) -> None:
    """Fail before any model is loaded: tasks asked for without the harness, a missing task path, or task
    paths without tasks."""
    if task_paths and not tasks:
        raise ConfigError("eval.task_paths", list(task_paths), "given, but eval.tasks is empty",
                          "name the tasks to run: eval.tasks=[<task>,...]")
    for path in task_paths:
        if not Path(path).expanduser().exists():
            raise ConfigError("eval.task_paths", path, "does not exist",
                              "give a directory or YAML file of lm-evaluation-harness task definitions")
    if tasks and importlib.util.find_spec("lm_eval") is None:
        raise ConfigError("eval.tasks", list(tasks), "lm-evaluation-harness is not installed",
                          "pip install 'sapling[eval]' (or drop eval.tasks)")


@functools.lru_cache(maxsize=4)
def _task_manager(include: tuple[str, ...], tasks: tuple[str, ...] = ()) -> Any:
    """The harness's task index: built once per process, as `sapling eval` runs the model and then the teacher.

    When every task asked for is a plain task defined under `include`, only `include` is indexed (indexing the
    harness's thousands of built-in YAMLs takes ~20 s); otherwise the built-in tasks are indexed too.
    """
    from lm_eval.tasks import TaskManager

    if include and tasks:
        local = TaskManager(include_path=list(include), include_defaults=False)
        if set(tasks) <= set(local.all_subtasks):
            return local
    return TaskManager(include_path=list(include) or None)


def run_harness(model: Any, tokenizer: Any, tasks: list[str], *, task_paths: list[str] = (),
                num_fewshot: int | None = None, limit: float | None = None, batch_size: int = 8,
                device: Any = "cpu") -> list[dict[str, Any]]:
    """Evaluate `model` on `tasks` (the harness's own, or defined under `task_paths`); one row per
    (task, metric): {"task", "metric", "value", "stderr"}."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    include = tuple(str(Path(p).expanduser()) for p in task_paths)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device))
    out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                  task_manager=_task_manager(include, tuple(tasks)))
    rows = []
    for task, metrics in sorted(out["results"].items()):
        for key, value in metrics.items():
            name, _, _filter = key.partition(",")
            skip = name in ("alias", "sample_len") or name.endswith("_stderr")  # labels and bookkeeping
            if skip or not isinstance(value, (int, float)):
                continue
            stderr = metrics.get(f"{name}_stderr,{_filter}" if _filter else f"{name}_stderr")
            rows.append({"task": task, "metric": key, "value": float(value),
                         "stderr": float(stderr) if isinstance(stderr, (int, float)) else None})
    return rows
