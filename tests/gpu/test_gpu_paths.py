"""The device paths a CPU cannot check, on one CUDA GPU (marked `gpu`: deselected by default).

Run with `python -m pytest -q -m gpu` (benchmarks/gpu_acceptance.sh does). Each test compares the CUDA run with
a float64 or CPU reference on fresh random inputs, with explicit tolerances, and takes seconds on an H100/H200:

- the compiled Triton KD chunk kernel at a real-ish shape (N=512, Hs=576, Ht=960, V=49,152, bf16): loss and
  gradients against float64 and against the torch chunk path on the same GPU;
- LocalEngine in bf16 on CUDA: fp32 master weights on the device keep updates that bf16 rounds away, and a
  checkpoint resumes bit-exactly;
- feature distillation (a learned projection between widths) in the distillation step on CUDA in bf16 against
  the same step in float64 on the CPU, and through `sapling distill` on CUDA with a pruned student;
- the teacher cache: written by `sapling cache-teacher` on the GPU, decoded on CUDA exactly as on the CPU, its
  top-k the teacher's (float64 CPU forward), and the top-k loss on CUDA against float64;
- GPTQ with `offload`: one decoder layer on the GPU at a time gives exactly the GPU-resident result, the model
  ends on the CPU, and it agrees with the CPU quantization;
- the prune hook with a ZeRO-3 teacher on one CUDA rank (a `python -m sapling` process: DeepSpeed's process group
  stays out of pytest's) against the same run without DeepSpeed.

Without CUDA every test fails with one line saying so (they are meant to run where a GPU is).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from sapling.kernels import LogitTransform

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")
IGNORE = -100


@pytest.fixture(scope="session", autouse=True)
def _needs_cuda() -> None:
    """Fail (not skip) without a GPU: these tests were selected on purpose (`-m gpu`). Session-scoped, so it runs
    before the session fixtures that build models and caches."""
    if not torch.cuda.is_available():
        pytest.fail(f"gpu tests need a CUDA device; torch {torch.__version__} (CUDA build: {torch.version.cuda}) "
                    "sees none: run them on a GPU machine, or deselect them with -m 'not gpu'", pytrace=False)


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref||, in float64 on the CPU."""
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    return float((x - ref).norm() / ref.norm().clamp_min(1e-300))


def records(out: Path, event: str | None = None) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if event is None or r["event"] == event]


# ------------------------------------------------------------------------------------------------------------
# the Triton KD chunk kernel at a real shape
# ------------------------------------------------------------------------------------------------------------

N, HS, HT, V = 512, 576, 960, 49152  # SmolLM2-135M's student width and vocabulary; a wider teacher


def kd_inputs(device: torch.device | str, seed: int = 0) -> dict[str, torch.Tensor]:
    """bf16 inputs with logits of std ~2 (peaked but not one-hot) and 10% ignored labels."""
    g = torch.Generator().manual_seed(seed)
    x = {"h_s": torch.randn(N, HS, generator=g), "w_s": torch.randn(V, HS, generator=g) * (2.0 / HS**0.5),
         "h_t": torch.randn(N, HT, generator=g), "w_t": torch.randn(V, HT, generator=g) * (2.5 / HT**0.5)}
    out = {k: v.to(device=device, dtype=torch.bfloat16) for k, v in x.items()}
    labels = torch.randint(0, V, (N,), generator=g)
    labels[torch.rand(N, generator=g) < 0.1] = IGNORE
    out["labels"] = labels.to(device)
    return out


