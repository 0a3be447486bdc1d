#!/bin/bash
# A Hydra sweep of the distillation temperature and KD weight, one job per point, then its report.
#
#   TEACHER=/models/teacher DATA=/data/train.jsonl launchers/sweep.sh trainer.max_steps=2000 deepspeed=zero3
#   LAUNCHER=submitit_local TEACHER=... DATA=... launchers/sweep.sh ...     # on this machine
#
# Optional environment: LAUNCHER (submitit_slurm | submitit_local; default submitit_slurm), SWEEP_DIR
# (default multirun/distill/sweep-<date-time>). Slurm settings are Hydra overrides too, e.g.
# hydra.launcher.partition=gpu hydra.launcher.nodes=2 hydra.launcher.timeout_min=720.
set -euo pipefail

: "${TEACHER:?set TEACHER=<HF checkpoint dir of the teacher>}"
: "${DATA:?set DATA=<training file(s), comma-separated>}"
LAUNCHER=${LAUNCHER:-submitit_slurm}
SWEEP_DIR=${SWEEP_DIR:-multirun/distill/sweep-$(date +%Y%m%d-%H%M%S)}

sapling distill -m distill.temperature=1,2,4 distill.kd_weight=0.5,1.0 "hydra/launcher=$LAUNCHER" \
  "hydra.sweep.dir=$SWEEP_DIR" "teacher.path=$TEACHER" "data.files=[$DATA]" "$@"
sapling sweep-report "$SWEEP_DIR"
