"""Distillation-guided saliency for GPTQ (after GuidedQuant, Kim et al., 2025).

Plain GPTQ treats every output of a linear as equally important: it minimises ||dW X||^2. What matters
is the end loss, here the distillation loss between teacher and student. To second order its increase
is sum_n sum_j (dL/dz_nj)^2 (dW x_n)_j^2 (Fisher approximation), with z the linear's output. Averaging
the squared output gradient over each of G groups of output rows gives, per group g, a Hessian

    H_g = sum_n s_ng x_n x_n^T,     s_ng = mean_{j in group g} (dL/dz_nj)^2

and the rows of group g are quantized with GPTQ against H_g. The gradients are taken once, on the
unquantized student, over the same calibration batches GPTQ then uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from sapling.kernels import fused_linear_kd_loss
from sapling.models import decoder_and_head, final_hidden, first_rows, model_logit_transform
from sapling.progress import progress as progress_bar
from sapling.quant.layerwise import saliency_groups


def distillation_saliency(
    student: nn.Module,
    teacher: nn.Module,
    batches: Sequence[torch.Tensor],
    targets: Sequence[str],
    *,
    groups: int = 4,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    progress: bool = True,
    vocab: int | None = None,
) -> dict[str, list[torch.Tensor]]:
    """Per target linear, one `[B*L, G]` float32 tensor (on CPU) per batch: the mean squared gradient of the
    distillation loss with respect to the linear's outputs, per token and group of output rows.

    The loss is the fused KD loss between the student and the teacher (summed over the batch's tokens,
    so every token's gradient has the same scale whatever the batch). Parameter gradients are not
    computed: only the linears' outputs are differentiated. Both models run whole on their own devices.
    `vocab`: compare the two distributions over the first `vocab` ids only (teacher and student with different
    padded rows: the tokenizer's size, see models.shapes.check_vocab).
    """
    device = next(student.parameters()).device  # the teacher may live elsewhere; its hidden states come here
    modules = dict(student.named_modules())
    outputs: dict[str, torch.Tensor] = {}
    handles = []
    for name in targets:
        def keep(_m: nn.Module, _inp: Any, out: torch.Tensor, name: str = name) -> None:
            outputs[name] = out

        handles.append(modules[name].register_forward_hook(keep))
    saliency: dict[str, list[torch.Tensor]] = {name: [] for name in targets}
    was_training = student.training
    flags = [(p, p.requires_grad) for p in student.parameters()]
    for p, _ in flags:  # the outputs must be differentiable; autograd.grad below leaves .grad untouched
        p.requires_grad_(True)
    student.eval()
    teacher.eval()
    _, s_head = decoder_and_head(student)
    _, t_head = decoder_and_head(teacher)
    s_transform, t_transform = model_logit_transform(student, "student"), model_logit_transform(teacher, "teacher")
    try:
        t_device = next(teacher.parameters()).device
        t_weight, t_bias = first_rows(t_head.weight.detach(), t_head.bias, vocab)  # the ids both vocabularies hold
        t_weight, t_bias = t_weight.to(device), None if t_bias is None else t_bias.detach().to(device)
        s_weight, s_bias = first_rows(s_head.weight, s_head.bias, vocab)
        for ids in progress_bar(batches, desc="guided saliency", unit="batch", enabled=progress, leave=False):
            outputs.clear()
            with torch.no_grad():
                t_hidden = final_hidden(teacher, ids.to(t_device)).to(device)
            with torch.enable_grad():
                s_hidden = final_hidden(student, ids.to(device))
                loss = fused_linear_kd_loss(s_hidden, s_weight, teacher_hidden=t_hidden,
                                            teacher_weight=t_weight, divergence=divergence,
                                            temperature=temperature, num_valid_tokens=1,
                                            student_bias=s_bias, teacher_bias=t_bias,
                                            student_logit_transform=s_transform,
                                            teacher_logit_transform=t_transform)
                names = [n for n in targets if n in outputs]
                grads = torch.autograd.grad(loss, [outputs[n] for n in names], allow_unused=True)
            for name, grad in zip(names, grads):
                out = outputs[name]
                rows = out.shape[-1]
                g = saliency_groups(rows, groups)
                if grad is None:
                    grad = torch.zeros_like(out)
                sq = grad.detach().float().reshape(-1, g, rows // g).pow(2).mean(dim=-1)
                saliency[name].append(sq.cpu())
    finally:
        for h in handles:
            h.remove()
        student.train(was_training)
        for p, flag in flags:
            p.requires_grad_(flag)
    return saliency