def kd_reference64(x: dict[str, torch.Tensor], *, divergence: str, beta: float, temperature: float,
                   ce_weight: float, student_logit_transform: Any = None,
                   teacher_logit_transform: Any = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, d h_s, d W_s) in float64 on the CPU from the definition (autograd), on the same bf16 inputs; the
    logit transforms (softcap / scale) applied to the float64 logits."""
    h = x["h_s"].cpu().double().requires_grad_(True)
    w = x["w_s"].cpu().double().requires_grad_(True)
    labels = x["labels"].cpu()
    valid = labels != IGNORE
    z_s = h @ w.T
    with torch.no_grad():
        z_t = x["h_t"].cpu().double() @ x["w_t"].cpu().double().T
    if student_logit_transform is not None:
        z_s = student_logit_transform(z_s)
    if teacher_logit_transform is not None:
        z_t = teacher_logit_transform(z_t)
    t = temperature
    lp_s, lp_t = torch.log_softmax(z_s / t, -1), torch.log_softmax(z_t / t, -1)
    p_s, p_t = lp_s.exp(), lp_t.exp()
    if divergence == "forward_kl":
        d = (p_t * (lp_t - lp_s)).sum(-1)
    elif divergence == "reverse_kl":
        d = (p_s * (lp_s - lp_t)).sum(-1)
    else:
        log_m = torch.logaddexp(math.log(beta) + lp_t, math.log(1 - beta) + lp_s)
        d = beta * (p_t * (lp_t - log_m)).sum(-1) + (1 - beta) * (p_s * (lp_s - log_m)).sum(-1)
    ce = -torch.log_softmax(z_s, -1).gather(1, labels.clamp_min(0)[:, None])[:, 0]
    rows = t * t * d + ce_weight * ce
    loss = torch.where(valid, rows, 0.0).sum() / valid.sum()
    loss.backward()
    return loss.detach(), h.grad, w.grad


def fused_kd(x: dict[str, torch.Tensor], **kw: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, d h_s, d W_s) of `fused_linear_kd_loss` on fresh leaves of `x`."""
    from sapling.kernels import fused_linear_kd_loss

    h = x["h_s"].clone().requires_grad_(True)
    w = x["w_s"].clone().requires_grad_(True)
    loss = fused_linear_kd_loss(h, w, x["h_t"], x["w_t"], labels=x["labels"], **kw)
    loss.backward()
    return loss.detach(), h.grad, w.grad


# Errors of the bf16 pipeline (bf16 logits, a bf16 gradient for the matmuls) against float64 on these inputs,
# measured with the torch chunk path in bf16 on the CPU: loss 4e-6 to 2e-5; gradients 2e-3 to 3e-3, and 1.1e-2
# (d h) / 1.5e-2 (d W) for forward KL at T=1 (the most peaked case). The bounds leave ~3x room; the Triton kernel
# computes the same float32 function of the same bf16 logits. A wrong scale, sign or row is an O(1) error.
TOL_VS_FLOAT64 = {"loss": 5e-4, "grad_h": 4e-2, "grad_w": 4e-2}
# Triton vs the torch path on the same bf16 logits: float32 sums in another order (the loss), and for the
# gradients the bf16 rounding of float32 values computed in another order, a few of which land on the other side.
TOL_TRITON_VS_TORCH = {"loss": 1e-4, "grad_h": 5e-3, "grad_w": 5e-3}
KD_CASES = {
    "forward_kl-T1-chunks": dict(divergence="forward_kl", beta=0.5, temperature=1.0, ce_weight=0.0, chunk_size=96),
    "reverse_kl-T2-ce": dict(divergence="reverse_kl", beta=0.5, temperature=2.0, ce_weight=0.2, chunk_size=None),
    "jsd-ce-device-count": dict(divergence="jsd", beta=0.3, temperature=1.0, ce_weight=0.2, chunk_size=200,
                                count_on_device=True),
    # Gemma-style softcap on the student (saturating at these logits), a Granite-style scale on the teacher
    "softcap-forward_kl-ce": dict(divergence="forward_kl", beta=0.5, temperature=1.0, ce_weight=0.2, chunk_size=128,
                                  student_logit_transform=LogitTransform(softcap=3.0),
                                  teacher_logit_transform=LogitTransform(scale=0.5)),
}


