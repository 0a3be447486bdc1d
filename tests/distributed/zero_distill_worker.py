"""torchrun worker: `sapling distill` under DeepSpeed ZeRO stages 1, 2 and 3, one after another in one launch.

argv: out_root teacher_dir student_dir data_file [overrides ...]. Each stage writes its run into
`out_root/<preset>` exactly as `torchrun -m sapling distill deepspeed=<preset> ...` would (the same
`run_distill`); after the ZeRO-3 run every rank feeds fixed token ids through the trained, still
partitioned student and rank 0 saves the logits to `out_root/zero3/engine_logits.pt`, for the export test.
"""

from __future__ import annotations

import os
import sys
from importlib.resources import files

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from sapling.config import register_configs, validate
from sapling.dist import barrier, is_main, shutdown_distributed
from sapling.recipes.distill import run_distill

STAGES = {"zero1": [], "zero2": [], "zero3": ["deepspeed.param_persistence_threshold=0"]}  # 0: all partitioned
PROBE = torch.arange(48).reshape(2, 24) % 300  # token ids for the logits comparison


def compose_cfg(out: str, overrides: list[str]):
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(files("sapling.conf")), version_base=None):
        cfg = compose(config_name="config", overrides=["command=distill", f"output_dir={out}", *overrides])
    validate(cfg)
    return cfg


def main(out_root: str, teacher: str, student: str, data_file: str, *extra: str) -> None:
    base = [f"teacher.path={teacher}", f"student.path={student}", f"data.files=[{data_file}]", *extra]
    for preset, overrides in STAGES.items():
        out = os.path.join(out_root, preset)
        result = run_distill(compose_cfg(out, [*base, f"deepspeed={preset}", *overrides]))
        if preset == "zero3":
            with torch.no_grad():
                logits = result.model(input_ids=PROBE, use_cache=False).logits
            if is_main():
                torch.save({"ids": PROBE, "logits": logits}, os.path.join(out, "engine_logits.pt"))
        barrier()
    shutdown_distributed()


if __name__ == "__main__":
    main(*sys.argv[1:])
