"""torchrun worker: feature distillation with a ZeRO-3 teacher and student vs a single-process reference.

The teacher is built under `deepspeed.zero.Init` (weights copied from a plain copy) and wrapped by an
engine without optimizer; the student and its FeatureDistiller sit in a StudentWithFeatures trained by a
ZeRO-3 engine. Each rank takes its share of one global batch and normalises by the global count of valid
tokens. Rank 0 writes the comparisons to the JSON file named by argv[1].
"""

from __future__ import annotations

import copy
import json
import os
import sys

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_grad
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM

from sapling.distill.features import (
    FeatureDistiller,
    StudentWithFeatures,
    capture_layer_outputs,
    feature_positions,
)
from sapling.models import tiny_config

VOCAB, SEQ, PER_RANK = 96, 10, 2
ZERO3 = {"stage": 3, "stage3_param_persistence_threshold": 0}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def main(out_path: str) -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    t_cfg = tiny_config("qwen3-tiny", vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=3)
    s_cfg = tiny_config("llama-tiny", vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2)
    teacher = AutoModelForCausalLM.from_config(t_cfg).eval().requires_grad_(False)
    student = AutoModelForCausalLM.from_config(s_cfg)
    cfg = OmegaConf.create({"weight": 0.7, "loss": "mse", "layers": None, "normalize": True})
    features = FeatureDistiller.from_config(cfg, s_cfg, t_cfg, seed=1)
    ref_student, ref_features = copy.deepcopy(student), copy.deepcopy(features)
    proj0 = features.proj.detach().clone()
    ids = torch.randint(0, VOCAB, (PER_RANK * world, SEQ))
    labels = ids.clone()
    labels[torch.rand(labels.shape) < 0.3] = -100  # uneven valid counts across ranks
    num_valid = int(feature_positions(labels).sum())
    local = slice(rank * PER_RANK, (rank + 1) * PER_RANK)

    # The teacher: partitioned at construction, then driven by an engine without optimizer.
    with deepspeed.zero.Init(config_dict_or_path={"train_micro_batch_size_per_gpu": PER_RANK,
                                                  "zero_optimization": ZERO3}):
        zteacher = AutoModelForCausalLM.from_config(t_cfg).eval()
    plain = teacher.state_dict()
    for name, p in zteacher.named_parameters():
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0), torch.no_grad():
            p.copy_(plain[name])
    zteacher.requires_grad_(False)
    t_engine, *_ = deepspeed.initialize(model=zteacher, config={"train_micro_batch_size_per_gpu": PER_RANK,
                                                                "zero_optimization": ZERO3})
    with torch.no_grad(), capture_layer_outputs(t_engine, features.teacher_layers) as t_feats:
        t_engine.module.model(input_ids=ids[local])
    with torch.no_grad(), capture_layer_outputs(teacher, features.teacher_layers) as plain_feats:
        teacher.model(input_ids=ids[local])
    teacher_err = torch.tensor([max(rel_err(a, b) for a, b in zip(t_feats, plain_feats))])
    dist.all_reduce(teacher_err, op=dist.ReduceOp.MAX)
    teacher_partitioned = all(p.numel() == 0 for p in zteacher.parameters())

    # The student + projection, trained by a ZeRO-3 engine.
    wrapper = StudentWithFeatures(student, features)
    s_engine, *_ = deepspeed.initialize(
        model=wrapper, optimizer=torch.optim.AdamW(wrapper.parameters(), lr=1e-2),
        config={"train_micro_batch_size_per_gpu": PER_RANK, "gradient_accumulation_steps": 1,
                "zero_optimization": ZERO3, "zero_allow_untested_optimizer": True})
    module = s_engine.module
    with capture_layer_outputs(s_engine, module.features.student_layers) as s_feats:
        module.model.model(input_ids=ids[local])
    loss, parts = module.features(s_feats, t_feats, feature_positions(labels[local]), num_valid_tokens=num_valid)
    # The same student features against the unpartitioned teacher's: the loss must not change.
    with torch.no_grad():
        loss_plain_teacher, _ = module.features(s_feats, plain_feats, feature_positions(labels[local]),
                                                num_valid_tokens=num_valid)
    s_engine.backward(loss * world)  # DeepSpeed averages gradients over ranks; the loss is already global
    grads = {n: safe_get_full_grad(p) for n, p in module.named_parameters()}
    proj_partitioned = module.features.proj.numel() == 0
    s_engine.step()
    with deepspeed.zero.GatheredParameters([module.features.proj]):
        proj_moved = not torch.equal(module.features.proj.detach(), proj0)
    sums = torch.stack([loss.detach(), loss_plain_teacher.detach(), parts["feat"]])
    dist.all_reduce(sums)

    if rank == 0:
        with torch.no_grad(), capture_layer_outputs(teacher, ref_features.teacher_layers) as rt:
            teacher.model(input_ids=ids)
        with capture_layer_outputs(ref_student, ref_features.student_layers) as rs:
            ref_student.model(input_ids=ids)
        ref_loss, ref_parts = ref_features(rs, rt, feature_positions(labels), num_valid_tokens=num_valid)
        ref_loss.backward()
        ref_grads = {f"model.{n}": p.grad for n, p in ref_student.named_parameters() if p.grad is not None}
        ref_grads["features.proj"] = ref_features.proj.grad
        errors = {n: rel_err(grads[n], g) for n, g in ref_grads.items()}
        unexpected = sorted(n for n, g in grads.items() if n not in ref_grads and g is not None and g.abs().sum() > 0)
        result = {"world": world, "loss": float(sums[0]), "loss_plain_teacher": float(sums[1]),
                  "feat": float(sums[2]), "ref_loss": ref_loss.item(), "ref_feat": float(ref_parts["feat"]),
                  "teacher_feature_err": float(teacher_err), "teacher_partitioned": teacher_partitioned,
                  "teacher_layers": features.teacher_layers, "grad_rel_err": errors, "unexpected_grads": unexpected,
                  "proj_partitioned": bool(proj_partitioned), "proj_moved": bool(proj_moved),
                  "num_valid": num_valid}
        with open(out_path, "w") as f:
            json.dump(result, f)
    dist.barrier()


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main(sys.argv[1])