@pytest.mark.parametrize("case", list(KD_CASES))
def test_triton_kd_kernel_matches_float64_and_the_torch_path(case, monkeypatch):
    from sapling.kernels import chunk_triton, fused_kd_loss

    kw = dict(KD_CASES[case])
    count_on_device = kw.pop("count_on_device", False)
    assert not chunk_triton._INTERPRETED, "TRITON_INTERPRET is set: the GPU tests need the compiled kernel"
    triton_fn = fused_kd_loss._triton_chunk_fn()
    assert triton_fn is not None, "the Triton chunk kernel did not import: the CUDA path would fall back to torch"
    calls = []

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(args[0].shape)
        return triton_fn(*args, **kwargs)

    x = kd_inputs(CUDA, seed=len(case))
    ref = kd_reference64(x, **{k: kw[k] for k in ("divergence", "beta", "temperature", "ce_weight",
                                                    "student_logit_transform", "teacher_logit_transform") if k in kw})
    if count_on_device:  # the trainer's form: the global count as a device tensor (no host sync)
        kw["num_valid_tokens"] = (x["labels"] != IGNORE).sum()
    monkeypatch.setattr(fused_kd_loss, "_triton_chunk_fn", lambda: spy)
    got = fused_kd(x, **kw)
    assert calls, "the Triton kernel was not called"
    if kw["chunk_size"]:
        assert len(calls) == math.ceil(int((x["labels"] != IGNORE).sum()) / kw["chunk_size"]) > 1
    monkeypatch.setattr(fused_kd_loss, "_triton_chunk_fn", lambda: None)
    torch_path = fused_kd(x, **kw)

    names = ("loss", "grad_h", "grad_w")
    for name, a, b, r in zip(names, got, torch_path, ref):
        assert a.device.type == "cuda" and bool(torch.isfinite(a).all()), name
        assert a.dtype == (torch.float32 if name == "loss" else torch.bfloat16), (name, a.dtype)
        assert rel(a, r) <= TOL_VS_FLOAT64[name], (case, name, "triton vs float64", rel(a, r))
        assert rel(b, r) <= TOL_VS_FLOAT64[name], (case, name, "torch path vs float64", rel(b, r))
        assert rel(a, b) <= TOL_TRITON_VS_TORCH[name], (case, name, "triton vs torch path", rel(a, b))
    valid = x["labels"] != IGNORE
    assert bool((got[1][~valid] == 0).all()), "ignored rows must get a zero gradient"


# ------------------------------------------------------------------------------------------------------------
# LocalEngine: bf16 module, fp32 master weights, on CUDA
# ------------------------------------------------------------------------------------------------------------

DIM, STEPS = 64, 30


def _trainer(**kw: Any) -> SimpleNamespace:
    base = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.95, "weight_decay": 0.0, "warmup_steps": 0, "max_steps": STEPS,
            "min_lr_ratio": 1.0, "grad_clip": 1.0}
    return SimpleNamespace(**{**base, **kw})


def _linear(dtype: torch.dtype) -> torch.nn.Linear:
    """Weights in [1, 2), where bf16's rounding step is 2**-7: an AdamW step of ~lr=1e-3 rounds away."""
    torch.manual_seed(0)
    model = torch.nn.Linear(DIM, DIM, bias=False)
    with torch.no_grad():
        model.weight.copy_(1 + torch.rand(DIM, DIM))
    return model.to(dtype)


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    target = _linear(torch.float32).weight.detach() - 0.05  # each weight wants to move down by 0.05
    xs = [torch.randn(128, DIM, generator=g) for _ in range(n)]
    return [(x, x @ target.T) for x in xs]


