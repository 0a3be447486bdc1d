"""Training engines with one set of verbs, so the training loop is written once.

`LocalEngine` trains in one process with a plain PyTorch optimizer; `DeepSpeedEngine` wraps a DeepSpeed
ZeRO (stage 1/2/3) engine behind the same calls: `backward(loss)` per micro-batch, `step()` once per
optimizer step (returns the pre-clip gradient norm), `lr`, `global_steps`, `save_checkpoint(dir)` /
`load_checkpoint(dir)` and `full_state_dict()` for the final export. `prepare_teacher` puts the frozen
teacher behind a DeepSpeed engine without optimizer.

The loss the loop passes to `backward` is already a mean over the valid tokens of the whole global batch
(all ranks, all accumulation steps). DeepSpeed would divide it again, by the accumulation steps (in
`backward`) and by the world size (gradient averaging); `DeepSpeedEngine.backward` undoes both, so the
gradients equal the single-process gradients of the same global batch.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

from sapling.dist import gathered
from sapling.errors import CheckpointError
from sapling.models import place
from sapling.train import ds_compat
from sapling.train.checkpoint import checkpoint_fix, load_checkpoint_file
from sapling.train.optim import LossScaler, MasterWeights, build_optimizer, build_scheduler, param_groups

ENGINE_FILE = "engine.pt"


class LocalEngine:
    """One process, PyTorch's AdamW. A 16-bit (bf16/fp16) module keeps its dtype for compute, gradients and
    export while AdamW updates fp32 master weights (`MasterWeights`), as DeepSpeed does; fp16 adds dynamic
    loss scaling (`LossScaler`). Checkpoints hold the masters and the scale, so a resume is exact."""

    kind = "local"

    def __init__(self, module: torch.nn.Module, trainer_cfg, device: torch.device | str | None = None) -> None:
        self.module = module if device is None else place(module, device)  # all of it: student and projections
        groups = param_groups(self.module, trainer_cfg)
        self.master = MasterWeights(groups)  # puts the fp32 masters of 16-bit parameters into the groups
        self.optimizer = build_optimizer(groups, trainer_cfg)
        self.trained = self.master.in_module_order(self.module)
        self.scheduler = build_scheduler(self.optimizer, trainer_cfg)
        self.scaler = LossScaler() if self.master.fp16 else None
        self.grad_clip = trainer_cfg.grad_clip
        self.global_steps = 0
        self.skipped_steps = 0  # fp16 steps skipped on inf/nan gradients

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate gradients. The caller normalises the loss over the whole accumulated batch."""
        (loss * self.scaler.scale if self.scaler is not None else loss).backward()

    def step(self) -> torch.Tensor:
        """Clip, update, advance the lr schedule; returns the pre-clip gradient norm. Under fp16 a step with
        inf/nan gradients is skipped (weights, optimizer state and lr schedule unchanged) and the scale halves."""
        self.master.grads_to_masters()
        params = [p for p in self.trained if p.grad is not None]
        if self.scaler is not None:
            for p in params:
                p.grad.div_(self.scaler.scale)
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm) if params else torch.tensor(0.0)
        overflow = self.scaler is not None and not bool(torch.isfinite(norm))
        if overflow:
            self.skipped_steps += 1
        else:
            self.optimizer.step()
            self.scheduler.step()
            self.master.masters_to_params()
        if self.scaler is not None:
            self.scaler.update(overflow)
        self.optimizer.zero_grad(set_to_none=True)
        self.global_steps += 1
        return norm.detach()  # a device scalar: the loop reads it when it logs the step

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def state_dict(self) -> dict:
        state = {
            "module": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "global_steps": self.global_steps,
        }
        if self.master.pairs:
            state["master"] = self.master.state_dict()
        if self.scaler is not None:
            state["loss_scaler"] = {**self.scaler.state_dict(), "skipped_steps": self.skipped_steps}
        return state

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.master.load_state_dict(state.get("master"))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.global_steps = state["global_steps"]
        if self.scaler is not None and "loss_scaler" in state:
            self.scaler.load_state_dict(state["loss_scaler"])
            self.skipped_steps = state["loss_scaler"]["skipped_steps"]

    def save_checkpoint(self, tag_dir: Path) -> None:
        torch.save(self.state_dict(), Path(tag_dir) / ENGINE_FILE)

    def load_checkpoint(self, tag_dir: Path) -> None:
        self.load_state_dict(load_checkpoint_file(Path(tag_dir) / ENGINE_FILE, "model and optimizer state"))

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def gathered_head(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


class DeepSpeedEngine:
    """The student under DeepSpeed ZeRO stage `cfg.deepspeed.stage`, with LocalEngine's verbs.

    Optimizer and schedule are Sapling's own (AdamW, decay on matrices, warmup + cosine), handed to
    DeepSpeed, which partitions their state; precision follows the module's dtype (bf16 modules train
    with fp32 master weights in the ZeRO optimizer). `load_universal=True` builds the engine to load a
    universal checkpoint (written at another world size or stage).
    """

    kind = "deepspeed"

    def __init__(self, module: torch.nn.Module, cfg: Any, world_size: int, *, load_universal: bool = False) -> None:
        import deepspeed

        from sapling.train.ds_config import student_ds_config

        t = cfg.trainer
        dtype = next(module.parameters()).dtype
        self.config = student_ds_config(cfg, world_size, dtype, load_universal=load_universal)
        if cfg.deepspeed.offload_optimizer:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            def make_optimizer(groups: Any) -> torch.optim.Optimizer:
                return DeepSpeedCPUAdam(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8, adamw_mode=True)
        else:
            def make_optimizer(groups: Any) -> torch.optim.Optimizer:
                return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8)

        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module, model_parameters=param_groups(module, t), optimizer=make_optimizer,
            lr_scheduler=lambda opt: build_scheduler(opt, t), config=self.config)
        self.module = self.ds.module
        self.stage = int(cfg.deepspeed.stage)
        self.grad_accum = int(t.grad_accum)
        self.world_size = world_size
        self._micro = 0

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate gradients of a loss already normalised over the global batch (see the module docstring).

        DeepSpeed counts micro-batches in `step()`: every micro-batch but the last of an optimizer step
        calls it too, which only advances that count (gradient reduction happens at the boundary).
        """
        self.ds.backward(loss * self.world_size, scale_wrt_gas=False)
        self._micro += 1
        if self._micro % self.grad_accum:
            self._end_micro_batch()

    def step(self) -> torch.Tensor | float:
        if not self.ds.is_gradient_accumulation_boundary():
            raise RuntimeError("DeepSpeedEngine.step() called before grad_accum micro-batches were backpropagated")
        self._end_micro_batch()
        norm = self.ds.get_global_grad_norm()
        return norm if norm is not None else float("nan")  # read (float()) when the loop logs the step

    def _end_micro_batch(self) -> None:
        # The loop calls the module's parts (decoder, KD head), not the engine's forward, which is where
        # DeepSpeed closes the previous micro-batch's backward (ZeRO-3 counts micro-steps there to
        # accumulate rather than overwrite gradient partitions). Done here instead, at the same point:
        # after this micro-batch, before the next forward.
        self.ds.step()
        ds_compat.end_backward(self.ds)

    @property
    def lr(self) -> float:
        return float(self.ds.get_lr()[0])

    @property
    def global_steps(self) -> int:
        return int(self.ds.global_steps)

    def save_checkpoint(self, tag_dir: Path) -> None:
        """DeepSpeed's own layout in `tag_dir` (model/optimizer shards per rank); every rank must call it."""
        from sapling.train.ds_config import UNIVERSAL_INFO

        tag_dir = Path(tag_dir)
        self.ds.save_checkpoint(str(tag_dir.parent), tag=tag_dir.name, client_state=dict(UNIVERSAL_INFO),
                                save_latest=False)

    def load_checkpoint(self, tag_dir: Path) -> None:
        tag_dir = Path(tag_dir)
        path, _ = self.ds.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
        if path is None:
            raise CheckpointError(f"DeepSpeed found no loadable checkpoint in {tag_dir} (its model states file is "
                                  f"missing); {checkpoint_fix(tag_dir)}")

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The whole student's weights on rank 0 (None elsewhere); every rank must call it. ZeRO-3 gathers
        one module at a time, so no rank holds more than one layer beyond its own shard."""
        import torch.distributed as dist

        if self.stage == 3:
            return ds_compat.zero3_full_state_dict(self.ds)
        return {k: v.detach().cpu() for k, v in self.module.state_dict().items()} if dist.get_rank() == 0 else None

    def gathered_head(self) -> contextlib.AbstractContextManager:
        """lm_head whole on every rank (ZeRO-3), for code that reads its weight outside its forward."""
        return gathered(list(self.module.get_output_embeddings().parameters()))


def build_engine(module: torch.nn.Module, cfg: Any, world_size: int = 1, *, load_universal: bool = False,
                 device: torch.device | str | None = None) -> LocalEngine | DeepSpeedEngine:
    """The engine training `module`: LocalEngine (moved to `device`) or DeepSpeed's (which places it itself)."""
    if cfg.deepspeed.name == "none":
        return LocalEngine(module, cfg.trainer, device)
    return DeepSpeedEngine(module, cfg, world_size, load_universal=load_universal)


def prepare_teacher(teacher: torch.nn.Module, cfg: Any, world_size: int) -> torch.nn.Module:
    """The frozen teacher, behind a DeepSpeed engine without optimizer when `deepspeed` is on.

    Returns the module to call: under ZeRO-3 the engine's hooks gather each layer's weights for its forward
    and release them after, so the whole teacher is never on one device. Wrapped once per model.
    """
    teacher.eval()
    teacher.requires_grad_(False)
    if cfg.deepspeed.name == "none" or getattr(teacher, "_sapling_engine", None) is not None:
        return teacher
    import deepspeed

    from sapling.train.ds_config import teacher_ds_config

    dtype = next(teacher.parameters()).dtype
    engine, *_ = deepspeed.initialize(model=teacher, config=teacher_ds_config(cfg, world_size, dtype))
    engine.eval()
    teacher._sapling_engine = engine  # keeps the engine (and its hooks) alive as long as the model
    return engine.module
