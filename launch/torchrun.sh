#!/usr/bin/env bash
# Launch LayerSkip training with torchrun, on one node or several (c10d rendezvous).
#
#   launch/torchrun.sh [--nproc N] [--nnodes N] [--node-rank R] [--endpoint HOST:PORT]
#                      [--run-id ID] [--module pretrain.train] -- [hydra overrides...]
#
# Each option falls back to an environment variable: NPROC_PER_NODE, NNODES, NODE_RANK,
# RDZV_ENDPOINT (default localhost:29500), RDZV_ID, and for Slurm jobs SLURM_NNODES / SLURM_NODEID
# / SLURM_JOB_ID. Every rank gets the same run_dir (pass run_dir=... or name=...; the default
# runs/<name> has no timestamp), so all ranks write to one Hydra run directory.
#
# Several nodes: run this on every node with the same --nnodes, --endpoint (a host:port the first
# node can listen on and all can reach) and --run-id. With the c10d rendezvous, ranks are assigned
# by the rendezvous (torchrun ignores --node-rank there; it is passed for logs and static setups).
# The product parallel.dp_replicate·dp_shard·tp·pp must equal nnodes·nproc; it is checked before
# any collective. Example, two nodes of 8 GPUs, TP inside a node, FSDP across:
#   launch/torchrun.sh --nnodes 2 --node-rank 0 --endpoint node0:29500 -- parallel.tp=8 parallel.dp_shard=2
set -euo pipefail

nproc="${NPROC_PER_NODE:-}"
nnodes="${NNODES:-${SLURM_NNODES:-1}}"
node_rank="${NODE_RANK:-${SLURM_NODEID:-0}}"
endpoint="${RDZV_ENDPOINT:-localhost:29500}"
run_id="${RDZV_ID:-${SLURM_JOB_ID:-layerskip}}"
module="pretrain.train"
python="${PYTHON:-python}"

while [[ $# -gt 0 ]]; do
  case "$1" in
    --nproc) nproc="$2"; shift 2 ;;
    --nnodes) nnodes="$2"; shift 2 ;;
    --node-rank) node_rank="$2"; shift 2 ;;
    --endpoint) endpoint="$2"; shift 2 ;;
    --run-id) run_id="$2"; shift 2 ;;
    --module) module="$2"; shift 2 ;;
    --) shift; break ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) break ;;
  esac
done

if [[ -z "$nproc" ]]; then
  nproc=$("$python" -c "import torch; print(torch.accelerator.device_count() or 1)")
fi

exec "$python" -m torch.distributed.run \
  --nnodes="$nnodes" --nproc-per-node="$nproc" --node-rank="$node_rank" \
  --rdzv-backend=c10d --rdzv-endpoint="$endpoint" --rdzv-id="$run_id" \
  --max-restarts=0 \
  -m "$module" "$@"
