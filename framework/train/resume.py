"""What a training command does with the output_dir it is given: start, resume, stop as finished, or refuse.

Decided before any model loads, from the run record (`.sapling-run.json`, see `sapling.io`) and the
checkpoints folder:

- a new or empty directory: start;
- an earlier unfinished run of the same command with a checkpoint: resume it (`trainer.resume=true`);
- a run that finished at `trainer.max_steps`: nothing to do (say so, exit 0); with a larger
  `trainer.max_steps`, continue from its final checkpoint; with a smaller one, refuse;
- `trainer.resume=false` over an earlier run: refuse, unless `trainer.overwrite=true`, which moves the
  earlier run's files aside into `replaced-<time>/` and starts over.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sapling.errors import OutputError
from sapling.io import move_aside, read_run, user_entries, write_run
from sapling.train.checkpoint import TAG_PREFIX, latest_tag

log = logging.getLogger("sapling")


@dataclass(frozen=True)
class ResumePlan:
    action: str  # "start" | "resume" | "finished"
    step: int = 0  # the checkpoint's step ("resume") or the finished run's ("finished")
    moved_to: str | None = None  # trainer.overwrite=true: where the earlier run went


def _step(tag: Path | None) -> int | None:
    return None if tag is None else int(tag.name[len(TAG_PREFIX):])


def plan_resume(out: str | Path, trainer: Any, command: str) -> ResumePlan:
    """The plan for a `command` run of `trainer.max_steps` steps in `out` (which `sapling.io.claim_output`
    already accepted for `command`). Raises OutputError (one line) where going on would lose work."""
    out = Path(out)
    run = read_run(out) or {}
    ckpt = latest_tag(out / "checkpoints")
    tag_step = _step(ckpt)
    finished = run.get("finished_step")
    earlier = tag_step is not None or finished is not None or bool(
        {"metrics.jsonl", "model", "checkpoints"} & set(user_entries(out)))
    if not earlier:
        return ResumePlan("start")
    where = f"output_dir={out}"
    if trainer.overwrite:
        moved = move_aside(out)
        write_run(out, finished_step=None)
        log.warning("trainer.overwrite=true: the earlier %s run in %s was moved to %s", command, out, moved)
        return ResumePlan("start", moved_to=str(moved) if moved else None)
    fixes = "trainer.overwrite=true (moves it aside into replaced-<time>/ and starts over), or a new output_dir"
    if not trainer.resume:
        state = f"finished at step {finished}" if finished is not None else (
            f"checkpointed at step {tag_step}" if tag_step is not None else "with no checkpoint")
        raise OutputError(f"{where}: holds an earlier `sapling {command}` run ({state}) and trainer.resume=false "
                          f"would start over in it; fix: trainer.resume=true to continue it, {fixes}")
    max_steps = int(trainer.max_steps)
    if finished is not None:
        if max_steps == finished:
            return ResumePlan("finished", step=finished)
        if max_steps < finished:
            raise OutputError(f"{where}: the run there finished at step {finished}, more than trainer.max_steps="
                              f"{max_steps}; fix: trainer.max_steps={finished} (nothing to do), {fixes}")
        if tag_step != finished:
            raise OutputError(f"{where}: the run there finished at step {finished} without a checkpoint of its "
                              f"final state (trainer.save_every=0), so it cannot train on to {max_steps}; fix: "
                              f"distil from its model in a new output_dir (student.path={out / 'model'}), or {fixes}")
        return ResumePlan("resume", step=finished)
    if tag_step is None:
        raise OutputError(f"{where}: holds an earlier `sapling {command}` run that stopped before its first "
                          f"checkpoint (nothing to resume); fix: {fixes}")
    if tag_step > max_steps:
        raise OutputError(f"{where}: its latest checkpoint is at step {tag_step}, past trainer.max_steps={max_steps}; "
                          f"fix: trainer.max_steps={tag_step} or more, or {fixes}")
    return ResumePlan("resume", step=tag_step)


def mark_started(out: str | Path, plan: ResumePlan) -> None:
    """Rank 0, once training is about to run: the run is no longer finished (it may be trained on)."""
    write_run(out, finished_step=None, resumed_from=plan.step if plan.action == "resume" else None)


def mark_finished(out: str | Path, step: int) -> None:
    """Rank 0, after the final model and the post-hooks: a rerun at the same max_steps has nothing to do."""
    write_run(out, finished_step=int(step), finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
