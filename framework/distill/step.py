"""One distillation (or plain LM) loss computation on a batch of packed token blocks.

The student's final hidden states go through its lm_head (a KDHead, see sapling.models.kd_head), whose
forward runs `fused_linear_kd_loss` with the teacher's final hidden states and lm_head weight, so the loss
never needs full [tokens x vocab] logits from the models themselves.
"""

from __future__ import annotations

from typing import Any

import torch

from sapling.dist import gathered
from sapling.distill.features import FeatureDistiller, capture_layer_outputs, feature_positions
from sapling.distill.router import capture_router_logits, router_aux_loss, router_aux_weight
from sapling.models import (
    IGNORE_INDEX,
    decoder_and_head,
    final_hidden,
    first_rows,
    install_kd_head,
    model_logit_transform,
    shifted_targets,
)


def count_valid(labels: torch.Tensor) -> torch.Tensor:
    """The number of next-token targets that count (0-d int64 on the labels' device: no host sync)."""
    return (shifted_targets(labels) != IGNORE_INDEX).sum()


def loss_on_batch(
    student: torch.nn.Module,
    teacher: torch.nn.Module | None,
    batch: dict[str, torch.Tensor],
    distill_cfg: Any,
    *,
    num_valid_tokens: int | torch.Tensor | None = None,
    features: FeatureDistiller | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """kd_weight * T^2 * D(teacher || student) + ce_weight * CE, summed over valid tokens / num_valid_tokens.

    With `teacher=None` only the CE term is computed (training from scratch or fine-tuning), unless the
    batch carries the teacher's cached top-k (`teacher_lp`, `teacher_idx` from a teacher cache): then the
    fused loss's top-k path stands in for the teacher. `features` adds `distill.features.weight` x the
    intermediate-layer loss (normalised by the same token count). A training mixture-of-experts student adds
    its router load-balancing loss x `distill.router_aux_weight` (null: its `router_aux_loss_coef`; `aux`,
    weighted by this batch's share of the valid tokens). The parts (`kd`, `ce`, `top1_agree`, `feat`, `aux`)
    are detached device tensors, so a step reads them back once, when it is logged.
    """
    input_ids, labels, positions = batch["input_ids"], batch["labels"], batch.get("position_ids")
    if "teacher_records" in batch:
        raise ValueError("the batch holds packed teacher records: decode it first (CachedTeacherBlocks.decode)")
    head = install_kd_head(student, "student")
    cached = "teacher_lp" in batch
    if teacher is None:
        features = None
    s_layers = features.student_layers if features is not None else []
    aux_weight = router_aux_weight(student, distill_cfg) if student.training else 0.0
    has_teacher = teacher is not None or cached
    kd_weight = distill_cfg.kd_weight if has_teacher else 0.0
    ce_weight = distill_cfg.ce_weight if has_teacher else 1.0
    kd: dict[str, Any] = dict(
        labels=shifted_targets(labels),
        divergence=distill_cfg.divergence,
        beta=distill_cfg.beta,
        temperature=distill_cfg.temperature,
        kd_weight=kd_weight,
        ce_weight=ce_weight,
        ignore_index=IGNORE_INDEX,
        num_valid_tokens=num_valid_tokens,
        chunk_size=getattr(distill_cfg, "chunk_size", None),
        return_parts=True,
    )
    rows = head.kd_vocab  # teacher and student differ in padded rows: both are cut to the tokenizer's size
    if rows is not None and kd_weight > 0:
        kd["vocab"] = rows
    teacher_head: list[torch.nn.Parameter] = []
    t_feats: list[torch.Tensor] = []
    if cached and kd_weight > 0:
        lp, idx = batch["teacher_lp"], batch["teacher_idx"]
        if rows is not None and bool((idx >= rows).any()):  # (one host sync a step, on this rare path only)
            raise ValueError(f"the teacher cache puts top-k mass on padded vocabulary rows (ids >= {rows}, past the "
                             "tokenizer) that the student's aligned vocabulary leaves out: distil from the teacher "
                             "online instead of from this cache")
        kd.update(teacher_topk=(lp, idx))
    elif kd_weight > 0 or features is not None:
        # The teacher runs before the student: its forward's temporaries are freed before the student's
        # autograd graph is built, so the two never peak together. On CPU the teacher run beside a live graph
        # was ~20% slower at 8k tokens a micro-batch: its temporaries came from fresh pages (1.7M page faults
        # a forward), where run first they reuse the ones the allocator kept.
        _, t_head = decoder_and_head(teacher)
        t_layers = features.teacher_layers if features is not None else []
        with torch.no_grad(), capture_layer_outputs(teacher, t_layers) as t_feats:
            ht = final_hidden(teacher, input_ids, positions)
        if kd_weight > 0:
            teacher_head = list(t_head.parameters())
    with capture_layer_outputs(student, s_layers) as s_feats, \
            capture_router_logits(student if aux_weight > 0 else None) as routers:
        hs = final_hidden(student, input_ids, positions)
    # A ZeRO-3 teacher's lm_head is gathered on its own for the loss (the loss reads its weight directly);
    # the student's goes through the head's forward, so ZeRO-3 gathers it and reduce-scatters its gradient.
    with gathered(teacher_head):
        if kd_weight > 0 and not cached:
            t_weight, t_bias = first_rows(t_head.weight, t_head.bias, rows)
            kd.update(teacher_hidden=ht, teacher_weight=t_weight, teacher_bias=t_bias,
                      teacher_logit_transform=model_logit_transform(teacher, "teacher"))
        loss, parts = head(hs, kd=kd)
    out = {"kd": parts["kd"].detach(), "ce": parts["ce"].detach()}
    if "top1_agree" in parts:  # rows where the student's and the teacher's argmax agree
        out["top1_agree"] = parts["top1_agree"]
    if aux_weight > 0:  # an MoE student's load balancing, a token-weighted share of the global batch's
        share = count_valid(labels) / (num_valid_tokens if num_valid_tokens is not None else count_valid(labels))
        aux = router_aux_loss(student, routers) * share
        loss = loss + aux_weight * aux
        out["aux"] = aux.detach()
    if features is not None:  # through the module's call, so ZeRO-3 gathers the projection
        f_loss, f_parts = features(s_feats, t_feats, feature_positions(labels), num_valid_tokens=num_valid_tokens)
        loss = loss + f_loss
        out["feat"] = f_parts["feat"]
    return loss, out
