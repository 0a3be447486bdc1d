"""Sapling's stages on the real SmolLM2-135M (issue 19, item 3): real shapes (9 query / 3 KV heads, head_dim 64,
hidden 576, vocab 49,152, tied embeddings) and real weights, where toy models can hide what breaks.

- pruning on every `prune.target` axis and to a parameter budget: the saved model loads back with
  `AutoModelForCausalLM.from_pretrained` with exactly the target shape and parameter count, and generates;
  a hidden size the 9 query heads do not divide is refused before any weight loads;
- 10 distillation steps of the training loop lower the KD loss of a half-depth student;
- GPTQ (w4, groups of 64) raises the held-out loss less than round-to-nearest on the same linears;
- a top-64 teacher cache at V=49,152 gives back the teacher's own top-64 indices and log-probs.

Each test uses the library functions the commands run, with tiny calibration and short sequences (CPU time),
on copies of the session's model (never the shared fixture itself). Text: the held-out stdlib file, split into a
"training" part (calibration, distillation batches) and a validation part.
"""

from __future__ import annotations

import copy
import math
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig
from transformers import AutoModelForCausalLM

from sapling.config import register_configs
from sapling.data.blocks import PackedBlocks, PackedData
from sapling.models import count_parameters, save_hf_checkpoint

CPU = torch.device("cpu")
TRAIN_TOKENS = 2560  # the held-out file's first tokens are the "training" split (calibration), the rest validation
SEQ = 64  # block length of calibration, pruning and distillation batches
# calibration: 2 batches of one 64-token block; validation and ranking of budget candidates: one such batch;
# distillation: micro-batches of 2 blocks
TINY = ["prune.calibration.samples=2", "prune.calibration.batch_size=1", "prune.search.eval_batches=1",
        "eval.micro_batch_size=1", "trainer.eval_batches=1", "trainer.micro_batch_size=2"]


def _cfg(output_dir: Path, *overrides: str) -> DictConfig:
    """Sapling's composed config (the commands' defaults) with `overrides`, as the CLI would build it."""
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(files("sapling.conf")), version_base=None):
        return compose(config_name="config", overrides=["command=distill", f"output_dir={output_dir}",
                                                        "logger=none", "trainer.progress=false", *overrides])


def _blocks(tokens: np.ndarray, seq_len: int, count: int | None = None) -> PackedBlocks:
    """The first `count` blocks of `seq_len` tokens of a token stream (all whole blocks when None)."""
    blocks = PackedBlocks(tokens, seq_len)
    return blocks if count is None else blocks[:count]