def _train(engine: Any, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[float]:
    p = next(engine.module.parameters())
    losses = []
    for x, y in batches:
        loss = F.mse_loss(engine.module(x.to(p.device, p.dtype)).float(), y.to(p.device))
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
    return losses


def test_local_engine_bf16_on_cuda_updates_fp32_masters_and_resumes_exactly(tmp_path):
    from sapling.train.engine import LocalEngine

    batches = _batches(STEPS)
    ref = LocalEngine(_linear(torch.float32), _trainer())  # fp32 on the CPU
    low = LocalEngine(_linear(torch.bfloat16), _trainer(), device="cuda")
    init = _linear(torch.float32).weight.detach()
    ref_losses, low_losses = _train(ref, batches), _train(low, batches)
    (param, master), = low.master.pairs
    assert param.device.type == master.device.type == "cuda"
    assert param.dtype == torch.bfloat16 and master.dtype == torch.float32
    state = low.optimizer.state[master]
    assert state["exp_avg"].device.type == "cuda" and state["exp_avg"].dtype == torch.float32
    assert param.grad is None and master.grad is None  # moved to the master, then cleared
    moved_ref = ref.module.weight.detach() - init
    moved_low = param.detach().float().cpu() - init
    assert moved_ref.abs().mean() > 0.02
    # AdamW on the bf16 weights themselves would leave them where they are (each step < half a rounding step)
    assert moved_low.abs().mean() > 0.8 * moved_ref.abs().mean()
    assert (master.detach().cpu() - ref.module.weight.detach()).abs().max() < 2**-7
    assert torch.equal(param, master.detach().bfloat16())
    ref_end, low_end = sum(ref_losses[-5:]) / 5, sum(low_losses[-5:]) / 5
    assert low_end < 0.5 * sum(low_losses[:5]) / 5
    assert abs(low_end - ref_end) < 0.15 * ref_end, (ref_losses, low_losses)

    # resume on CUDA from a checkpoint (read to the CPU, then onto the engine's device) is bit-exact
    whole = LocalEngine(_linear(torch.bfloat16), _trainer(), device="cuda")
    _train(whole, batches[:8])
    first = LocalEngine(_linear(torch.bfloat16), _trainer(), device="cuda")
    _train(first, batches[:4])
    first.save_checkpoint(tmp_path)
    resumed = LocalEngine(_linear(torch.bfloat16), _trainer(), device="cuda")
    resumed.load_checkpoint(tmp_path)
    _train(resumed, batches[4:8])
    assert torch.equal(resumed.module.weight, whole.module.weight)
    for (_, a), (_, b) in zip(resumed.master.pairs, whole.master.pairs, strict=True):
        assert a.device.type == "cuda" and torch.equal(a, b)


# ------------------------------------------------------------------------------------------------------------
# feature distillation on CUDA
# ------------------------------------------------------------------------------------------------------------

FEAT_VOCAB = 256


def _tiny_llama(layers: int, hidden: int, seed: int) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    from sapling.models import tiny_config

    torch.manual_seed(seed)
    cfg = tiny_config("llama-tiny", vocab_size=FEAT_VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2)
    cfg._attn_implementation = "sdpa"
    return AutoModelForCausalLM.from_config(cfg).eval()


def feature_step(device: torch.device | str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One distillation step's loss parts and gradients (KD + CE + cosine features through a projection from
    hidden 64 to 128), for a 2-layer student and a 4-layer teacher in `dtype` on `device`."""
    from sapling.distill.features import FeatureDistiller, default_layer_map
    from sapling.distill.step import loss_on_batch

    student = _tiny_llama(2, 64, seed=0).to(device, dtype)
    teacher = _tiny_llama(4, 128, seed=1).to(device, dtype)
    with torch.no_grad():  # a random init is near-uniform: sharpen both heads so that the KD term has signal
        student.lm_head.weight.mul_(8.0)
        teacher.lm_head.weight.mul_(8.0)
    fd = FeatureDistiller(64, 128, default_layer_map(2, 4), loss="cosine", weight=0.5, seed=0, device=device,
                          dtype=dtype)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, FEAT_VOCAB, (4, 48), generator=g)
    labels = ids.clone()
    labels[:, :5] = IGNORE
    batch = {"input_ids": ids.to(device), "labels": labels.to(device)}
    cfg = SimpleNamespace(divergence="forward_kl", beta=0.5, temperature=1.0, kd_weight=1.0, ce_weight=0.1,
                          chunk_size=None)
    loss, parts = loss_on_batch(student, teacher, batch, cfg, features=fd)
    loss.backward()
    return {"loss": loss.detach(), "kd": parts["kd"], "ce": parts["ce"], "feat": parts["feat"],
            "grad_proj": fd.proj.grad, "grad_q0": student.model.layers[0].self_attn.q_proj.weight.grad,
            "grad_embed": student.model.embed_tokens.weight.grad}


# bf16 through 2-4 decoder layers vs float64, measured on the CPU in bf16: loss, ce and feat 1e-5 to 7e-5, kd
# 5e-4, gradients 5e-3 to 1e-2. CUDA's bf16 attention and matmul kernels round differently, so the bounds leave
# more room (4x and up), still far below what a wrong layer map, projection or device copy changes (O(1)).
TOL_FEATURES = {"loss": 2e-3, "kd": 1e-2, "ce": 2e-3, "feat": 2e-3, "grad_proj": 4e-2, "grad_q0": 4e-2,
                "grad_embed": 4e-2}


def test_feature_distillation_step_on_cuda_matches_float64():
    got = feature_step(CUDA, torch.bfloat16)
    ref = feature_step("cpu", torch.float64)
    assert float(ref["feat"]) > 0.1 and float(ref["kd"]) > 0.01  # both terms carry signal
    for name, tol in TOL_FEATURES.items():
        assert got[name].device.type == "cuda" and bool(torch.isfinite(got[name]).all()), name
        assert rel(got[name], ref[name]) <= tol, (name, rel(got[name], ref[name]))
    assert got["grad_proj"].dtype == torch.bfloat16  # the projection lives beside the student, in its dtype


def test_distill_on_cuda_bf16_with_prune_hook_and_feature_loss(sapling_main, tmp_path, teacher_dir, text_files):
    """`sapling distill` on the GPU: pruned student (hidden 64 -> 48), bf16 with fp32 masters, features through
    the projection started from the pruned channels, speed and memory records, a bf16 HF checkpoint."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from sapling.train.flops import peak_flops

    out = tmp_path / "run"
    files = "[" + ",".join(str(p) for p in text_files) + "]"
    code, err = sapling_main("distill", f"teacher.path={teacher_dir}", f"data.files={files}", "data.seq_len=32",
                             "hooks.pre=[prune]", "prune.target.hidden_size=48", "prune.target.num_hidden_layers=1",
                             "prune.calibration.samples=16", "distill.features.weight=0.5", "distill.ce_weight=0.1",
                             "trainer.max_steps=6", "trainer.micro_batch_size=4", "trainer.log_every=1",
                             "trainer.eval_every=0", "trainer.eval_batches=1", "logger=none",
                             "trainer.progress=false", f"output_dir={out}")
    assert code == 0, err[-3000:]
    train = records(out, "train")
    assert len(train) == 6
    peak = peak_flops(CUDA, torch.bfloat16)
    for r in train:
        assert all(math.isfinite(r[k]) for k in ("loss", "kd", "ce", "feat")), r
        assert r["feat"] > 0 and abs(r["loss"] - (r["kd"] + 0.1 * r["ce"] + 0.5 * r["feat"])) < 1e-3 * r["loss"], r
        assert r["tokens_per_s"] > 0 and r["tflops_per_device"] > 0 and r["peak_mem_gib"] > 0, r
        assert "peak_rss_gib" not in r  # the CUDA branch of the speed record
        if peak is not None:  # a known accelerator (A100/H100/H200): MFU is reported
            assert 0 < r["mfu_step"] < 1 and 0 < r["mfu_student"] <= r["mfu_step"], r
    assert len(records(out, "prune")) == 1
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert model.config.hidden_size == 48 and model.config.num_hidden_layers == 1
    with safe_open(str(next((out / "model").glob("*.safetensors"))), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}  # noqa: SIM118 (not iterable); bf16


# ------------------------------------------------------------------------------------------------------------
# the teacher cache on CUDA
# ------------------------------------------------------------------------------------------------------------


def test_teacher_cache_written_and_decoded_on_cuda(teacher_cache, teacher_dir):
    """The fixture's `sapling cache-teacher` ran on this GPU (bf16 teacher); its records decode on CUDA as on the
    CPU, hold the float64 teacher's top-k and tail mass (up to bf16 and 12-bit rounding), and the top-k loss on
    CUDA on the decoded distributions matches float64."""
    from transformers import AutoModelForCausalLM

    from sapling.distill.teacher_cache import TeacherCache
    from sapling.distill.topk_format import decode_codes
    from sapling.kernels import fused_linear_kd_loss

    cache = TeacherCache(teacher_cache["dir"])
    blocks = cache.packed_data().train
    batch = blocks.get_batch(list(range(0, 40, 5)))
    cpu = blocks.decode(dict(batch))
    gpu = blocks.decode({k: v.to(CUDA) for k, v in batch.items()})
    assert gpu["teacher_lp"].device.type == "cuda" and gpu["teacher_idx"].device.type == "cuda"
    assert torch.equal(gpu["teacher_idx"].cpu(), cpu["teacher_idx"])
    torch.testing.assert_close(gpu["teacher_lp"].cpu(), cpu["teacher_lp"], rtol=0, atol=2e-6)

    # the cached top-k is the teacher's (float64 forward on the CPU, at the cache's temperature): the raw 12-bit
    # codes within half a step of -log p, plus the bf16 teacher's rounding; the stored tail is the rest's mass
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float64).eval()
    with torch.no_grad():
        logits = teacher(batch["input_ids"]).logits[:, :-1].reshape(-1, teacher.config.vocab_size)
    lp64 = torch.log_softmax(logits / cache.temperature, -1)
    codes, raw_idx, tail = (torch.from_numpy(a.astype("int64")) for a in decode_codes(batch["teacher_records"],
                                                                                      cache.layout))
    idx, lp = cpu["teacher_idx"], cpu["teacher_lp"]
    assert lp.shape == (len(lp64), cache.top_k) and torch.equal(raw_idx, idx)
    step, tol = cache.layout.step, cache.layout.step / 2 + 0.02
    assert (-codes * step - lp64.gather(1, idx)).abs().max() <= tol
    rest = torch.log1p(-lp64.gather(1, idx).exp().sum(1))
    assert (-tail * step - rest).abs().max() <= tol
    kth = lp64.topk(cache.top_k, dim=1).values[:, -1:]
    assert bool((lp64.gather(1, idx) >= kth - 0.02).all())  # the k largest, up to near-ties

    # the top-k loss on CUDA (the trainer's next step) against float64, on the decoded distributions
    g = torch.Generator().manual_seed(3)
    rows, hidden, vocab = len(lp), 64, teacher.config.vocab_size
    h = torch.randn(rows, hidden, generator=g).bfloat16()
    w = (torch.randn(vocab, hidden, generator=g) * (2.0 / hidden**0.5)).bfloat16()
    hc, wc = h.to(CUDA, copy=True).requires_grad_(True), w.to(CUDA, copy=True).requires_grad_(True)
    loss = fused_linear_kd_loss(hc, wc, teacher_topk=(gpu["teacher_lp"], gpu["teacher_idx"]))
    loss.backward()
    h64, w64 = h.double().requires_grad_(True), w.double().requires_grad_(True)
    r = torch.log_softmax(h64 @ w64.T, -1)
    s_top = r.gather(1, idx)
    s_tail = torch.logsumexp(r.scatter(1, idx, float("-inf")), -1, keepdim=True)
    q_top = lp.double()
    q_tail = (-torch.expm1(torch.logsumexp(q_top, -1, keepdim=True))).clamp_min(1e-300).log()
    q, s = torch.cat([q_top, q_tail], 1), torch.cat([s_top, s_tail], 1)
    ref = (q.exp() * (q - s)).sum() / rows
    ref.backward()
    assert rel(loss, ref) < 1e-2 and rel(hc.grad, h64.grad) < 3e-2 and rel(wc.grad, w64.grad) < 3e-2, (
        rel(loss, ref), rel(hc.grad, h64.grad), rel(wc.grad, w64.grad))


