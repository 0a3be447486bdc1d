"""`sapling <command> [hydra overrides]` (also `python -m sapling <command> ...`).

Every command is a Hydra app on the one `conf/` tree: the command name becomes the `command` key,
the rest of the arguments are Hydra's (overrides, `-m` for sweeps, `--cfg job` to print the config).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from importlib.resources import files

import hydra
from omegaconf import DictConfig

from sapling import faults
from sapling.config import COMMANDS, check_override_keys, register_configs, validate
from sapling.errors import EXIT_ABORTED, EXIT_STOPPED, ConfigError, SaplingError, Stopped

USAGE = f"""usage: sapling <command> [key=value ...] [hydra options]

commands:
  pipeline   the whole recipe end to end (default experiment: demo, CPU, minutes)
  train      train model.path (or model.tiny) with cross-entropy: from scratch or fine-tuning
  distill    distil teacher.path into a student (student.path, student.config overrides, or hooks.pre=[prune])
  prune      prune teacher.path to prune.target.<hf_field>=N (Minitron-style importance); writes model/
  quantize   quantize model.path (GPTQ/RTN, int4 g128 or int8; quant.guided with teacher.path) into a
             compressed-tensors checkpoint (output_dir/model) that vLLM/SGLang/transformers load
  eval       perplexity of model.path (and teacher.path) on data.files; writes report.md
  export     checkpoint=<dir> [output=<dir>]: an HF model from a training checkpoint (DeepSpeed ZeRO or not)
  convert    input=<file.gguf> output=<dir>: a llama.cpp GGUF model as an HF checkpoint (every command also
             reads .gguf paths directly, converted once into cache_dir/gguf)
  cache-teacher  one teacher pass writing its top-k distributions to cache.dir (distill teacher.cache=<dir>)
  sweep-report   <multirun dir> [output=<dir>]: a table (markdown + CSV) of a sweep's jobs and a PNG of their
                 validation curves

examples:
  sapling pipeline experiment=demo
  sapling distill teacher.path=T student.config.num_hidden_layers=8 data.files=[a.jsonl] trainer.max_steps=1000
  sapling prune teacher.path=T prune.target.intermediate_size=1024 prune.target.num_hidden_layers=6 data.files=[a.txt]
  sapling eval model.path=outputs/distill/.../model data.files=[held_out.txt]
  sapling quantize model.path=outputs/distill/.../model data.files=[a.jsonl] quant.scheme=w4a16
  sapling distill teacher.path=T student.path=S data.files=[a.jsonl] hooks.post=[quantize] quant.guided=true
  torchrun --nproc-per-node 8 -m sapling distill deepspeed=zero3 teacher.path=T student.path=S data.files=[a.jsonl]
  sapling export checkpoint=outputs/distill/.../checkpoints output=student_step1000
  sapling convert input=SmolLM2-135M-Instruct.Q4_1.gguf output=smollm2-135m
  sapling cache-teacher teacher.path=T data.files=[a.jsonl] cache.top_k=64 cache.dir=cache/T-k64
  sapling distill teacher.cache=cache/T-k64 student.config.num_hidden_layers=8 trainer.max_steps=1000
  sapling distill -m distill.temperature=1,2 hydra/launcher=submitit_local ...   # a sweep, one job each
  sapling sweep-report multirun/distill/2026-01-01_12-00-00
  sbatch --nodes=2 --gpus-per-node=8 launchers/slurm.sbatch distill deepspeed=zero3 ...
  sapling distill --cfg job          # print the composed config
  sapling distill --help             # what a command does, its main keys and their defaults, examples
