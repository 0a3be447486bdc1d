"""LocalEngine in 16 bits: AdamW updates fp32 master weights (bf16/fp16 updates below a weight's rounding
step still add up), checkpoints hold them (resume is exact), and fp16 uses dynamic loss scaling."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from sapling.train.engine import LocalEngine

DIM, STEPS = 16, 30


def _trainer(**kw) -> SimpleNamespace:
    base = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.95, "weight_decay": 0.0, "warmup_steps": 0, "max_steps": STEPS,
            "min_lr_ratio": 1.0, "grad_clip": 1.0}
    return SimpleNamespace(**{**base, **kw})


def _model(dtype: torch.dtype) -> torch.nn.Linear:
    """Weights in [1, 2), where bf16's rounding step is 2**-7: an AdamW step of ~lr=1e-3 rounds away."""
    torch.manual_seed(0)
    model = torch.nn.Linear(DIM, DIM, bias=False)
    with torch.no_grad():
        model.weight.copy_(1 + torch.rand(DIM, DIM))
    return model.to(dtype)


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    target = _model(torch.float32).weight.detach() - 0.05  # each weight wants to move down by 0.05
    xs = [torch.randn(64, DIM, generator=g) for _ in range(n)]
    return [(x, x @ target.T) for x in xs]


def _train(engine: LocalEngine, batches, scale: float = 1.0) -> list[float]:
    dtype = next(engine.module.parameters()).dtype
    losses = []
    for x, y in batches:
        loss = scale * torch.nn.functional.mse_loss(engine.module(x.to(dtype)).float(), y)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()) / scale)
    return losses


def test_bf16_tracks_fp32_instead_of_stalling():
    batches = _batches(STEPS)
    ref, low = LocalEngine(_model(torch.float32), _trainer()), LocalEngine(_model(torch.bfloat16), _trainer())
    init = _model(torch.float32).weight.detach()
    ref_losses, low_losses = _train(ref, batches), _train(low, batches)
    moved_ref = ref.module.weight.detach() - init
    moved_low = low.module.weight.detach().float() - init
    assert moved_ref.abs().mean() > 0.02
    # AdamW on bf16 weights in [1, 2) would leave them where they are (each step < half a rounding step)
    assert moved_low.abs().mean() > 0.8 * moved_ref.abs().mean()
    (_, master), = low.master.pairs
    assert (master.detach() - ref.module.weight.detach()).abs().max() < 2**-7
    assert torch.equal(low.module.weight, master.detach().bfloat16())
    assert low.full_state_dict()["weight"].dtype == torch.bfloat16
    ref_end, low_end = sum(ref_losses[-5:]) / 5, sum(low_losses[-5:]) / 5
    assert low_end < 0.5 * sum(low_losses[:5]) / 5
    assert abs(low_end - ref_end) < 0.15 * ref_end, (ref_losses, low_losses)


def test_bf16_resume_is_bit_exact(tmp_path):
    batches = _batches(8)
    whole = LocalEngine(_model(torch.bfloat16), _trainer())
    _train(whole, batches)
    first = LocalEngine(_model(torch.bfloat16), _trainer())
    _train(first, batches[:4])
    first.save_checkpoint(tmp_path)
    resumed = LocalEngine(_model(torch.bfloat16), _trainer())
    resumed.load_checkpoint(tmp_path)
    _train(resumed, batches[4:])
    # after 4 steps the bf16 weights have barely moved but the masters have: both must come back
    assert torch.equal(resumed.module.weight, whole.module.weight)
    for (_, a), (_, b) in zip(resumed.master.pairs, whole.master.pairs, strict=True):
        assert torch.equal(a, b)
    assert resumed.optimizer.state_dict()["state"][0]["exp_avg"].dtype == torch.float32


def test_fp16_loss_scaling_keeps_small_gradients_and_skips_overflow():
    batches = _batches(6)
    engine = LocalEngine(_model(torch.float16), _trainer(lr=1e-2))
    before = engine.module.weight.detach().clone()
    # output gradients of ~1e-9 flush to zero in fp16 unless the loss is scaled up first
    _train(engine, batches[:2], scale=3e-6)
    # (AdamW on the fp16 weights themselves turns them into nan: its eps=1e-8 is 0 in fp16)
    assert torch.isfinite(engine.module.weight).all() and not torch.equal(engine.module.weight, before)
    scale, lr_steps = engine.scaler.scale, engine.scheduler.last_epoch
    weight, masters = engine.module.weight.detach().clone(), [m.detach().clone() for _, m in engine.master.pairs]
    x, y = batches[2]
    engine.backward(torch.nn.functional.mse_loss(engine.module(x.half()).float(), y))
    engine.module.weight.grad[0, 0] = float("inf")
    engine.step()  # skipped: nothing changes but the scale
    assert engine.scaler.scale == scale / 2 and engine.skipped_steps == 1
    assert torch.equal(engine.module.weight, weight) and engine.scheduler.last_epoch == lr_steps
    assert all(torch.equal(m, b) for (_, m), b in zip(engine.master.pairs, masters, strict=True))
    assert engine.module.weight.grad is None
    engine.scaler.window = 2
    _train(engine, batches[3:5])
    assert engine.scaler.scale == scale  # two good steps in a row double it again


def test_fp32_step_norm_is_the_module_order_norm_to_the_bit():
    """The engine clips over its parameters in module order, not in param-group order (decayed matrices
    first): the summation order sets the norm's last bits, which the clip scale and every later step inherit
    (the demo teacher's perplexity moved from 101.12 to 100.81 when the order changed)."""
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(DIM, 3 * DIM), torch.nn.LayerNorm(3 * DIM),
                                torch.nn.Linear(3 * DIM, DIM))
    engine = LocalEngine(model, _trainer(weight_decay=0.1, grad_clip=1e-3))
    grouped = [id(p) for g in engine.optimizer.param_groups for p in g["params"]]
    assert grouped != [id(p) for p in model.parameters()]
    for seed in range(5):
        x = torch.randn(7, DIM, generator=torch.Generator().manual_seed(seed)) * 1e3
        model(x).pow(2).mean().backward()
        expected = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
        assert torch.equal(engine.step(), expected)