class _Records:
    """A metrics sink keeping the records in memory (the training loop's losses are read from them)."""

    path = None
    run_id = None

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def log(self, record: dict[str, Any]) -> None:
        self.rows.append(dict(record))

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def tokens(smollm2, held_out_text) -> np.ndarray:
    """The held-out file tokenized with SmolLM2's own tokenizer (~3,300 tokens)."""
    _, tokenizer = smollm2
    ids = tokenizer(held_out_text.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    assert len(ids) >= TRAIN_TOKENS + 5 * 128, len(ids)
    return np.asarray(ids, dtype=np.int32)


@pytest.fixture(scope="module")
def data(tokens) -> PackedData:
    """Packed 64-token blocks: training (calibration) and validation splits of the held-out file."""
    return PackedData(train=_blocks(tokens[:TRAIN_TOKENS], SEQ), val=_blocks(tokens[TRAIN_TOKENS:], SEQ),
                      fingerprint="held-out-json-decoder")


@pytest.fixture(scope="module")
def teacher(smollm2) -> torch.nn.Module:
    """This module's own copy of the teacher (the training loop freezes it; nothing else may change it)."""
    return copy.deepcopy(smollm2[0])


@pytest.fixture(scope="module")
def scores_path(teacher, data, tmp_path_factory) -> Path:
    """Activation importance of the teacher from 2 calibration batches of 64 tokens, computed once as
    `sapling prune` does and saved, so each pruning target reuses it (`prune.scores=`)."""
    from sapling.prune.plan import importance_for

    out = tmp_path_factory.mktemp("scores")
    scores = importance_for(_cfg(out, *TINY), teacher, data, CPU)
    assert scores.num_tokens == 2 * SEQ
    assert scores.heads.shape == (30, 9) and scores.kv_groups.shape == (30, 3) and scores.hidden.shape == (576,)
    assert torch.isfinite(scores.block_influence).all() and torch.isfinite(scores.mlp).all()
    return scores.save(out / "prune_scores.pt")


def _prune(teacher: torch.nn.Module, data: PackedData, out: Path, scores: Path, *overrides: str) -> Any:
    """`sapling prune`'s path: the early target check, then `prune_teacher` (with the saved scores)."""
    from sapling.prune.plan import prune_teacher
    from sapling.recipes.common import check_prune_target

    cfg = _cfg(out, *TINY, f"prune.scores={scores}", *overrides)
    check_prune_target(cfg, teacher.config)
    return prune_teacher(cfg, teacher, data, CPU, out, _Records())


def _check_layer_shapes(model: torch.nn.Module, shape: dict[str, int]) -> None:
    """Every decoder layer's weights have the shape's widths (head_dim stays 64)."""
    h, i, q, kv = (shape[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                      "num_key_value_heads"))
    assert len(model.model.layers) == shape["num_hidden_layers"]
    assert model.model.embed_tokens.weight.shape == (49152, h)
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        assert attn.q_proj.weight.shape == (q * 64, h) and attn.o_proj.weight.shape == (h, q * 64)
        assert attn.k_proj.weight.shape == (kv * 64, h) and attn.v_proj.weight.shape == (kv * 64, h)
        assert mlp.gate_proj.weight.shape == (i, h) and mlp.up_proj.weight.shape == (i, h)
        assert mlp.down_proj.weight.shape == (h, i)
        assert layer.input_layernorm.weight.shape == (h,)


TEACHER_SHAPE = {"num_hidden_layers": 30, "hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9,
                 "num_key_value_heads": 3}


# Each width axis is cut on its own, on a 6-layer cut of the teacher: saving, loading and running 30-layer models
# six times would take most of the CPU budget, and depth alone is covered by the first case and the budget search.
@pytest.mark.parametrize("target", [
    {"num_hidden_layers": 20},
    {"num_hidden_layers": 6, "hidden_size": 432},  # a multiple of the 9 query heads: LlamaConfig refuses others
    {"num_hidden_layers": 6, "intermediate_size": 1024},
    {"num_hidden_layers": 6, "num_attention_heads": 6},  # 2 of the 3 query heads in each of the 3 KV groups
    {"num_hidden_layers": 6, "num_key_value_heads": 1},  # one KV group, with its 3 query heads
    {"params": 60_000_000},  # a parameter budget: candidate shapes searched and ranked by held-out loss
], ids=["layers", "hidden", "mlp", "heads", "kv_heads", "params"])
def test_pruned_model_saves_loads_with_target_shape_and_generates(target, teacher, data, scores_path, smollm2,
                                                                  tmp_path):
    from sapling.prune.search import count_params
    from sapling.prune.select import TARGET_FIELDS

    _, tokenizer = smollm2
    overrides = [f"prune.target.{k}={v}" for k, v in target.items()]
    if "params" in target:
        overrides += ["prune.search.max_candidates=2"]
    outcome = _prune(teacher, data, tmp_path, scores_path, *overrides)
    shape = outcome.shape
    if "params" in target:
        budget = target["params"]
        assert outcome.search_rows and len(outcome.search_rows) <= 2
        assert abs(count_params(teacher.config, shape) - budget) <= 0.01 * budget, shape
    else:
        expected = dict(TEACHER_SHAPE, **target)
        if "num_key_value_heads" in target:  # query heads follow the kept KV groups
            expected["num_attention_heads"] = 3 * target["num_key_value_heads"]
        assert shape == expected
    assert shape != TEACHER_SHAPE

    model_dir = save_hf_checkpoint(outcome.student, tokenizer, tmp_path / "model")
    loaded = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    assert {k: getattr(loaded.config, k) for k in TARGET_FIELDS} == shape
    assert loaded.config.head_dim == 64 and loaded.config.vocab_size == 49152
    assert loaded.config.tie_word_embeddings and loaded.lm_head.weight is loaded.model.embed_tokens.weight
    _check_layer_shapes(loaded, shape)
    params = count_parameters(loaded)
    assert params == count_params(teacher.config, shape) == count_parameters(outcome.student)
    assert params < count_parameters(teacher)
    saved = outcome.student.state_dict()
    for name, tensor in loaded.state_dict().items():  # the weights the pruner cut, bit for bit
        assert torch.equal(tensor, saved[name]), name

    prompt = data.val[0][:16].unsqueeze(0)
    with torch.no_grad():
        out = loaded.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, min_new_tokens=4,
                              do_sample=False, pad_token_id=tokenizer.eos_token_id, output_logits=True,
                              return_dict_in_generate=True)
    assert out.sequences.shape == (1, 20) and torch.equal(out.sequences[:, :16], prompt)
    assert int(out.sequences.max()) < 49152
    assert len(out.logits) == 4 and all(x.shape == (1, 49152) and torch.isfinite(x).all() for x in out.logits)


