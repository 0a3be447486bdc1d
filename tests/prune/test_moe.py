"""Mixture-of-experts pruning (issue 20.3): Qwen3-MoE, Mixtral and OLMoE tiny configs sliced on every axis
they have (experts, expert FFN width, layers, hidden, heads), reloaded by transformers, and exact against
the teacher with the removed experts masked out of its router and the removed neurons zeroed."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, PreTrainedModel

from sapling.models import count_parameters, tiny_config
from sapling.prune.slicing import KeepPlan, pruned_config, slice_model

SIZES: dict[str, Any] = dict(vocab_size=128, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                             num_key_value_heads=2)
MOE = {"qwen3_moe": "qwen3-moe-tiny", "mixtral": "mixtral-tiny", "olmoe": "olmoe-tiny"}
WIDTH = 32  # the tiny configs' expert FFN width (moe_intermediate_size / intermediate_size)


def make_moe(family: str, seed: int = 0, **overrides: Any) -> PreTrainedModel:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(MOE[family], **{**SIZES, **overrides}))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.1 * noise if "norm" in name else 0.3 * noise if "gate.weight" in name else 0.1 * noise)
    return model.eval()


def ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, SIZES["vocab_size"], (2, 10), generator=torch.Generator().manual_seed(seed))


def logits(model: PreTrainedModel, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits


def width_of(cfg: Any) -> int:
    return cfg.moe_intermediate_size if cfg.model_type == "qwen3_moe" else cfg.intermediate_size


def _neurons(gen: torch.Generator, experts: int, keep: int) -> torch.Tensor:
    return torch.stack([torch.randperm(WIDTH, generator=gen)[:keep] for _ in range(experts)])  # unsorted


@pytest.mark.parametrize("family", MOE)
def test_identity_plan_is_exact(family: str) -> None:
    model, x = make_moe(family), ids()
    student = slice_model(model, KeepPlan())
    assert torch.equal(logits(student, x), logits(model, x))


@pytest.mark.parametrize("family", MOE)
def test_every_axis_pruned_saves_and_reloads(family: str, tmp_path) -> None:
    model, x = make_moe(family), ids()
    gen = torch.Generator().manual_seed(3)
    kept = 32 if family == "olmoe" else 48  # OLMoE: hidden_size = heads x head_dim (its q/k norms' sizes)
    plan = KeepPlan(layers=[0, 2], hidden=torch.sort(torch.randperm(64, generator=gen)[:kept]).values,
                    kv_heads=[torch.tensor([1]), torch.tensor([0])], heads=[torch.tensor([3, 2]), torch.tensor([0, 1])],
                    experts=[torch.tensor([3, 1]), torch.tensor([0, 2])],
                    expert_mlp=[_neurons(gen, 2, 24), _neurons(gen, 2, 24)])
    student = slice_model(model, plan)
    cfg = student.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (2, kept, 2, 1)
    assert (cfg.num_experts, width_of(cfg), cfg.num_experts_per_tok) == (2, 24, 2)
    assert pruned_config(model.config, plan).to_dict() == cfg.to_dict()
    experts = student.model.layers[0].mlp.experts
    assert tuple(experts.gate_up_proj.shape) == (2, 48, kept) and tuple(experts.down_proj.shape) == (2, kept, 24)
    assert tuple(student.model.layers[0].mlp.gate.weight.shape) == (2, kept)
    assert count_parameters(student) == count_parameters(AutoModelForCausalLM.from_config(cfg))
    out = logits(student, x)
    student.save_pretrained(tmp_path)
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    reloaded.eval()
    assert torch.equal(logits(reloaded, x), out)
    gen_ids = reloaded.generate(x[:1, :4], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert gen_ids.shape == (1, 10)


def _masked_router(gate: torch.nn.Module, keep: torch.Tensor, normalize: bool) -> Any:
    """The router's forward with the removed experts' logits at -inf (so the softmax renormalises over the kept
    ones, as the pruned router's does)."""
    def forward(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = h.reshape(-1, gate.hidden_dim)
        z = F.linear(h, gate.weight)
        mask = torch.full((z.shape[-1],), float("-inf"))
        mask[keep] = 0.0
        probs = torch.softmax(z.float() + mask, dim=-1)
        top, index = torch.topk(probs, gate.top_k, dim=-1)
        if normalize:
            top = top / top.sum(dim=-1, keepdim=True)
        return z, top.to(z.dtype), index
    return forward


@pytest.mark.parametrize("family", MOE)
def test_slicing_equals_masking_and_zeroing(family: str) -> None:
    """3 of 4 experts and 24 of 32 neurons per expert (each its own), 2 of 4 query heads: the student's logits
    equal the teacher's with the removed experts masked out of the router and the removed neurons and heads
    zeroed."""
    model, x = make_moe(family), ids()
    gen = torch.Generator().manual_seed(5)
    experts = [torch.tensor([2, 0, 3]), torch.tensor([1, 2, 3]), torch.tensor([0, 1, 3])]
    neurons = [_neurons(gen, 3, 24) for _ in range(3)]
    plan = KeepPlan(experts=experts, expert_mlp=neurons,
                    heads=[torch.tensor([3, 0]), torch.tensor([1, 2]), torch.tensor([0, 3])])
    if family == "olmoe":  # q/k normalised over the whole projection: heads have no such identity
        plan.heads = None
    student = slice_model(model, plan)
    assert (student.config.num_experts, width_of(student.config)) == (3, 24)

    ref = make_moe(family)
    hd = 16
    with torch.no_grad():
        for i, layer in enumerate(ref.model.layers):
            mlp = layer.mlp
            normalize = family == "mixtral" or bool(mlp.gate.norm_topk_prob)
            mlp.gate.forward = _masked_router(mlp.gate, experts[i], normalize)
            for j, e in enumerate(experts[i].tolist()):
                drop = torch.ones(WIDTH, dtype=torch.bool)
                drop[neurons[i][j]] = False
                mlp.experts.down_proj[e][:, drop] = 0
                mlp.experts.gate_up_proj[e][torch.cat([drop, drop])] = 0
            if plan.heads is not None:
                for h in set(range(4)) - set(plan.heads[i].tolist()):
                    layer.self_attn.o_proj.weight[:, h * hd:(h + 1) * hd] = 0
    torch.testing.assert_close(logits(student, x), logits(ref, x), atol=1e-5, rtol=0)
    assert not torch.allclose(logits(model, x), logits(ref, x), atol=1e-3)  # the removed parts mattered


@pytest.mark.parametrize("family", MOE)
def test_fewer_experts_than_experts_per_token(family: str) -> None:
    """One expert kept of 4 with top-2 routing: num_experts_per_tok becomes 1 and the model still runs."""
    model, x = make_moe(family), ids()
    student = slice_model(model, KeepPlan(experts=[torch.tensor([1])] * 3))
    assert (student.config.num_experts, student.config.num_experts_per_tok) == (1, 1)
    assert torch.isfinite(logits(student, x)).all()


def test_invalid_moe_plans() -> None:
    model = make_moe("qwen3_moe")
    with pytest.raises(ValueError, match=r"plan\.expert_mlp\[0\]: every expert must keep the same number"):
        slice_model(model, KeepPlan(experts=[torch.tensor([0, 1])] * 3,
                                    expert_mlp=[[torch.arange(4), torch.arange(5)]] * 3))
    with pytest.raises(ValueError, match=r"plan\.mlp: an MoE model's MLP is its experts"):
        slice_model(model, KeepPlan(mlp=[torch.arange(4)] * 3))
    with pytest.raises(ValueError, match=r"plan\.experts\[0\].*out of range"):
        slice_model(model, KeepPlan(experts=[torch.tensor([7])] * 3))
    dense = AutoModelForCausalLM.from_config(tiny_config("llama-tiny", **SIZES))
    with pytest.raises(ValueError, match="not a mixture-of-experts"):
        slice_model(dense, KeepPlan(experts=[torch.tensor([0])] * 3))
    from sapling.errors import ModelSourceError

    sparse_every_other = AutoModelForCausalLM.from_config(tiny_config("qwen3-moe-tiny", **SIZES, decoder_sparse_step=2))
    with pytest.raises(ModelSourceError, match="dense MLP instead of experts"):
        slice_model(sparse_every_other, KeepPlan())


@pytest.mark.parametrize("family", MOE)
def test_param_and_active_param_counts_equal_the_loaded_models(family: str) -> None:
    """Counted from the config (teacher and pruned shapes) = counted on the model: all parameters, and those a
    token uses (everything but the experts it is not routed to: (E - top-k) / E of the expert tensors)."""
    from sapling.prune.search import count_active_params, count_params
    from sapling.prune.select import resolve_target, target_config

    teacher = make_moe(family)
    field = "moe_intermediate_size" if family == "qwen3_moe" else "intermediate_size"
    for target in ({}, {"num_experts": 3, field: 16, "hidden_size": 32 if family == "olmoe" else 48,
                        "num_hidden_layers": 2, **({"num_attention_heads": 2} if family == "olmoe" else {})},
                   {"num_experts": 1}):
        shape = resolve_target(teacher.config, target)
        model = AutoModelForCausalLM.from_config(target_config(teacher.config, shape))
        total = sum(p.numel() for p in model.parameters())
        experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
        e, k = model.config.num_experts, model.config.num_experts_per_tok
        assert count_params(teacher.config, shape) == total == count_parameters(model)
        assert count_active_params(teacher.config, shape) == total - experts * (e - k) // e
        assert count_active_params(model.config) == count_active_params(teacher.config, shape)


def test_router_aux_loss_is_the_models_own(tokenizer) -> None:
    """The step's load-balancing term equals the HF model's `aux_loss` (output_router_logits=True) and is
    weighted by distill.router_aux_weight (null: router_aux_loss_coef; 0: off)."""
    from types import SimpleNamespace

    from sapling.distill.step import loss_on_batch

    teacher, student = make_moe("mixtral", 0).train(), make_moe("mixtral", 1).train()
    x = ids()
    cfg = dict(kd_weight=1.0, ce_weight=0.0, divergence="forward_kl", beta=0.5, temperature=1.0, chunk_size=None)
    with torch.no_grad():
        hf_aux = float(student(input_ids=x, labels=x, output_router_logits=True).aux_loss)
    base, parts0 = loss_on_batch(student, teacher, {"input_ids": x, "labels": x},
                                 SimpleNamespace(**cfg, router_aux_weight=0.0))
    assert "aux" not in parts0
    for weight, expect in ((None, student.config.router_aux_loss_coef), (0.5, 0.5)):
        loss, parts = loss_on_batch(student, teacher, {"input_ids": x, "labels": x},
                                    SimpleNamespace(**cfg, router_aux_weight=weight))
        assert float(parts["aux"]) == pytest.approx(hf_aux, rel=1e-6)
        assert float((loss - base).detach()) == pytest.approx(expect * hf_aux, rel=1e-4)
    loss.backward()
    assert student.model.layers[0].mlp.gate.weight.grad.abs().sum() > 0


QUIET = ("logger=none", "trainer.progress=false", "data.seq_len=32", "prune.calibration.samples=8",
         "prune.calibration.batch_size=4", "trainer.micro_batch_size=2", "trainer.eval_batches=1")


@pytest.fixture(scope="module")
def moe_teacher(tmp_path_factory, tokenizer) -> Any:
    from sapling.models import save_hf_checkpoint

    torch.manual_seed(0)
    cfg = tiny_config("qwen3-moe-tiny", vocab_size=len(tokenizer), num_hidden_layers=3, num_experts=8)
    return save_hf_checkpoint(AutoModelForCausalLM.from_config(cfg), tokenizer,
                              tmp_path_factory.mktemp("moe_teacher") / "model")


def test_moe_teacher_pruned_and_distilled_end_to_end(cli_in_process, tmp_path, moe_teacher, text_files):
    """`sapling distill hooks.pre=[prune]` on a Qwen3-MoE teacher: experts, expert width, hidden and depth cut
    by calibrated importance, distilled with the router loss logged, saved and reloaded with exact dims."""
    out = tmp_path / "kd"
    files = "[" + ",".join(str(p) for p in text_files) + "]"
    res = cli_in_process("distill", f"teacher.path={moe_teacher}", f"data.files={files}", *QUIET, "hooks.pre=[prune]",
                         "prune.target.num_experts=4", "prune.target.moe_intermediate_size=16",
                         "prune.target.hidden_size=48", "prune.target.num_hidden_layers=2", "trainer.max_steps=3",
                         "trainer.log_every=1", f"hydra.run.dir={out}")
    assert res.returncode == 0, res.stderr[-3000:]
    student, info = AutoModelForCausalLM.from_pretrained(out / "model", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    s = student.config
    assert (s.num_experts, s.moe_intermediate_size, s.hidden_size, s.num_hidden_layers) == (4, 16, 48, 2)
    assert student.generate(torch.tensor([[5, 6, 7, 8]]), max_new_tokens=4, do_sample=False).shape == (1, 8)
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["event"] == "train"]
    assert len(train) == 3 and all(r["router_aux"] > 0 for r in train)
    prune = next(r for r in records if r["event"] == "prune")
    assert (prune["teacher_num_experts"], prune["student_num_experts"]) == (8, 4)


def test_active_param_budget_is_searched_and_met(cli_in_process, tmp_path, moe_teacher, text_files):
    from sapling.prune.search import count_active_params

    teacher_cfg = AutoModelForCausalLM.from_pretrained(moe_teacher).config
    budget = count_active_params(teacher_cfg) * 6 // 10
    out = tmp_path / "p"
    files = "[" + ",".join(str(p) for p in text_files) + "]"
    res = cli_in_process("prune", f"teacher.path={moe_teacher}", f"data.files={files}", *QUIET,
                         f"prune.target.active_params={budget}", "prune.search.tolerance=0.05",
                         "prune.search.max_candidates=4", f"hydra.run.dir={out}")
    assert res.returncode == 0, res.stderr[-3000:]
    student = AutoModelForCausalLM.from_pretrained(out / "model")
    assert abs(count_active_params(student.config) / budget - 1) <= 0.05
    assert "experts" in (out / "prune_search.md").read_text()


def test_moe_target_mistakes_are_refused_in_one_line(cli_in_process, tmp_path, moe_teacher, text_files):
    args = ("prune", f"teacher.path={moe_teacher}", f"data.files=[{','.join(map(str, text_files))}]", *QUIET)
    res = cli_in_process(*args, "prune.target.intermediate_size=64", f"hydra.run.dir={tmp_path / 'a'}")
    assert res.returncode == 2 and "prune.target.intermediate_size=64" in res.stderr
    assert "moe_intermediate_size" in res.stderr
    res = cli_in_process(*args, "prune.target.num_experts=9", f"hydra.run.dir={tmp_path / 'b'}")
    assert res.returncode == 2 and "prune.target.num_experts=9" in res.stderr and "teacher's 8" in res.stderr
    res = cli_in_process(*args, "prune.target.num_experts=4", "prune.importance=magnitude",
                         f"hydra.run.dir={tmp_path / 'c'}")
    assert res.returncode == 2 and "prune.importance=" in res.stderr and "not the experts" in res.stderr
    assert "Loading weights" not in res.stderr  # refused before the teacher loads


def test_quantizing_an_moe_model_is_refused_before_it_loads(cli_in_process, tmp_path, moe_teacher, text_files):
    """Its fused experts would stay 16-bit and the compressed-tensors export does not reload in transformers:
    refused in one line (sapling quantize, and hooks.post=[quantize] on an MoE teacher)."""
    res = cli_in_process("quantize", f"model.path={moe_teacher}", f"data.files=[{text_files[0]}]",
                         f"output_dir={tmp_path / 'q'}")
    assert res.returncode == 2 and "model.path=" in res.stderr and "mixture-of-experts" in res.stderr
    res = cli_in_process("distill", f"teacher.path={moe_teacher}", f"data.files=[{text_files[0]}]", "hooks.pre=[prune]",
                         "prune.target.num_experts=4", "hooks.post=[quantize]", f"output_dir={tmp_path / 'd'}")
    assert res.returncode == 2 and "teacher.path=" in res.stderr and "mixture-of-experts" in res.stderr
    assert not (tmp_path / "q").exists() and not (tmp_path / "d").exists()
