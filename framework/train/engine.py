"""The single-process training engine.

It has the verbs of a DeepSpeed engine (`backward`, `step`, `state_dict`), so the training loop is
written once and the DeepSpeed engines slot in behind the same calls.
"""

from __future__ import annotations

import torch

from sapling.train.optim import build_optimizer, build_scheduler


class LocalEngine:
    def __init__(self, module: torch.nn.Module, trainer_cfg) -> None:
        self.module = module
        self.optimizer = build_optimizer(module, trainer_cfg)
        self.scheduler = build_scheduler(self.optimizer, trainer_cfg)
        self.grad_clip = trainer_cfg.grad_clip
        self.global_steps = 0

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate gradients. The caller normalises the loss over the whole accumulated batch."""
        loss.backward()

    def step(self) -> float:
        """Clip, update, advance the lr schedule; returns the pre-clip gradient norm."""
        params = [p for p in self.module.parameters() if p.grad is not None]
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm) if params else torch.tensor(0.0)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_steps += 1
        return float(norm)

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def state_dict(self) -> dict:
        return {
            "module": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "global_steps": self.global_steps,
        }

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.global_steps = state["global_steps"]
