"""Perplexity of a causal LM on packed validation blocks."""

from __future__ import annotations

import math
from typing import Any

import torch

from sapling.data.blocks import block_batch
from sapling.dist import all_reduce_sum, rank_world
from sapling.models import IGNORE_INDEX, final_hidden, install_kd_head, shifted_targets
from sapling.progress import progress as progress_bar


@torch.no_grad()
def evaluate_lm(
    model: torch.nn.Module,
    blocks: Any,
    *,
    micro_batch_size: int = 8,
    max_batches: int | None = None,
    max_tokens: int | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
    desc: str = "eval",
    shard: bool = False,
    lockstep: bool = False,
) -> dict[str, float]:
    """Mean next-token NLL (nats) over `blocks`, or over a budget of them spread evenly across the split.

    `max_tokens` takes max(1, max_tokens // block length) blocks, so the blocks evaluated do not depend on
    `micro_batch_size`; `max_batches` caps the number of batches too. A budget smaller than the split takes
    blocks evenly spaced over it (block j * n // k of n, for j < k), not the first ones: validation blocks
    are in document order, and the first few documents are not the split (on the demo's big corpus the
    first 65,536 tokens put a model 0.2 nats away from its whole-split loss). `progress` shows a bar.

    `shard=True` (call it on every rank of the process group): each rank evaluates every world-th batch from
    its rank on, and the sums of NLL and tokens are all-reduced, so every rank returns the value one process
    gets for all the batches. `lockstep=True` is for a ZeRO-3 model, whose every forward needs every rank:
    all ranks run the same number of forwards, a rank short of one running batch 0 again with zero weight.
    """
    was_training = model.training
    model.eval()
    head = install_kd_head(model)  # the loss runs in the head's forward, so a ZeRO-3 head is gathered for it
    total = len(blocks)
    n = total
    if max_tokens is not None and n:
        n = min(n, max(1, max_tokens // blocks[0].numel()))
    if max_batches is not None:
        n = min(n, max_batches * micro_batch_size)
    chosen = range(total) if n == total else [j * total // n for j in range(n)]  # spread over the split
    batches = math.ceil(n / micro_batch_size)
    rank, world = rank_world() if shard else (0, 1)
    mine: list[int | None] = list(range(rank, batches, world))
    if lockstep:
        mine += [None] * (math.ceil(batches / world) - len(mine))  # None: a zero-weight forward
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # NLL sum, tokens: read once at the end
    for b in progress_bar(mine, desc=desc, unit="batch", enabled=progress, leave=False):
        first = 0 if b is None else b * micro_batch_size
        batch = block_batch(blocks, [chosen[i] for i in range(first, min(n, first + micro_batch_size))])
        batch = {k: v.to(device) for k, v in batch.items()}
        hidden = final_hidden(model, batch["input_ids"], batch.get("position_ids"))
        targets = shifted_targets(batch["labels"])
        nll_sum = head(hidden, kd=dict(labels=targets, kd_weight=0.0, ce_weight=1.0, ignore_index=IGNORE_INDEX,
                                       num_valid_tokens=1))
        if b is not None:
            totals += torch.stack([nll_sum.double(), (targets != IGNORE_INDEX).sum().double()])
    if world > 1:
        all_reduce_sum(totals)
    model.train(was_training)
    total_nll, total_tokens = totals.tolist()
    loss = total_nll / max(1, total_tokens)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": int(total_tokens)}


PERPLEXITY_COLUMNS = ["model", "params", "loss (nats/token)", "perplexity"]


def perplexity_rows(
    models: list[tuple[str, torch.nn.Module | None]],
    blocks: Any,
    eval_cfg: Any,
    device: torch.device | str,
    metrics: Any,
    event: str = "eval",
    *,
    max_tokens: int | None = None,
    progress: bool = False,
) -> list[list[str]]:
    """Evaluate each named model on `blocks`, log one record each, return report rows (PERPLEXITY_COLUMNS).

    The budget is `eval_cfg.batches` batches of `eval_cfg.micro_batch_size` blocks, and at most `max_tokens`
    tokens (see `evaluate_lm`); `progress` shows a bar per model.
    """
    from sapling.models import count_parameters

    rows = []
    for name, model in models:
        if model is None:
            continue
        res = evaluate_lm(model, blocks, micro_batch_size=eval_cfg.micro_batch_size, max_batches=eval_cfg.batches,
                          max_tokens=max_tokens, device=device, progress=progress, desc=f"eval: {name}")
        params = count_parameters(model)
        metrics.log({"event": event, "model": name, "params": params, "val_loss": res["loss"], "val_ppl": res["ppl"]})
        rows.append([name, f"{params:,}", f"{res['loss']:.4f}", f"{res['ppl']:.2f}"])
    return rows