(valid commands: {", ".join((*COMMANDS, "export", "convert", "sweep-report"))})"""

log = logging.getLogger("sapling")


def _dispatch(cfg: DictConfig) -> None:
    """Hydra's task function (in this process, or in a sweep launcher's job): one command, with the test-only
    fault seams its SAPLING_FAULT_* variables ask for (`sapling.faults`) installed for this run alone."""
    from sapling.models.gguf import conversion_cache

    with faults.from_env(), conversion_cache(cfg.cache_dir):  # GGUF sources convert into cache_dir/gguf
        _run_command(cfg)


def _run_command(cfg: DictConfig) -> None:
    result, stopped_in = None, None
    try:
        validate(cfg)
        if cfg.command == "pipeline":
            from sapling.recipes.pipeline import run_pipeline

            run_pipeline(cfg)
        elif cfg.command == "train":
            from sapling.recipes.train import run_train

            result = run_train(cfg)
        elif cfg.command == "distill":
            from sapling.recipes.distill import run_distill

            result = run_distill(cfg)
        elif cfg.command == "prune":
            from sapling.recipes.prune import run_prune

            run_prune(cfg)
        elif cfg.command == "quantize":
            from sapling.recipes.quantize import run_quantize

            run_quantize(cfg)
        elif cfg.command == "eval":
            from sapling.recipes.eval import run_eval

            run_eval(cfg)
        elif cfg.command == "cache-teacher":
            from sapling.recipes.cache_teacher import run_cache_teacher

            run_cache_teacher(cfg)
        if getattr(result, "stopped", False):
            _mark_stopped(cfg, result.steps)  # while the process group still holds every rank (see there)
    except Stopped as stop:  # a pipeline stage or a pre-hook's training, stopped by a signal after a checkpoint
        result, stopped_in = stop.result, stop.where
        _mark_stopped(cfg, result.steps)
    except SaplingError as err:
        # The user's inputs (config, data, checkpoint, model source, output dir, launch): one line, no
        # traceback, unless SAPLING_DEBUG=1 asks for it. Any other exception is a bug and keeps its traceback.
        if os.environ.get("SAPLING_DEBUG"):
            raise
        print(f"sapling: {user_error_line(err)}", file=sys.stderr)
        sys.exit(err.exit_code)
    finally:
        from sapling.dist import shutdown_distributed

        shutdown_distributed()
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if result is not None and world > 1 and not getattr(result, "already_finished", False):
        # One line per rank (each node's log shows its own): the all-reduced loss must agree everywhere.
        val = getattr(result, "final_val", {}).get("loss", float("nan"))
        # One write() per line: ranks sharing a terminal or pipe must not interleave inside a line.
        sys.stderr.write(f"sapling {cfg.command}: rank {rank}/{world} on {socket.gethostname()}: step "
                         f"{result.steps}, train loss {result.final_loss!r}, val loss {val!r}\n")
        sys.stderr.flush()
    if getattr(result, "stopped", False):
        if rank == 0:
            if stopped_in is None:
                where = f"after step {result.steps}; checkpoint saved in {cfg.output_dir}/checkpoints"
            else:
                where = f"in {stopped_in} (step {result.steps}); outputs and checkpoints kept in {cfg.output_dir}"
            print(f"sapling {cfg.command}: stopped by a signal {where}; rerun the same command to resume "
                  f"(exit {EXIT_STOPPED}: stopped, resumable)", file=sys.stderr)
        if _hand_back_signal(result.signal):
            return  # the launcher's own handler (submitit's) requeued the job and decides how it ends
        if rank == 0:  # rank 0 alone carries the code: torchrun stops the other ranks when one exits non-zero
            sys.exit(EXIT_STOPPED)
        return
    if rank == 0:
        print(f"sapling {cfg.command}: outputs in {cfg.output_dir}", file=sys.stderr)


STOP_FILE_ENV = "SAPLING_STOP_FILE"


def user_error_line(err: SaplingError) -> str:
    """`config error: ...` or `error: ...`, on one line whatever the message holds."""
    kind = "config error" if isinstance(err, ConfigError) else "error"
    text = " ".join(str(err).split())
    return f"{kind}: {text}" + ("" if isinstance(err, ConfigError) else " (set SAPLING_DEBUG=1 for the traceback)")


def _hand_back_signal(signum: int | None) -> bool:
    """Re-raise the stop signal for the handler the launcher installed before training, now restored.

    submitit (`hydra/launcher=submitit_slurm`) handles USR2 by requeueing the job: the trainer took the
    signal first to save a checkpoint at a step boundary, and passes it on once that is safe (on rank 0
    submitit's handler requeues and exits itself; on the other ranks it returns). Default and ignored
    dispositions, and Python's own Ctrl-C handler, are left alone: False, the run exits EXIT_STOPPED.
    """
    if signum is None:
        return False
    import signal

    handler = signal.getsignal(signum)
    if callable(handler) and handler is not signal.default_int_handler:
        signal.raise_signal(signum)
        return True
    return False


def _mark_stopped(cfg: DictConfig, steps: int) -> None:
    """Tell the launcher the run stopped early on a signal (checkpointed, unfinished) so it can requeue.

    `launchers/slurm.sbatch` points SAPLING_STOP_FILE at a path on the shared file system and runs
    `scontrol requeue` when the file exists after the step ends. Every rank calls this: rank 0 writes the
    file, then a barrier, so every rank is past its last collective before rank 0 exits EXIT_STOPPED (which
    makes torchrun stop the others).
    """
    from sapling.dist import barrier, rank_world

    path = os.environ.get(STOP_FILE_ENV)
    if path and rank_world()[0] == 0:
        _write_stop_file(cfg, steps, path)
    barrier()


def _write_stop_file(cfg: DictConfig, steps: int, path: str) -> None:
    import json

    from sapling.io import write_text_atomically

    write_text_atomically(path, json.dumps({"command": cfg.command, "steps": steps,
                                            "output_dir": str(cfg.output_dir)}) + "\n")


def _no_hydra(command: str, args: list[str]) -> int:
    """`sapling export checkpoint=<dir> [output=<dir>]` and `sapling convert input=<gguf> output=<dir>`: a few
    paths, no config tree, no Hydra."""
    if command == "export":
        from sapling.recipes.export import run_export as run
    else:
        from sapling.recipes.convert import run_convert as run
    try:
        out = run(args)
    except SaplingError as err:
        if os.environ.get("SAPLING_DEBUG"):
            raise
        print(f"sapling: {user_error_line(err)}", file=sys.stderr)
        return err.exit_code
    print(f"sapling {command}: model in {out}", file=sys.stderr)
    return 0


def _sweep_report(args: list[str]) -> int:
    """`sapling sweep-report <multirun dir> [output=<dir>]` (no Hydra: it reads what a sweep wrote)."""
    dirs = [a for a in args if "=" not in a]
    keys = dict(a.split("=", 1) for a in args if "=" in a)
    if len(dirs) != 1 or set(keys) - {"output"}:
        print("sapling: usage: sapling sweep-report <multirun dir> [output=<dir>]", file=sys.stderr)
        return 2
    from sapling.eval.sweep import sweep_report

    try:
        paths = sweep_report(dirs[0], keys.get("output"))
    except SaplingError as err:
        if os.environ.get("SAPLING_DEBUG"):
            raise
        print(f"sapling: {user_error_line(err)}", file=sys.stderr)
        return err.exit_code
    print(paths["markdown"].read_text())
    print(f"sapling sweep-report: {paths['markdown']}, {paths['csv'].name}, {paths['png'].name}", file=sys.stderr)
    return 0


# Hydra's options that take a value (`--info` takes an optional one, from a fixed set).
_VALUE_FLAGS = {"-c", "--cfg", "-p", "--package", "-cp", "--config-path", "-cn", "--config-name", "-cd",
                "--config-dir", "--experimental-rerun"}
_INFO_CHOICES = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}


def _hydra_argv(command: str, args: list[str]) -> list[str]:
    """Hydra's options first, then `command=<command>` and the overrides.

    Hydra 1.3 parses overrides as one positional list, so `sapling distill -m a=1,2 b=3` must reach it as
    `-m command=distill a=1,2 b=3`: options written among the overrides would otherwise be rejected.
    """
    flags, overrides = [], []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("-"):  # overrides never do: key=value, +key, ++key, ~key
            flags.append(arg)
            takes_value = arg in _VALUE_FLAGS or (arg in ("-i", "--info") and i + 1 < len(args)
                                                   and args[i + 1] in _INFO_CHOICES)
            if takes_value and i + 1 < len(args):
                flags.append(args[i + 1])
                i += 1
        else:
            overrides.append(arg)
        i += 1
    return [*flags, f"command={command}", *overrides]


# The demo experiment's teacher.config fields (conf/experiment/demo.yaml).
DEMO_TEACHER_SHAPE = tuple(f"config.{k}" for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                   "num_attention_heads", "num_key_value_heads",
                                                   "max_position_embeddings"))


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    from sapling.help import HELP, command_help

    if args[:1] == ["help"] and len(args) > 1 and args[1] in HELP:  # `sapling help distill`
        args = [args[1], "--help"]
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    command, rest = args[0], args[1:]
    if command in HELP and ("-h" in rest or "--help" in rest):  # per-command help, not Hydra's generic one
        print(command_help(command))
        return
    if command in HELP:
        from sapling.noise import choose_deepspeed_accelerator

        choose_deepspeed_accelerator()  # before anything imports deepspeed
    if command in ("export", "convert"):
        sys.exit(_no_hydra(command, rest))
    if command == "sweep-report":
        sys.exit(_sweep_report(rest))
    if command not in COMMANDS:
        print(f"sapling: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        sys.exit(2)
    register_configs()
    config_dir = str(files("sapling.conf"))
    try:  # a misspelled key: our one line, before Hydra's multi-line advice to add it with `+`
        groups = [p.name for p in files("sapling.conf").iterdir() if p.is_dir() and not p.name.startswith("_")]
        check_override_keys([a for a in rest if not a.startswith("-")], groups)
    except ConfigError as err:
        print(f"sapling: {user_error_line(err)}", file=sys.stderr)
        sys.exit(err.exit_code)
    if command == "pipeline" and not any(a.startswith(("experiment=", "+experiment=")) for a in rest):
        # the embedded default; a teacher.path of the user's own drops the demo teacher's toy shape (it would
        # override the checkpoint's), while a teacher.config.* the user gives still applies
        own = [f"teacher.{k}=null" for k in ("tiny", *DEMO_TEACHER_SHAPE)] \
            if any(a.startswith("teacher.path=") for a in rest) else []
        rest = ["experiment=demo", *own, *rest]
    sys.argv = [f"sapling-{command}", *_hydra_argv(command, rest)]
    try:
        hydra.main(version_base=None, config_path=config_dir, config_name="config")(_dispatch)()
    except KeyboardInterrupt:  # a second Ctrl-C in training, or the first one outside it: nothing saved now
        lead = "\n" if sys.stderr.isatty() else ""  # off the terminal's ^C
        print(f"{lead}sapling {command}: aborted by Ctrl-C (exit {EXIT_ABORTED}); checkpoints written before are "
              "kept: rerun the same command to resume from the last one", file=sys.stderr)
        sys.exit(EXIT_ABORTED)


if __name__ == "__main__":
    main()