# ------------------------------------------------------------------------------------------------------------
# GPTQ with offload to CUDA
# ------------------------------------------------------------------------------------------------------------

Q_LAYERS, Q_HIDDEN, Q_MLP, Q_VOCAB = 24, 256, 768, 256


def _quant_model() -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=Q_VOCAB, hidden_size=Q_HIDDEN, intermediate_size=Q_MLP, num_hidden_layers=Q_LAYERS,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=128,
                      tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    return AutoModelForCausalLM.from_config(cfg).eval()


def test_gptq_offload_to_cuda_is_the_resident_result_and_agrees_with_the_cpu():
    from sapling.quant.layerwise import quantize_model
    from sapling.quant.numerics import QuantSpec, dequantize

    spec = QuantSpec(4, 64, torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, Q_VOCAB, (2, 64), generator=g) for _ in range(4)]
    held_out = torch.randint(0, Q_VOCAB, (4, 64), generator=g)
    original = _quant_model()
    model_bytes = sum(p.numel() * p.element_size() for p in original.parameters())

    on_cpu = copy.deepcopy(original)
    r_cpu = quantize_model(on_cpu, spec, method="gptq", batches=batches, device="cpu", progress=False)
    resident = copy.deepcopy(original).to(CUDA)
    r_res = quantize_model(resident, spec, method="gptq", batches=batches, device=CUDA, progress=False)
    assert all(p.device.type == "cuda" for p in resident.parameters())
    del resident
    offloaded = copy.deepcopy(original)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    r_off = quantize_model(offloaded, spec, method="gptq", batches=batches, device=CUDA, offload=True, progress=False)
    peak = torch.cuda.max_memory_allocated() - base

    # offload changes where a layer runs, not what it computes
    assert set(r_off.weights) == set(r_res.weights) == set(r_cpu.weights) and len(r_off.weights) == 7 * Q_LAYERS
    for name in r_res.weights:
        assert torch.equal(r_off.weights[name][0], r_res.weights[name][0]), name
        assert torch.equal(r_off.weights[name][1], r_res.weights[name][1]), name
    # the model stays in CPU memory: one layer (and its Hessians) on the GPU at a time, never the model
    assert all(p.device.type == "cpu" for p in offloaded.parameters())
    layer_bytes = sum(p.numel() * p.element_size() for p in original.model.layers[0].parameters())
    assert layer_bytes < peak < 0.5 * model_bytes, (peak, layer_bytes, model_bytes)
    mods = dict(offloaded.named_modules())
    for name, (q, scale) in r_off.weights.items():
        assert torch.equal(mods[name].weight.data, dequantize(q, scale, torch.float32)), name

    # the GPU and the CPU quantize alike: codes equal but for a few rounding-boundary flips (float32 Hessians
    # summed in another order), never more than one step apart, and the same output error
    codes_gpu = torch.cat([r_off.weights[n][0].flatten() for n in r_cpu.weights]).int()
    codes_cpu = torch.cat([r_cpu.weights[n][0].flatten() for n in r_cpu.weights]).int()
    assert (codes_gpu == codes_cpu).float().mean() > 0.99
    assert (codes_gpu - codes_cpu).abs().max() <= 1

    def output_error(model: torch.nn.Module) -> float:
        with torch.no_grad():
            ref = original(held_out).logits
            return float((model.cpu()(held_out).logits - ref).pow(2).mean() / ref.pow(2).mean())

    err_gpu, err_cpu = output_error(offloaded), output_error(on_cpu)
    assert 0 < err_gpu < 1.1 * err_cpu + 1e-6, (err_gpu, err_cpu)


