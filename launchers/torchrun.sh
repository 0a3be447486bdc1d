#!/bin/bash
# Sapling under torchrun, on one node or several (c10d rendezvous).
#
#   launchers/torchrun.sh distill deepspeed=zero3 teacher.path=T student.path=S data.files=[a.jsonl]
#   # on every node of a multi-node run (any one node's address as the endpoint, the same everywhere):
#   NNODES=2 RDZV_ENDPOINT=node0:29500 RDZV_ID=kd-run-1 launchers/torchrun.sh distill deepspeed=zero3 ...
#
# Everything after the command is passed to it as Hydra overrides. Optional environment:
#   NPROC_PER_NODE   ranks on this node (default: the GPUs torch sees, else 1)
#   NNODES           nodes in the run (default 1: a standalone rendezvous on this node)
#   RDZV_ENDPOINT    host:port that every node reaches (required when NNODES > 1)
#   RDZV_ID          an id the nodes of one run share (default: sapling)
#   LOCAL_ADDR       this node's address as the others reach it (default: its host name); set it, with
#                    GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME, where the host name does not resolve to
#                    the network the nodes share
#   SAPLING_PYTHON   the command that runs the Python with sapling installed (default: python3 on PATH);
#                    may be several words, e.g. "apptainer exec --nv sapling.sif python3"
# Pin hydra.run.dir=<dir> (the same on every node) for multi-node runs: each node composes its own
# config, and a time-stamped default would differ between them.
set -euo pipefail

if [[ $# -lt 1 ]]; then
  echo "usage: launchers/torchrun.sh <command> [key=value ...]" >&2
  exit 2
fi
COMMAND=$1; shift
read -r -a PY <<< "${SAPLING_PYTHON:-python3}"
NNODES=${NNODES:-1}
NPROC=${NPROC_PER_NODE:-$("${PY[@]}" -c 'import torch; print(torch.cuda.device_count() or 1)')}

ARGS=(--nproc-per-node "$NPROC")
if [[ "$NNODES" == 1 ]]; then
  ARGS+=(--standalone)
else
  if [[ -z "${RDZV_ENDPOINT:-}" ]]; then
    echo "launchers/torchrun.sh: NNODES=$NNODES needs RDZV_ENDPOINT=<host:port of one node>" >&2
    exit 2
  fi
  ARGS+=(--nnodes "$NNODES" --rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "${RDZV_ID:-sapling}")
fi
if [[ -n "${LOCAL_ADDR:-}" ]]; then
  ARGS+=(--local-addr "$LOCAL_ADDR")
fi

exec "${PY[@]}" -m torch.distributed.run "${ARGS[@]}" -m sapling "$COMMAND" "$@"
