"""AdamW with decoupled weight decay on matrices only, a linear-warmup + cosine-decay schedule, and what
16-bit training in one process adds: fp32 master weights and (fp16) dynamic loss scaling, as in DeepSpeed."""

from __future__ import annotations

import math

import torch

HALF_DTYPES = (torch.bfloat16, torch.float16)


def build_optimizer(groups: list[dict], cfg) -> torch.optim.AdamW:
    """AdamW over `groups` (see `param_groups`), with the trainer config's lr and betas."""
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)


def param_groups(model: torch.nn.Module, cfg) -> list[dict]:
    """[decayed >=2-D weights, undecayed rest]; a ZeRO-3 partitioned parameter counts by its full shape."""
    params = {id(p): p for p in model.parameters() if p.requires_grad}.values()
    decay = [p for p in params if len(getattr(p, "ds_shape", p.shape)) >= 2]
    no_decay = [p for p in params if len(getattr(p, "ds_shape", p.shape)) < 2]
    return [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class MasterWeights:
    """fp32 master copies of a module's 16-bit (bf16/fp16) parameters, for the optimizer to update.

    The module keeps its 16-bit weights for compute, gradients and export; an AdamW step of ~lr on a 16-bit
    weight is often below its rounding step (bf16: 2**-8 to 2**-7 of the weight) and would be lost, so the optimizer
    updates the fp32 copies instead, which are rounded back into the module after each step. Built on the
    param groups, in which it replaces each 16-bit parameter by its master; fp32 parameters stay as they are.
    """

    def __init__(self, groups: list[dict]) -> None:
        self.pairs: list[tuple[torch.nn.Parameter, torch.nn.Parameter]] = []  # (module parameter, master)
        for group in groups:
            group["params"] = [self._master_of(p) for p in group["params"]]
        self.fp16 = any(p.dtype == torch.float16 for p, _ in self.pairs)

    def in_module_order(self, module: torch.nn.Module) -> list[torch.nn.Parameter]:
        """The optimizer's parameters (masters for 16-bit ones) in `module.parameters()` order: the order the
        gradient norm is summed in, so that clipping gives the same bits whatever the param groups."""
        masters = {id(p): master for p, master in self.pairs}
        return [masters.get(id(p), p) for p in module.parameters() if p.requires_grad]

    def _master_of(self, p: torch.nn.Parameter) -> torch.nn.Parameter:
        if p.dtype not in HALF_DTYPES:
            return p
        master = torch.nn.Parameter(p.detach().float().clone())
        self.pairs.append((p, master))
        return master

    def grads_to_masters(self) -> None:
        """Move the accumulated 16-bit gradients onto the masters, in fp32."""
        for p, master in self.pairs:
            master.grad = None if p.grad is None else p.grad.float()
            p.grad = None

    @torch.no_grad()
    def masters_to_params(self) -> None:
        for p, master in self.pairs:
            p.copy_(master)

    def state_dict(self) -> list[torch.Tensor]:
        return [master.detach() for _, master in self.pairs]

    @torch.no_grad()
    def load_state_dict(self, masters: list[torch.Tensor] | None) -> None:
        """Restore the masters (None, a checkpoint without them: start them from the module's weights)."""
        if masters is not None and len(masters) != len(self.pairs):
            raise ValueError(f"the checkpoint holds {len(masters)} fp32 master weights, this model has "
                             f"{len(self.pairs)} 16-bit parameters")
        for i, (p, master) in enumerate(self.pairs):
            master.copy_(p if masters is None else masters[i])


class LossScaler:
    """Dynamic loss scaling for fp16, with DeepSpeed's defaults: the loss is multiplied by `scale` before
    backward so that small gradients do not flush to zero in fp16; a step whose gradients hold an inf/nan is
    skipped and halves the scale, `window` overflow-free steps in a row double it."""

    def __init__(self, scale: float = 2.0**16, window: int = 1000, min_scale: float = 1.0) -> None:
        self.scale, self.window, self.min_scale = scale, window, min_scale
        self.good_steps = 0

    def update(self, overflow: bool) -> None:
        if overflow:
            self.scale, self.good_steps = max(self.min_scale, self.scale / 2), 0
            return
        self.good_steps += 1
        if self.good_steps % self.window == 0:
            self.scale *= 2

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.good_steps = state["scale"], state["good_steps"]


def lr_factor(step: int, *, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warmup, then cosine to min_lr_ratio."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_factor(s, warmup_steps=cfg.warmup_steps, max_steps=cfg.max_steps, min_lr_ratio=cfg.min_lr_ratio),
    )