# ------------------------------------------------------------------------------------------------------------
# the prune hook with a ZeRO-3 teacher on one CUDA rank
# ------------------------------------------------------------------------------------------------------------


def test_prune_hook_with_zero3_teacher_on_one_cuda_rank(cli, sapling_main, tmp_path, teacher_dir, text_files):
    """Pruning gathers the partitioned (ZeRO-3) teacher layer by layer on the GPU: same importance scores, same
    pruned student and the same first losses as the run without DeepSpeed on the same GPU (both bf16)."""
    files = "[" + ",".join(str(p) for p in text_files) + "]"
    args = [f"teacher.path={teacher_dir}", f"data.files={files}", "data.seq_len=32", "hooks.pre=[prune]",
            "prune.target.intermediate_size=64", "prune.target.num_attention_heads=2",
            "prune.target.num_key_value_heads=1", "prune.calibration.samples=16", "trainer.max_steps=4",
            "trainer.micro_batch_size=4", "trainer.log_every=1", "trainer.eval_every=0", "trainer.eval_batches=1",
            "trainer.warmup_steps=0", "logger=none", "trainer.progress=false"]
    zero3, plain = tmp_path / "zero3", tmp_path / "plain"
    # DeepSpeed sets up a one-rank NCCL process group itself (no launcher variables): a process of its own
    res = cli("distill", *args, "deepspeed=zero3", "deepspeed.param_persistence_threshold=0",
              f"output_dir={zero3}", timeout=900)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    code, err = sapling_main("distill", *args, f"output_dir={plain}")
    assert code == 0, err[-3000:]

    from sapling.prune.importance import ImportanceScores

    a, b = ImportanceScores.load(zero3 / "prune_scores.pt"), ImportanceScores.load(plain / "prune_scores.pt")
    assert a.num_tokens == b.num_tokens > 0
    for name in ("mlp", "heads", "kv_groups", "hidden", "block_influence"):
        x, y = getattr(a, name), getattr(b, name)
        if x is None or y is None:
            assert x is None and y is None, name
            continue
        err_rel = float((x.double() - y.double()).abs().max() / y.double().abs().max().clamp_min(1e-30))
        assert err_rel <= 1e-3, (name, err_rel)
    (pa,), (pb,) = records(zero3, "prune"), records(plain, "prune")
    assert pa["teacher_params"] == pb["teacher_params"] > pa["student_params"] == pb["student_params"]
    assert abs(pa["val_loss"] - pb["val_loss"]) <= 1e-2 * pb["val_loss"], (pa, pb)
    la = [r["loss"] for r in records(zero3, "train")]
    lb = [r["loss"] for r in records(plain, "train")]
    assert len(la) == len(lb) == 4
    assert abs(la[0] - lb[0]) <= 1e-2 * lb[0], (la, lb)  # the pruned student before any update
    assert all(abs(x - y) <= 5e-2 * y for x, y in zip(la, lb)), (la, lb)
