"""torchrun worker: the KD head under DeepSpeed ZeRO-3 on CPU (gloo) vs a single-process reference.

Each rank takes its share of one global batch; the loss is normalised by the global count of valid
tokens, so the summed gradients equal the single-process gradient of the whole batch. Rank 0 writes
the comparison to the JSON file named by argv[1].
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

from sapling.distill.step import count_valid, loss_on_batch
from sapling.models import IGNORE_INDEX, tiny_config


def main(out_path: str) -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    vocab, seq, per_rank = 96, 12, 2
    student = AutoModelForCausalLM.from_config(tiny_config("llama-tiny", vocab_size=vocab, hidden_size=32,
                                                           intermediate_size=48, num_hidden_layers=1))
    teacher = AutoModelForCausalLM.from_config(tiny_config("llama-tiny", vocab_size=vocab, hidden_size=48,
                                                           intermediate_size=64, num_hidden_layers=1))
    teacher.requires_grad_(False)
    reference = copy.deepcopy(student)
    ids = torch.randint(0, vocab, (per_rank * world, seq))
    labels = ids.clone()
    labels[torch.rand(labels.shape) < 0.25] = IGNORE_INDEX  # uneven valid counts across ranks
    distill = OmegaConf.create({"divergence": "jsd", "beta": 0.3, "temperature": 2.0, "kd_weight": 1.0,
                                "ce_weight": 0.5, "chunk_size": 5})
    num_valid = count_valid(labels)

    ds_config = {"train_micro_batch_size_per_gpu": per_rank, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                 "zero_allow_untested_optimizer": True}
    engine, *_ = deepspeed.initialize(model=student, optimizer=torch.optim.AdamW(student.parameters(), lr=1e-3),
                                      config=ds_config)
    local = slice(rank * per_rank, (rank + 1) * per_rank)
    loss, _ = loss_on_batch(engine.module, teacher, {"input_ids": ids[local], "labels": labels[local]}, distill,
                            num_valid_tokens=num_valid)
    engine.backward(loss * world)  # DeepSpeed averages gradients over ranks; the loss is already global
    grads = {n: safe_get_full_grad(p) for n, p in engine.module.named_parameters()}
    head_partitioned = engine.module.lm_head.weight.numel() == 0  # ZeRO-3 released it after the loss
    global_loss = loss.detach().clone()
    dist.all_reduce(global_loss)

    if rank == 0:
        ref_loss, _ = loss_on_batch(reference, teacher, {"input_ids": ids, "labels": labels}, distill,
                                    num_valid_tokens=num_valid)
        ref_loss.backward()
        errors = {}
        for name, p in reference.named_parameters():
            g = grads[name]
            errors[name] = float((g - p.grad).norm() / p.grad.norm().clamp_min(1e-30))
        result = {"world": world, "loss": float(global_loss), "ref_loss": float(ref_loss), "grad_rel_err": errors,
                  "head_partitioned": bool(head_partitioned), "num_params": len(errors)}
        with open(out_path, "w") as f:
            json.dump(result, f)
    dist.barrier()


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main(sys.argv[1])
