"""torchrun worker: importance on all ranks and a ZeRO-3 partitioned teacher vs a single-process reference.

Every rank holds the same plain model and computes the single-process reference itself; rank 0 writes the
comparisons to the JSON file named by argv[1]. Cases:

- data parallel: `distributed_importance` on the plain model, an odd number of samples (uneven shares) and
  a single sample (one rank has no batch at all), with `layer_loss=True`;
- ZeRO-3: the same weights in a model built under `deepspeed.zero.Init`, first bare (sapling gathers layer
  by layer), then wrapped by a DeepSpeed engine (the engine's hooks gather); importance and the sliced
  student are compared with the plain model's, and the largest number of whole parameters at any time is
  recorded.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
from transformers import AutoModelForCausalLM

import sapling.dist
import sapling.prune.distributed as prune_dist
import sapling.prune.slicing as slicing
from sapling.data.calibration import calibration_batches
from sapling.models import tiny_config
from sapling.prune.importance import ImportanceScores, distributed_importance, estimate_importance
from sapling.prune.select import plan_from_scores
from sapling.prune.slicing import slice_model

VOCAB, SEQ, SEED = 128, 10, 3
DS_CONFIG = {"train_micro_batch_size_per_gpu": 1,
             "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
FAMILIES = {"llama-tiny": {}, "qwen2-tiny": {"tie_word_embeddings": False}}
SHAPE = {"num_hidden_layers": 2, "hidden_size": 48, "intermediate_size": 64, "num_attention_heads": 2,
         "num_key_value_heads": 1}


def build(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = tiny_config(family, vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                      **FAMILIES[family])
    return AutoModelForCausalLM.from_config(cfg).eval()


def score_errors(got: ImportanceScores, ref: ImportanceScores) -> dict[str, float]:
    """Largest relative error of each score tensor (relative to that tensor's largest magnitude)."""
    out = {}
    for name in ("mlp", "heads", "kv_groups", "hidden", "block_influence", "layer_loss"):
        a, b = getattr(got, name), getattr(ref, name)
        if a is None or b is None:
            out[name] = 0.0 if a is None and b is None else float("inf")
            continue
        out[name] = float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))
    out["num_tokens"] = float(got.num_tokens != ref.num_tokens)
    return out


def same_on_all_ranks(scores: ImportanceScores) -> bool:
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, scores.state_dict())

    def equal(a: object, b: object) -> bool:
        return torch.equal(a, b) if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) else a == b
    return all(g.keys() == gathered[0].keys() and all(equal(g[k], gathered[0][k]) for k in g) for g in gathered)


def state_errors(student: torch.nn.Module, ref: torch.nn.Module) -> dict[str, object]:
    a, b = student.state_dict(), ref.state_dict()
    return {"same_keys": a.keys() == b.keys(),
            "unequal": sorted(k for k in a if k in b and not torch.equal(a[k].cpu(), b[k].cpu())),
            "config_equal": student.config.to_dict() == ref.config.to_dict(),
            "partitioned": any(hasattr(p, "ds_id") for p in student.parameters()),
            "device": str(next(student.parameters()).device),
            "tied": student.get_output_embeddings().weight is student.get_input_embeddings().weight,
            "ref_tied": ref.get_output_embeddings().weight is ref.get_input_embeddings().weight}


@contextlib.contextmanager
def peak_whole_params(model: torch.nn.Module, peak: list[int]):
    """Record in peak[0] the most parameters of `model` that are whole at once inside sapling's gathers."""
    originals = {mod: mod.gathered for mod in (prune_dist, slicing)}

    def spy(params):
        @contextlib.contextmanager
        def ctx():
            with sapling.dist.gathered(params):
                whole = sum(p.ds_status == ZeroParamStatus.AVAILABLE for p in model.parameters())
                peak[0] = max(peak[0], whole)
                yield
        return ctx()

    for mod in originals:
        mod.gathered = spy
    try:
        yield
    finally:
        for mod, fn in originals.items():
            mod.gathered = fn


def main(out_path: str) -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    blocks = torch.randint(0, VOCAB, (23, SEQ), generator=torch.Generator().manual_seed(7))
    result: dict[str, object] = {"world": world}

    # Shares of the calibration order: disjoint, covering, uneven.
    def ids(r: int, w: int, samples: int) -> list[list[int]]:
        return [b["input_ids"].tolist() for b in calibration_batches(blocks, samples, 4, "cpu", SEED, r, w)]
    shares = [sum(ids(r, world, 13), []) for r in range(world)]
    result["shares"] = {"sizes": [len(s) for s in shares],
                        "union_is_global_order": sum(shares, []) == sum(ids(0, 1, 13), [])}

    def run(model, samples, aggregation="mean_l2", layer_loss=True):
        return distributed_importance(model, blocks, samples=samples, batch_size=4, device="cpu", seed=SEED,
                                      aggregation=aggregation, layer_loss=layer_loss)

    def reference(model, samples, aggregation="mean_l2", layer_loss=True):
        return estimate_importance(model, calibration_batches(blocks, samples, 4, "cpu", seed=SEED),
                                   aggregation=aggregation, layer_loss=layer_loss)

    cases: dict[str, dict] = {}
    for family in FAMILIES:
        plain = build(family)
        refs = {n: reference(plain, n) for n in (13, 1)}

        # Data parallel on the plain model.
        for n in (13, 1):
            got = run(plain, n)
            cases[f"{family}/dp/samples={n}"] = {"err": score_errors(got, refs[n]),
                                                 "same": same_on_all_ranks(got)}
        for agg in ("mean", "variance"):
            got = run(plain, 13, agg, layer_loss=False)
            ref = reference(plain, 13, agg, layer_loss=False)
            cases[f"{family}/dp/{agg}"] = {"err": score_errors(got, ref), "same": same_on_all_ranks(got)}

        # ZeRO-3: the same weights, partitioned.
        with deepspeed.zero.Init(config_dict_or_path=DS_CONFIG):
            zmodel = AutoModelForCausalLM.from_config(plain.config).eval()
        plain_state = plain.state_dict()
        for name, p in zmodel.named_parameters():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0), torch.no_grad():
                p.copy_(plain_state[name])
        total = sum(1 for _ in zmodel.parameters())
        layer_params = sum(1 for _ in zmodel.model.layers[0].parameters())
        plan = plan_from_scores(refs[13], plain.config, SHAPE, depth_metric="layer_loss")
        ref_student = slice_model(plain, plan)

        for mode in ("bare", "engine"):
            model = zmodel
            if mode == "engine":
                engine, *_ = deepspeed.initialize(model=zmodel, config=DS_CONFIG)
                model = engine.module
            peak = [0]
            with peak_whole_params(model, peak):
                got = {n: run(model, n) for n in (13, 1)}
                forward_peak = peak[0]
                peak[0] = 0
                student = slice_model(model, plan)
            for n, scores in got.items():
                cases[f"{family}/zero3-{mode}/samples={n}"] = {"err": score_errors(scores, refs[n]),
                                                             "same": same_on_all_ranks(scores)}
            cases[f"{family}/zero3-{mode}/slice"] = {
                **state_errors(student, ref_student),
                "teacher_partitioned": model.model.layers[0].mlp.down_proj.weight.numel() == 0,
                "forward_peak": forward_peak, "slice_peak": peak[0], "layer_params": layer_params,
                "total_params": total}
    result["cases"] = cases
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(result, f, indent=1)
    dist.barrier()


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main(sys.argv[1])
