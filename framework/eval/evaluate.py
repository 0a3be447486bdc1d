"""`sapling eval`'s measurements: sliding-window perplexity, teacher agreement, generation speed, size.

Perplexity is computed over the token stream of the evaluation files (documents in order, each ended by
EOS) with windows of `window` tokens that start every `stride` tokens; each window scores only the tokens
no earlier window scored, with between `window - stride` and `window - 1` tokens of context. With
stride < window every token after the first is scored exactly once; stride = window is block-wise
evaluation (a block's first token, which has no context, is not scored); stride = 1 gives every token
the most context a window allows, at one forward per token. The loss goes through the fused head (no
`[tokens x vocab]` logits), and with a teacher the same pass gives mean KL(teacher || student) and the
fraction of tokens where both models' most likely next token agree.
"""

from __future__ import annotations

import json
import math
import os
import resource
import time
from pathlib import Path
from typing import Any

import torch

from sapling.models import (
    IGNORE_INDEX,
    decoder_and_head,
    final_hidden,
    first_rows,
    install_kd_head,
    model_logit_transform,
)


def token_stream(blocks: Any, max_tokens: int | None = None) -> torch.Tensor:
    """The packed blocks joined back into the stream they were cut from (1-D int64)."""
    parts, total = [], 0
    for i in range(len(blocks)):
        parts.append(blocks[i])
        total += parts[-1].numel()
        if max_tokens is not None and total >= max_tokens:
            break
    stream = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
    return stream[:max_tokens] if max_tokens is not None else stream