def test_prune_target_hidden_size_must_be_a_multiple_of_the_9_heads(smollm2_dir):
    """LlamaConfig refuses a hidden size the 9 query heads do not divide (even with head_dim given), so such a
    target fails in the command's early check, before any weight loads, naming the nearest sizes that work."""
    from transformers import AutoConfig

    from sapling.errors import ConfigError
    from sapling.prune.select import check_prune_shape

    config = AutoConfig.from_pretrained(smollm2_dir)
    with pytest.raises(ConfigError, match=r"^prune\.target\.hidden_size=512: .*504 or 513"):
        check_prune_shape(config, {"hidden_size": 512})
    assert check_prune_shape(config, {"hidden_size": 504})["hidden_size"] == 504


def test_ten_distillation_steps_lower_the_kd_loss(teacher, data, scores_path, smollm2, tmp_path):
    """The training loop of `sapling distill` (`fit`: fused KD loss, AdamW) on a student pruned to half the
    layers, one micro-batch of 2 x 64 held-out tokens per step (the same two blocks each step: the loss must
    fall on what the student is shown, so the gradients through the fused loss are the right ones)."""
    from sapling.train.loop import fit

    _, tokenizer = smollm2
    student = _prune(teacher, data, tmp_path / "prune", scores_path, "prune.target.num_hidden_layers=15").student
    assert student.config.num_hidden_layers == 15
    cfg = _cfg(tmp_path, *TINY, "trainer.max_steps=10", "trainer.log_every=1", "trainer.eval_every=0",
               "trainer.save_every=0", "trainer.warmup_steps=1", "trainer.lr=3e-4", "trainer.resume=false")
    assert cfg.distill.kd_weight > 0 and cfg.distill.ce_weight == 0  # the loss is the KD loss alone
    train = PackedData(train=data.train[:2], val=data.val[:2], fingerprint=data.fingerprint)
    records = _Records()
    torch.manual_seed(0)
    result = fit(cfg, student=student, teacher=teacher, tokenizer=tokenizer, data=train, output_dir=tmp_path,
                 metrics=records, device=CPU, save_model=False)
    kd = [r["kd"] for r in records.rows if r["event"] == "train"]
    assert len(kd) == 10 and all(math.isfinite(x) for x in kd), kd
    assert np.mean(kd[-3:]) < 0.7 * kd[0], kd
    assert math.isfinite(result.final_val["loss"])


