"""Sapling's distillation step vs TRL's and vs a naive HF loop, on the real SmolLM2-135M-Instruct teacher.

    python benchmarks/peers/distill.py [--shapes 256x4 1024x8] [--steps 8] [--rounds 1]
                                       [--peers-python .venv-peers/bin/python]
                                       [--out benchmarks/results/peers_distill_cpu.md]

Run with Sapling's virtualenv; the peers run in theirs (see benchmarks/peers/README.md). One student for all:
the teacher pruned once by `sapling prune` to 20 layers and MLP 576 (activation importance, 65.9M
parameters). For each shape (sequence length x micro-batch) the driver packs the standard-library corpus with
Sapling's own data code and writes the first `--steps` micro-batches of its training order to a tensor file;
then, one after another, each in a fresh process:

- sapling: `sapling distill` (the CLI, `experiment=smollm2` settings) on that corpus and shape: it draws the
  very same blocks in the same order;
- trl: `trl.experimental.gkd.GKDTrainer`, lmbda=0, beta=0 (forward KL), on the tensor file (trl_worker.py);
- naive: full-logit HF forward of both models + torch KL (trl_worker.py).

Same teacher, student, blocks, forward KL at T = 1 over every next-token position, no CE, AdamW (betas, eps,
weight decay on >= 2-D weights), warmup + cosine schedule and gradient clipping; fp32, no activation
checkpointing. Reported per shape: the median step time over steps 2..N (the first is a warm-up), tokens/s,
the memory the steps held (peak resident memory during training minus the resident memory when it began:
the child's RSS sampled every 50 ms), the process's own peak, and each step's loss: step 1 sees identical
weights and data in all three, so its losses must agree to float32 rounding; the later ones drift only by
rounding. `--rounds R` runs every system R times, interleaved, and reports the median of the rounds' medians
beside each round's (and Sapling's step over TRL's within each round), so the machine's drift between processes
minutes apart shows as a spread instead of hiding in one ratio. After each shape's runs, `--profile-repeats` steps of a phase profile (phases.py, in this process):
where a step's time goes, with Sapling's fused head and with the full-logit head of the naive loop and TRL.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer_common import (  # noqa: E402  (benchmarks/peers/ is not a package)
    REPO,
    header,
    peers_python,
    ratio,
    remeasured_note,
    rewrite_results,
    run_measured,
    tail,
    train_peak,
    versions,
    write_results,
)
from phases import PHASES, phase_times, render_phases  # noqa: E402

SYSTEMS = ("sapling", "trl", "naive")
LABELS = {"sapling": "Sapling `sapling distill`", "trl": "TRL `GKDTrainer` (lmbda=0, beta=0)",
          "naive": "naive HF loop (full logits + torch KL)"}
STUDENT_SHAPE = {"num_hidden_layers": 20, "intermediate_size": 576}
VOCAB = 49_152
OPTIM = {"lr": 3e-4, "warmup": 2, "min_lr_ratio": 0.1, "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.95,
         "grad_clip": 1.0}


def setup(args: argparse.Namespace):
    """The converted teacher and the corpus (real_model.py's), and the pruned student (made once)."""
    from demo_assets import compose_cfg
    from real_model import Setup

    from sapling.recipes.prune import run_prune

    s = Setup(argparse.Namespace(cache_dir=args.cache_dir, corpus_bytes=args.corpus_bytes, work=args.work,
                                 calibration_samples=32, val_tokens=4096))
    if args.student:
        return s, Path(args.student)
    student = s.work / "student"
    if not (student / "model" / "config.json").exists():
        print(f"pruning the teacher to {STUDENT_SHAPE} into {student} ...", flush=True)
        run_prune(compose_cfg(*s.overrides("prune", student), "trainer.overwrite=true", "prune.target.params=null",
                              *(f"prune.target.{k}={v}" for k, v in STUDENT_SHAPE.items()),
                              "prune.importance=activation"))
    return s, student / "model"


def sapling_overrides(s, student: Path, out: Path, seq: int, batch: int, steps: int) -> list[str]:
    o = OPTIM
    return ["experiment=smollm2", "logger=none", f"output_dir={out}", f"teacher.path={s.teacher_dir}",
            f"student.path={student}", "student.init=pretrained", "hooks.pre=[]", "hooks.post=[]",
            f"data.files=[{s.corpus}]", f"data.tokenizer={s.teacher_dir}", f"data.seq_len={seq}", "data.seed=0",
            "trainer.seed=0", f"trainer.micro_batch_size={batch}", "trainer.grad_accum=1",
            f"trainer.max_steps={steps}", "trainer.log_every=1", "trainer.eval_every=0",
            f"trainer.eval_tokens={2 * seq}", "trainer.save_every=0", "trainer.progress=false",
            "trainer.resume=false", f"trainer.lr={o['lr']}", f"trainer.warmup_steps={o['warmup']}",
            f"trainer.min_lr_ratio={o['min_lr_ratio']}", f"trainer.weight_decay={o['weight_decay']}",
            f"trainer.beta1={o['beta1']}", f"trainer.beta2={o['beta2']}", f"trainer.grad_clip={o['grad_clip']}",
            "trainer.activation_checkpointing=false", "distill.divergence=forward_kl", "distill.temperature=1.0",
            "distill.kd_weight=1.0", "distill.ce_weight=0.0"]


def training_blocks(s, overrides: list[str], steps: int, batch: int, path: Path) -> torch.Tensor:
    """The first `steps` micro-batches `sapling distill` with `overrides` trains on, in its order."""
    from demo_assets import compose_cfg

    from sapling.data.loader import ResumableLoader
    from sapling.models import load_tokenizer
    from sapling.recipes.common import load_data

    cfg = compose_cfg("command=distill", *overrides)
    data = load_data(cfg, load_tokenizer(str(s.teacher_dir)))
    loader = iter(ResumableLoader(data.train, batch, seed=cfg.trainer.seed))
    batches = [next(loader) for _ in range(steps)]
    if any((b["labels"] != b["input_ids"]).any() for b in batches):
        raise SystemExit("these blocks mask some labels: the peers would need the same mask")
    ids = torch.cat([b["input_ids"] for b in batches])
    torch.save(ids, path)
    return ids


def sapling_steps(out: Path) -> dict[str, Any]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    start = next(r["time"] for r in records if r.get("event") == "start")
    train = [r for r in records if r.get("event") == "train"]
    steps = [{"step": r["step"], "time": r["time"], "loss": r["loss"]} for r in train]
    peak = max((r.get("peak_mem_gib", 0.0) for r in train), default=0.0) * 2**30
    return {"start_time": start, "steps": steps, "cuda_peak": peak}


def summarize(record: dict[str, Any], measured: dict[str, Any], tokens_per_step: int, device: str) -> dict[str, Any]:
    """Step times, losses and memory of one system's run. CPU memory: the child's RSS when training began
    and its peak after; CUDA: the peak allocated by torch (models, optimizer state and activations)."""
    times = [record["start_time"]] + [s["time"] for s in record["steps"]]
    durations = [b - a for a, b in zip(times, times[1:])]
    med = statistics.median(durations[1:]) if len(durations) > 1 else durations[0]
    if device == "cuda":
        mem = {"train_peak": record.get("cuda_peak", 0), "peak_rss": None, "rss_at_start": None}
    else:
        mem = train_peak(measured["samples"], record["start_time"])
    return {"step_s": durations, "median_step_s": med, "tokens_per_s": tokens_per_step / med,
            "losses": [s["loss"] for s in record["steps"]], **mem, "hwm": measured["hwm"],
            "wall_s": measured["wall_s"]}


def combine_rounds(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One system's interleaved rounds as one result: the median of the rounds' median steps (and each round's,
    under "rounds"), the largest memory, the first round's losses (every round trains the same blocks)."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[0]
    out = dict(ok[0])
    out["median_step_s"] = statistics.median(r["median_step_s"] for r in ok)
    out["tokens_per_s"] = ok[0]["tokens_per_s"] * ok[0]["median_step_s"] / out["median_step_s"]
    out["rounds"] = [r.get("median_step_s") for r in runs]
    for key in ("train_peak", "hwm"):
        out[key] = max(r[key] for r in ok)
    out["wall_s"] = sum(r["wall_s"] for r in ok)
    return out


def run_shape(args, s, student: Path, py: Path, seq: int, batch: int) -> dict[str, Any]:
    """Each system in a fresh process, --rounds times, interleaved (the order reversed every other round, so each
    system's runs sit as close in time to the others' as possible)."""
    work = s.work / f"{seq}x{batch}"
    work.mkdir(parents=True, exist_ok=True)
    blocks = work / "blocks.pt"
    ids = None
    runs: dict[str, list[dict[str, Any]]] = {system: [] for system in args.systems}
    for rnd in range(args.rounds):
        for system in args.systems if rnd % 2 == 0 else list(reversed(args.systems)):
            stamp = time.strftime("%Y%m%d-%H%M%S")
            overrides = sapling_overrides(s, student, work / f"sapling-{stamp}", seq, batch, args.steps)
            if args.device == "cuda":  # bf16 weights with fp32 master copies (Sapling's GPU mode); SDPA like the peers
                overrides += ["trainer.device=cuda", "student.attn_implementation=sdpa",
                              "teacher.attn_implementation=sdpa"]
            if ids is None:
                ids = training_blocks(s, overrides, args.steps, batch, blocks)
            print(f"{seq}x{batch}: {system}" + (f" (round {rnd + 1}/{args.rounds})" if args.rounds > 1 else "")
                  + " ...", flush=True)
            runs[system].append(run_system(args, s, student, py, work, stamp, system, overrides, seq, batch))
    res: dict[str, Any] = {system: runs[system][0] if args.rounds == 1 else combine_rounds(runs[system])
                           for system in args.systems}
    if args.profile_repeats > 0 and args.device == "cpu":
        print(f"{seq}x{batch}: phase profile ...", flush=True)
        res["phases"] = phase_times(s.teacher_dir, student, ids[:batch], args.profile_repeats,
                                    trainer_cfg=trainer_config(s, student, work, seq, batch, args.steps))
    return res


def run_system(args, s, student: Path, py: Path, work: Path, stamp: str, system: str, overrides: list[str],
               seq: int, batch: int) -> dict[str, Any]:
    """One system's run in a fresh process: its step times, losses and memory, or the error."""
    blocks = work / "blocks.pt"
    sap_out = work / f"sapling-{stamp}"
    log = work / f"{system}-{stamp}.log"
    if system == "sapling":
        cmd = [str(Path(sys.executable).with_name("sapling")), "distill", *overrides]
    else:
        o = OPTIM
        cmd = [str(py), str(Path(__file__).with_name("trl_worker.py")), "--system", system,
               "--teacher", str(s.teacher_dir), "--student", str(student), "--blocks", str(blocks),
               "--batch", str(batch), "--steps", str(args.steps), "--lr", str(o["lr"]), "--warmup", str(o["warmup"]),
               "--min-lr-ratio", str(o["min_lr_ratio"]), "--weight-decay", str(o["weight_decay"]),
               "--beta1", str(o["beta1"]), "--beta2", str(o["beta2"]), "--grad-clip", str(o["grad_clip"]),
               "--device", args.device, "--out", str(work / f"{system}-{stamp}.json")]
    measured = run_measured(cmd, log)
    if measured["rc"] != 0:
        print(f"  failed (see {log}):\n{tail(log)}", flush=True)
        return {"error": f"exit {measured['rc']}: " + tail(log, 1)[:300], "log": str(log)}
    record = sapling_steps(sap_out) if system == "sapling" else json.loads(
        (work / f"{system}-{stamp}.json").read_text())
    r = summarize(record, measured, seq * batch, args.device)
    print(f"  median step {r['median_step_s']:.2f} s, {r['tokens_per_s']:.0f} tok/s, steps held "
          f"{r['train_peak'] / 2**30:.2f} GiB, losses {', '.join(f'{x:.4f}' for x in r['losses'])}", flush=True)
    return r


def trainer_config(s, student: Path, work: Path, seq: int, batch: int, steps: int):
    """The composed config of this shape's `sapling distill` run, for the profile's trainer step."""
    from demo_assets import compose_cfg

    return compose_cfg("command=distill", *sapling_overrides(s, student, work / "profile", seq, batch, steps))


def render(args, results: dict[str, dict[str, Any]], peer_versions: dict[str, str], student_params: int) -> str:
    cuda = args.device == "cuda"
    precision = ("bf16 autocast over fp32 weights (TRL, naive) / bf16 weights with fp32 master copies (Sapling), "
                 "SDPA attention" if cuda else "fp32, no autocast")
    memory = ("memory: `torch.cuda.max_memory_allocated` over the run (models, optimizer state, activations); "
              "Sapling's from its train records" if cuda else
              "memory held by the steps: peak RSS while training minus RSS when training began (models loaded), "
              "the child process sampled every 50 ms; process peak: its VmHWM")
    lines = [header(f"Distillation step: Sapling vs TRL vs a naive HF loop ({'GPU' if cuda else 'CPU'})", sys.argv,
                    peer_versions, [
        f"- teacher SmolLM2-135M-Instruct (134,515,008 parameters, V=49,152), student: it pruned by `sapling prune` "
        f"to {args.student or STUDENT_SHAPE} ({student_params:,} parameters); {args.steps} steps per system and "
        "shape, the same blocks in the same order; forward KL, T = 1, no CE; AdamW lr "
        f"{OPTIM['lr']}, betas ({OPTIM['beta1']}, {OPTIM['beta2']}), weight decay {OPTIM['weight_decay']} on "
        f">= 2-D weights, {OPTIM['warmup']} warmup steps then cosine to {OPTIM['min_lr_ratio']}x, clip "
        f"{OPTIM['grad_clip']}; no activation checkpointing; {precision}.",
        f"- step time: median of steps 2..N (each step's wall time from the systems' own per-step records); {memory}.",
        ""], device=args.device)]
    held = "peak GPU memory (GiB)" if cuda else "steps held (GiB)"
    cols = ["shape (L x B)", "system", "median step (s)", "tokens/s", "step time vs TRL", held,
            "vs TRL", "process peak RSS (GiB)", "loss step 1", f"loss step {args.steps}", "max abs loss diff vs TRL"]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    goals = []
    for shape, res in results.items():
        trl = res.get("trl", {})
        for system in args.systems:
            r = res.get(system, {})
            if "error" in r:
                lines.append(f"| {shape} | {LABELS[system]} | failed: {r['error']} |" + " |" * (len(cols) - 3))
                continue
            diff = max((abs(a - b) for a, b in zip(r["losses"], trl.get("losses", []))), default=None)
            lines.append("| " + " | ".join([
                shape, LABELS[system], f"{r['median_step_s']:.2f}", f"{r['tokens_per_s']:.0f}",
                ratio(r["median_step_s"], trl.get("median_step_s")), f"{r['train_peak'] / 2**30:.2f}",
                ratio(r["train_peak"], trl.get("train_peak")), f"{r['hwm'] / 2**30:.2f}", f"{r['losses'][0]:.4f}",
                f"{r['losses'][-1]:.4f}", "-" if diff is None or system == "trl" else f"{diff:.2e}"]) + " |")
        sap = res.get("sapling", {})
        if "median_step_s" in sap and "median_step_s" in trl:
            t = sap["median_step_s"] / trl["median_step_s"]
            m = sap["train_peak"] / trl["train_peak"] if trl["train_peak"] else float("nan")
            goals.append(f"- {shape}: Sapling's step time {t:.2f}x TRL's (goal <= 0.70x: "
                         f"{'met' if t <= 0.7 else 'missed'}), {held.split(' (')[0]} {m:.2f}x TRL's"
                         + (f" (goal at >= 8k tokens: <= 0.50x: {'met' if m <= 0.5 else 'missed'})"
                            if _tokens(shape) >= 8192 else ""))
            if sap.get("rounds") and trl.get("rounds"):
                goals.append("  - " + rounds_note(sap["rounds"], trl["rounds"]))
            if t > 0.7 and "phases" in res:
                goals.append(_why_slow(sap["median_step_s"], trl["median_step_s"], res.get("naive", {}), res["phases"]))
    lines += ["", "## Goals", "", *goals, "", *rounds_lines(args, results)]
    if any("phases" in res for res in results.values()):
        lines += ["## Where the step time goes", "",
                  "One process (Sapling's virtualenv), the same teacher, student and first micro-batch; each step split "
                  "into phases (benchmarks/peers/phases.py), once with Sapling's fused head and once with the "
                  "full-logit head of the naive loop and TRL's GKD loss.", ""]
        for shape, res in results.items():
            if "phases" in res:
                lines += render_phases(shape, res["phases"], VOCAB)
    lines += ["## Loss per step", ""]
    for shape, res in results.items():
        ok = [s for s in args.systems if "losses" in res.get(s, {})]
        lines += [f"{shape}:", "", "| step | " + " | ".join(ok) + " |", "|---|" + "---|" * len(ok)]
        for i in range(args.steps):
            lines.append(f"| {i + 1} | " + " | ".join(
                f"{res[s]['losses'][i]:.6f}" if i < len(res[s]["losses"]) else "-" for s in ok) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def rounds_note(sap: list[float | None], trl: list[float | None]) -> str:
    """Sapling's step over TRL's within each interleaved round (runs minutes apart, so machine drift mostly cancels)."""
    per = [a / b for a, b in zip(sap, trl) if a and b]
    return (f"within each round Sapling's step is {', '.join(f'{x:.2f}x' for x in per)} TRL's (median "
            f"{statistics.median(per):.2f}x)" if per else "no round has both systems")


def rounds_lines(args, results: dict[str, dict[str, Any]]) -> list[str]:
    """The median step of every system in every interleaved round (results measured with --rounds > 1)."""
    n = max((len(r.get("rounds", [])) for res in results.values() for r in res.values() if isinstance(r, dict)),
            default=0)
    if n < 2:
        return []
    lines = ["## Interleaved rounds", "",
             f"Each system ran {n} times, in the order {', '.join(args.systems)} and reversed every other "
             "round; each cell is that run's median step (s), the table's is the median of the rounds'.", "",
             "| shape | system | " + " | ".join(f"round {i + 1}" for i in range(n)) + " | median |",
             "|---|---|" + "---|" * (n + 1)]
    for shape, res in results.items():
        for system in args.systems:
            r = res.get(system, {})
            if "rounds" in r:
                lines.append(f"| {shape} | {LABELS[system]} | "
                             + " | ".join("failed" if x is None else f"{x:.2f}" for x in r["rounds"])
                             + f" | {r['median_step_s']:.2f} |")
    return lines + [""]


def _why_slow(sap: float, trl: float, naive: dict[str, Any], phases: dict[str, Any]) -> str:
    """Why the step-time goal is out of reach at a shape: the profile's floor for a fused step against 0.7x TRL."""
    times, flops = phases["fused"]["phases"], phases["fused"]["flops"]
    head = PHASES[2]
    rate = flops[PHASES[0]] / times[PHASES[0]]  # the teacher forward's matmul rate: this machine's, for this model
    rest = sum(v for k, v in times.items() if k != head)
    floor = rest + flops[head] / rate
    vs_naive = f"; TRL's step is {trl / naive['median_step_s']:.2f}x the naive loop's" if "median_step_s" in naive else ""
    return (f"  - missed by {sap / (0.7 * trl) - 1:.0%}: 0.70x is {0.7 * trl:.2f} s a step. The profile's floor for a "
            f"fused step is {floor:.2f} s ({floor / trl:.2f}x TRL's median): the model's own phases ({rest:.2f} s, the "
            f"code TRL runs too) plus the head's four matmuls at the teacher forward's {rate / 1e9:.0f} GFLOP/s "
            f"({flops[head] / rate:.2f} s; the fused head measured {times[head]:.2f} s)" + (
                f". At this shape the head is about a third of the step, so no head reaches the goal{vs_naive}."
                if floor > 0.7 * trl else
                f"{vs_naive}. The floor is under the goal here: the measured step is {sap - rest - times[head]:.2f} s "
                f"above the profile's fused step ({rest + times[head]:.2f} s), the trainer's work beyond the five "
                "phases (data, clipping, logging) and drift of this machine's speed between the processes' minutes"
                + trainer_note(sap, phases) + "."))


def trainer_note(sap: float, phases: dict[str, Any]) -> str:
    """The profile's measurement of Sapling's own step, splitting the measured step's excess into the trainer's cost
    and the drift between processes."""
    if "trainer" not in phases:
        return ""
    own, fused = sum(phases["trainer"]["phases"].values()), sum(phases["fused"]["phases"].values())
    return (f"; in the profile's process Sapling's own step took {own:.2f} s, {own - fused:+.2f} s beside the fused "
            f"phases (the trainer's own cost), leaving {sap - own:+.2f} s to drift between the processes")


PROFILE_NOTE = "- phase profile measured again"


def rerender(args, s, student: Path, peer_versions: dict[str, str], student_params: int) -> int:
    """--profile-only / --render-only: the systems' results in --out's .json and the file's header (their command,
    date, commit and versions) stand; the profile is measured again (--profile-only), the rest rendered again."""
    out = Path(args.out)
    record = json.loads(out.with_suffix(".json").read_text())
    saved = record["results"]
    for shape, res in saved.items() if args.profile_only else ():
        if shape not in args.shapes:  # --shapes picks which saved shapes are profiled again
            continue
        seq, batch = (int(x) for x in shape.split("x"))
        print(f"{shape}: phase profile ...", flush=True)
        ids = torch.load(s.work / shape / "blocks.pt")[:batch]
        res["phases"] = phase_times(s.teacher_dir, student, ids, max(1, args.profile_repeats),
                                    trainer_cfg=trainer_config(s, student, s.work / shape, seq, batch, args.steps))
    rewrite_results(out, "| shape (L x B)", render(args, saved, peer_versions, student_params), peer_versions, saved,
                    record["argv"], remeasured_note(PROFILE_NOTE) if args.profile_only else None)
    print(out.read_text())
    return 0


def _tokens(shape: str) -> int:
    seq, batch = (int(x) for x in shape.split("x"))
    return seq * batch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=["256x4", "1024x8"], help="sequence length x micro-batch")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--rounds", type=int, default=1,
                   help="run every system this many times, interleaved; the step time is the median of the rounds'")
    p.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    p.add_argument("--peers-python", default=None, help="the peers' interpreter (default .venv-peers/bin/python)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--profile-repeats", type=int, default=2,
                   help="timed steps per head in the phase profile after each shape's runs (CPU; 0: no profile)")
    p.add_argument("--profile-only", action="store_true",
                   help="keep the systems' results in --out's .json and measure only the phase profile again")
    p.add_argument("--render-only", action="store_true", help="rewrite --out from its .json, measuring nothing")
    p.add_argument("--student", default=None, help="a pruned student checkpoint to use instead of pruning one")
    p.add_argument("--corpus-bytes", type=int, default=1_500_000)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--work", default="/tmp/sapling-peers/distill")
    p.add_argument("--out", default=None, help="default benchmarks/results/peers_distill_<device>.md")
    args = p.parse_args(argv)
    args.out = args.out or str(REPO / "benchmarks" / "results" / f"peers_distill_{args.device}.md")
    if args.steps < 2:
        p.error("--steps must be >= 2 (the first step is a warm-up)")
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    py = peers_python(args.peers_python)
    peer_versions = versions(py)
    s, student = setup(args)
    from real_model import count_shape
    from transformers import AutoConfig

    student_params = count_shape(s.teacher_dir, {k: getattr(AutoConfig.from_pretrained(student), k)
                                                 for k in ("num_hidden_layers", "hidden_size", "intermediate_size")})
    if args.profile_only or args.render_only:
        return rerender(args, s, student, peer_versions, student_params)
    results = {}
    for shape in args.shapes:
        seq, batch = (int(x) for x in shape.split("x"))
        results[shape] = run_shape(args, s, student, py, seq, batch)
        text = render(args, results, peer_versions, student_params)
        write_results(args.out, text, peer_versions, results)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