def windows(num_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored target position) of each window over a stream of `num_tokens` tokens."""
    if not 1 <= stride <= window:
        raise ValueError(f"stride {stride} must be between 1 and the window ({window})")
    out, prev_end = [], 0
    for begin in range(0, max(num_tokens - 1, 0), stride):
        end = min(begin + window, num_tokens)
        out.append((begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == num_tokens:
            break
    return out


@torch.no_grad()
def sliding_window_eval(
    model: torch.nn.Module,
    stream: torch.Tensor,
    *,
    window: int,
    stride: int,
    micro_batch_size: int = 8,
    device: torch.device | str = "cpu",
    teacher: torch.nn.Module | None = None,
    kd_vocab: int | None = None,
) -> dict[str, float]:
    """Mean NLL (nats/token) and perplexity of `model` on `stream`; with `teacher`, also `kl` (mean
    KL(teacher || student)) and `top1_agreement`, on the same scored tokens. `kd_vocab`: the two lm_heads differ
    in padded rows, so `kl` and the agreement compare the first `kd_vocab` ids (the perplexity stays the model's
    own, over all its rows)."""
    was_training = model.training
    model.eval()
    head = install_kd_head(model)
    t_head = decoder_and_head(teacher)[1] if teacher is not None else None
    t_transform = model_logit_transform(teacher, "teacher") if teacher is not None else None
    spans = windows(stream.numel(), window, stride)
    nll = kl = agree = 0.0
    scored = 0
    i = 0
    while i < len(spans):
        # a micro-batch of windows of one length (all but possibly the last window are full)
        length = spans[i][1] - spans[i][0]
        j = i
        while j < len(spans) and j - i < micro_batch_size and spans[j][1] - spans[j][0] == length:
            j += 1
        ids = torch.stack([stream[b:e] for b, e, _ in spans[i:j]]).to(device)
        targets = ids[:, 1:].clone()
        for row, (b, _, first) in enumerate(spans[i:j]):
            targets[row, : first - b - 1] = IGNORE_INDEX  # scored by an earlier window
        targets = targets.reshape(-1)
        kd: dict[str, Any] = dict(labels=targets, kd_weight=0.0, ce_weight=1.0, ignore_index=IGNORE_INDEX,
                                  num_valid_tokens=1, return_parts=True)
        hidden = final_hidden(model, ids)
        if teacher is not None:
            t_weight, t_bias = first_rows(t_head.weight, t_head.bias, kd_vocab)
            kd.update(teacher_hidden=final_hidden(teacher, ids), teacher_weight=t_weight, teacher_bias=t_bias,
                      teacher_logit_transform=t_transform, divergence="forward_kl", kd_weight=1.0)
            if kd_vocab is not None:  # the perplexity over all the model's rows, the comparison over the shared ones
                nll += float(head(hidden, kd={**kd, "kd_weight": 0.0, "teacher_hidden": None, "teacher_weight": None,
                                              "teacher_bias": None, "teacher_logit_transform": None})[1]["ce"])
                kd.update(vocab=kd_vocab, ce_weight=0.0)
        _, parts = head(hidden, kd=kd)
        if teacher is None or kd_vocab is None:
            nll += float(parts["ce"])
        if teacher is not None:
            kl += float(parts["kd"])
            agree += float(parts["top1_agree"])
        scored += int((targets != IGNORE_INDEX).sum())
        i = j
    model.train(was_training)
    loss = nll / max(1, scored)
    out = {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": scored}
    if teacher is not None:
        out.update(kl=kl / max(1, scored), top1_agreement=agree / max(1, scored))
    return out


def prompt_batch(stream: torch.Tensor, batch: int, length: int) -> torch.Tensor | None:
    """The first `batch * length` tokens of `stream` as `batch` prompts of `length`; None when too short."""
    if stream.numel() < batch * length:
        return None
    return stream[: batch * length].reshape(batch, length)


@torch.no_grad()
def generation_speed(model: torch.nn.Module, prompts: torch.Tensor, new_tokens: int,
                     device: torch.device | str = "cpu") -> dict[str, float]:
    """Greedy decoding of exactly `new_tokens` tokens after each prompt row ([B, P], one batch), timed.

    One warm-up token first (kernels, caches), then the timed run; tokens/s counts generated tokens only.
    """
    model.eval()
    prompts = prompts.to(device)
    attn = torch.ones_like(prompts)
    kwargs = dict(do_sample=False, attention_mask=attn, pad_token_id=0, use_cache=True)
    model.generate(prompts, max_new_tokens=1, min_new_tokens=1, **kwargs)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = model.generate(prompts, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - t0
    generated = (out.shape[1] - prompts.shape[1]) * prompts.shape[0]
    return {"gen_tokens_per_s": generated / max(wall, 1e-9), "gen_s": wall, "gen_tokens": generated}


@torch.no_grad()
def greedy_samples(model: torch.nn.Module, tokenizer: Any, prompts: list[str], max_new_tokens: int,
                   device: torch.device | str = "cpu") -> list[str]:
    """Each prompt's greedy continuation (decoded, special tokens dropped), one prompt at a time. A tokenizer
    with a chat template gets each prompt as a user turn (an instruct model answers it), else as raw text."""
    model.eval()
    texts = []
    for prompt in prompts:
        if getattr(tokenizer, "chat_template", None):
            ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                return_tensors="pt")
            ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        else:
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        ids = ids.to(device)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else
                             tokenizer.eos_token_id)
        texts.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return texts


def is_quantized_checkpoint(path: str | os.PathLike | None) -> bool:
    """True for a checkpoint dir whose config.json carries a quantization_config (a compressed-tensors export)."""
    if path is None:
        return False
    config = Path(os.path.expanduser(str(path))) / "config.json"
    return config.exists() and "quantization_config" in json.loads(config.read_text())


def disk_bytes(path: str | os.PathLike | None) -> int | None:
    """Bytes of a checkpoint's weight files on disk (a GGUF file: its size); None when there is no such path."""
    from sapling.quant.export import checkpoint_bytes

    if path is not None and str(path).lower().endswith(".gguf") and Path(os.path.expanduser(str(path))).is_file():
        return Path(os.path.expanduser(str(path))).stat().st_size
    if path is None or not Path(os.path.expanduser(str(path))).is_dir():
        return None
    return checkpoint_bytes(os.path.expanduser(str(path)))


def peak_memory_gib(device: torch.device | str) -> tuple[str, float]:
    """("gpu", peak allocated since the last reset) on CUDA, else ("rss", this process's peak RSS so far)."""
    device = torch.device(device)
    if device.type == "cuda":
        return "gpu", torch.cuda.max_memory_allocated(device) / 2**30
    return "rss", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