def test_gptq_raises_heldout_loss_less_than_rtn(smollm2, tokens, tmp_path):
    """w4 groups of 64 (576 = 9 x 64; 128 does not divide it) on the linears of decoder layers 0-3 only (GPTQ of
    all 30 takes minutes on a CPU); held-out loss on the same 5 x 128-token windows before and after."""
    from sapling.data.calibration import calibration_batches
    from sapling.eval.perplexity import evaluate_lm
    from sapling.quant.layerwise import quantize_model
    from sapling.quant.numerics import spec_from_config

    cfg = _cfg(tmp_path, "quant.group_size=64", "quant.calibration.samples=8", "quant.calibration.batch_size=4")
    spec = spec_from_config(cfg.quant)
    assert (spec.bits, spec.group_size) == (4, 64)
    ignore = [*cfg.quant.ignore, r"re:model\.layers\.([4-9]|[12]\d)\."]  # keep layers 4-29 16-bit
    train, val = _blocks(tokens[:TRAIN_TOKENS], 128), _blocks(tokens[TRAIN_TOKENS:], 128, 5)
    c = cfg.quant.calibration
    batches = [b["input_ids"] for b in calibration_batches(train, c.samples, c.batch_size, CPU, seed=cfg.seed)]
    q = cfg.quant

    def loss(model: torch.nn.Module) -> float:
        return evaluate_lm(model, val, micro_batch_size=len(val), device=CPU)["loss"]

    model = smollm2[0]
    rtn, gptq = copy.deepcopy(model), copy.deepcopy(model)
    before = loss(gptq)
    res_rtn = quantize_model(rtn, spec, method="rtn", ignore=ignore, progress=False)
    res_gptq = quantize_model(gptq, spec, method="gptq", batches=batches, ignore=ignore, block_size=q.block_size,
                              damp=q.damp, act_order=q.act_order, progress=False)
    quantized = {f"model.layers.{i}.{m}" for i in range(4) for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj")}
    assert set(res_rtn.weights) == set(res_gptq.weights) == quantized
    ints, scales = res_gptq.weights["model.layers.0.mlp.down_proj"]
    assert ints.shape == (576, 1536) and scales.shape == (576, 24) and -8 <= int(ints.min()) <= int(ints.max()) <= 7
    original = model.model.layers
    assert torch.equal(gptq.model.layers[4].mlp.down_proj.weight, original[4].mlp.down_proj.weight)  # left 16-bit
    assert not torch.equal(gptq.model.layers[0].mlp.down_proj.weight, original[0].mlp.down_proj.weight)

    after_rtn, after_gptq = loss(rtn), loss(gptq)
    rise_rtn, rise_gptq = after_rtn - before, after_gptq - before
    assert rise_rtn > 0 and rise_gptq > 0, (before, after_rtn, after_gptq)
    assert rise_gptq < 0.5 * rise_rtn, (before, after_rtn, after_gptq)


def test_top64_teacher_cache_round_trips_at_v49152(smollm2, smollm2_dir, tokens, tmp_path):
    """`sapling cache-teacher`'s writer and a student run's reader on 2 sequences of 32 tokens: the records give
    back the teacher's own top-64 (its log_softmax over all 49,152 logits) up to the 12-bit value step. The
    session's model is only read here (forward passes), so it is not copied."""
    from sapling.data.cache import tokenizer_hash
    from sapling.distill.teacher_cache import DEFAULT_TOP_K, CachePlan, TeacherCache, write_teacher_cache
    from sapling.distill.topk_format import RecordLayout

    model, tokenizer = smollm2
    k, seq_len = DEFAULT_TOP_K, 32
    assert k == 64
    train = _blocks(tokens[:TRAIN_TOKENS], seq_len, 2)
    data = PackedData(train=train, val=_blocks(tokens[TRAIN_TOKENS:], seq_len, 1), fingerprint="held-out")
    layout = RecordLayout(k, model.config.vocab_size)
    assert layout.index_bits == 16 and layout.record_bytes == 226  # 64 x (16 + 12) + 12 bits
    plan = CachePlan(data_fingerprint=data.fingerprint, tokenizer_hash=tokenizer_hash(tokenizer),
                     teacher_hash="smollm2", teacher_source=str(smollm2_dir), top_k=k, temperature=1.0,
                     layout=layout, seq_len=seq_len, num_sequences=2, num_val_sequences=1, shard_sequences=256,
                     token_dtype=train.array.dtype.str)
    root = tmp_path / "cache"
    write_teacher_cache(root, teacher=model, data=data, tokenizer=tokenizer, plan=plan, micro_batch_size=2,
                        device=CPU, lockstep=False, progress=False)

    cache = TeacherCache(root)  # sha256 of every shard checked
    assert (cache.top_k, cache.num_sequences, cache.seq_len) == (64, 2, 32)
    blocks = cache.packed_data().train
    batch = blocks.decode(blocks.get_batch([0, 1]))
    ids = train.get_batch([0, 1])
    assert torch.equal(batch["input_ids"], ids)
    got_lp, got_idx = batch["teacher_lp"], batch["teacher_idx"]
    assert got_lp.shape == got_idx.shape == (2 * 31, 64) and got_lp.dtype == torch.float32

    with torch.no_grad():  # the teacher's own distribution, from its full logits
        ref = torch.log_softmax(model(ids).logits[:, :-1].float(), dim=-1).flatten(0, 1)
    top = ref.topk(k + 1, dim=-1)
    ref_idx = top.indices[:, :k]
    # Rows whose 64th and 65th log-probs are within float rounding may keep either token: only others compare.
    clear = (top.values[:, k - 1] - top.values[:, k]) > 1e-4
    assert clear.float().mean() > 0.9
    assert torch.equal(got_idx[clear].sort(dim=-1).values, ref_idx[clear].sort(dim=-1).values)
    assert (got_idx == ref_idx).float().mean() > 0.99  # in the teacher's order (near-ties aside)
    # Values: 12-bit codes of -log p up to max_nll (step 0.0078 nats, half a step of rounding), renormalised
    # per token against the stored tail mass (within another step).
    want = ref.gather(1, got_idx).clamp(min=-layout.max_nll)
    torch.testing.assert_close(got_lp, want, rtol=0, atol=2 * layout.step)
    head_mass = torch.logsumexp(top.values[:, :k], dim=-1)  # log of the top-64's probability mass
    torch.testing.assert_close(torch.logsumexp(got_lp, dim=-1), head_mass, rtol=0, atol=2 * layout.step)
