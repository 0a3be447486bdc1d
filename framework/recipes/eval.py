"""`sapling eval`: perplexity, agreement with the teacher, speed and size; writes report.md."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import torch
from omegaconf import DictConfig

from sapling.errors import ConfigError, DataError
from sapling.eval.report import write_report
from sapling.models import build_model, check_same_tokenizer, count_parameters, load_tokenizer, source_config
from sapling.models.shapes import check_vocab
from sapling.recipes.common import load_data, prepare_output, select_device, tokenizer_path
from sapling.train.metrics import MetricsLogger

log = logging.getLogger("sapling")


def run_eval(cfg: DictConfig) -> dict[str, Any]:
    """`sapling eval model.path=M [teacher.path=T]`: sliding-window perplexity of M (and T) on all of
    `data.files`, agreement of M with T, generation speed, size and peak memory; writes report.md.

    M may be any HF checkpoint dir or a compressed-tensors export (`sapling quantize`), which is loaded
    with its weights dequantized: the numbers are those of the quantized weights.
    """
    from sapling.eval.evaluate import (
        disk_bytes,
        generation_speed,
        is_quantized_checkpoint,
        peak_memory_gib,
        prompt_batch,
        sliding_window_eval,
        token_stream,
    )
    from sapling.eval.harness import check_harness, run_harness
    from sapling.quant.apply import load_quantized

    e = cfg.eval
    check_harness(list(e.tasks), list(e.task_paths))
    model_cfg = source_config(cfg.model)
    tokenizer = load_tokenizer(tokenizer_path(cfg, "model"))
    device = select_device(cfg)
    window = int(e.window or cfg.data.seq_len)
    stride = int(e.stride or max(1, window // 2))
    limit = getattr(model_cfg, "max_position_embeddings", None)
    if limit is not None and window > limit:
        raise ConfigError("eval.window", window, f"longer than the model's max_position_embeddings ({limit})",
                          f"set eval.window={limit} or less")
    out = prepare_output(cfg)
    stream = token_stream(load_data(cfg, tokenizer, val_fraction=0.0).train, e.max_tokens)
    if stream.numel() < 2:
        raise DataError(f"data.files hold {stream.numel()} token(s) after packing: nothing to evaluate; fix: pass "
                        "data.files with some text in them")
    prompts = prompt_batch(stream, e.gen_batch, e.gen_prompt_len)

    def load(key: str, mcfg: Any) -> torch.nn.Module:
        src = cfg[key]
        if is_quantized_checkpoint(src.path):
            return load_quantized(os.path.expanduser(src.path), device)
        return build_model(src, mcfg, device, seed=cfg.seed)

    teacher = None
    kd_vocab = None
    if cfg.teacher.path is not None or cfg.teacher.tiny is not None:
        teacher_cfg = source_config(cfg.teacher)
        check_same_tokenizer(cfg.teacher.path, cfg.model.path, "model.path")
        kd_vocab = check_vocab(teacher_cfg, model_cfg, len(tokenizer), key="model.config.vocab_size")
        teacher = load("teacher", teacher_cfg)
    rows: list[dict[str, Any]] = []
    metrics = MetricsLogger(out, None)
    try:
        for key in ("model", "teacher"):
            if key == "teacher" and teacher is None:
                continue
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            model = load("model", model_cfg) if key == "model" else teacher
            src = cfg[key]
            t0 = time.perf_counter()
            res = sliding_window_eval(model, stream, window=window, stride=stride, micro_batch_size=e.micro_batch_size,
                                      device=device, teacher=teacher if key == "model" else None,
                                      kd_vocab=kd_vocab)
            res["eval_s"] = time.perf_counter() - t0
            if prompts is not None and e.gen_tokens > 0:
                res.update(generation_speed(model, prompts, e.gen_tokens, device))
            harness = run_harness(model, tokenizer, list(e.tasks), task_paths=list(e.task_paths),
                                  num_fewshot=e.num_fewshot, limit=e.limit, batch_size=e.micro_batch_size,
                                  device=device) if e.tasks else []
            mem_kind, mem = peak_memory_gib(device)
            row = {"model": key, "path": src.path or src.tiny, "params": count_parameters(model),
                   "disk_bytes": disk_bytes(src.path), "quantized": is_quantized_checkpoint(src.path),
                   "window": window, "stride": stride, f"peak_{mem_kind}_gib": mem, **res}
            if harness:
                row["harness"] = harness
            metrics.log({"event": "eval", **row})
            rows.append(row)
            if key == "model":
                del model
    finally:
        metrics.close()
    write_report(out / "report.md", "Sapling evaluation", eval_report_sections(rows, window, stride, device))
    return {"rows": rows}


def eval_report_sections(rows: list[dict[str, Any]], window: int, stride: int, device: torch.device) -> list:
    """The report.md tables of `sapling eval`: perplexity, agreement with the teacher, speed and size."""
    def mb(n: int | None) -> str:
        return "" if n is None else f"{n / 2**20:.2f}"

    mem_key = next((k for k in rows[0] if k.startswith("peak_")), "peak_rss_gib")
    sections: list = [
        ("Perplexity", ["model", "path", "tokens scored", "loss (nats/token)", "perplexity"],
         [[r["model"], r["path"], f"{r['tokens']:,}", f"{r['loss']:.4f}", f"{r['ppl']:.2f}"] for r in rows]),
        ("Method", f"Sliding windows of {window} tokens every {stride} tokens over the files' token stream; each "
                   "token is scored once, with the context its window gives it."),
    ]
    agree = [r for r in rows if "kl" in r]
    if agree:
        sections.append(("Agreement with the teacher", ["model", "top-1 agreement", "mean KL(teacher ‖ model)"],
                         [[r["model"], f"{r['top1_agreement']:.2%}", f"{r['kl']:.4f}"] for r in agree]))
    sections.append((f"Size and speed ({device.type})",
                     ["model", "parameters", "weights on disk (MB)", "quantized", "generation (tokens/s)",
                      mem_key.replace("_gib", " (GiB)").replace("_", " ")],
                     [[r["model"], f"{r['params']:,}", mb(r["disk_bytes"]), "yes" if r["quantized"] else "no",
                       f"{r['gen_tokens_per_s']:,.1f}" if "gen_tokens_per_s" in r else "",
                       f"{r[mem_key]:.2f}"] for r in rows]))
    harness = [[r["model"], h["task"], h["metric"], f"{h['value']:.4f}",
                "" if h["stderr"] is None else f"{h['stderr']:.4f}"] for r in rows for h in r.get("harness", [])]
    if harness:
        sections.append(("lm-evaluation-harness", ["model", "task", "metric", "value", "stderr"], harness))
    return sections
