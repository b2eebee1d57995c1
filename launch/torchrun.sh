#!/usr/bin/env bash
# Launch LayerSkip training with torchrun, on one node or several (c10d rendezvous).
#
#   launch/torchrun.sh [--nproc N] [--nnodes N] [--node-rank R] [--endpoint HOST:PORT]
#                      [--run-id ID] [--max-restarts N] [--module pretrain.train] -- [hydra overrides...]
#
# Each option falls back to an environment variable: NPROC_PER_NODE, NNODES, NODE_RANK,
# RDZV_ENDPOINT (default localhost:29500), RDZV_ID, MAX_RESTARTS (default 0), LAYERSKIP_MODULE, and for Slurm jobs
# SLURM_NNODES / SLURM_NODEID / SLURM_JOB_ID. Every rank gets the same run_dir (pass run_dir=... or
# name=...; the default runs/<name> has no timestamp), so all ranks write to one Hydra run directory.
#
# --max-restarts N: when a worker fails, torchrun stops the others and starts all workers again
# (every node, through a new rendezvous round), up to N times; the trainer resumes from the newest
# checkpoint (checkpoint.resume=auto, the default). Signals: SIGTERM, SIGINT and SIGUSR1 reach the
# workers (the trainer checkpoints at the next step and exits 75); torchrun kills workers that are
# still running LAYERSKIP_SHUTDOWN_TIMEOUT seconds later (default 120).
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
max_restarts="${MAX_RESTARTS:-0}"
module="${LAYERSKIP_MODULE:-pretrain.train}"
python="${PYTHON:-python}"

while [[ $# -gt 0 ]]; do
  case "$1" in
    --nproc) nproc="$2"; shift 2 ;;
    --nnodes) nnodes="$2"; shift 2 ;;
    --node-rank) node_rank="$2"; shift 2 ;;
    --endpoint) endpoint="$2"; shift 2 ;;
    --run-id) run_id="$2"; shift 2 ;;
    --max-restarts) max_restarts="$2"; shift 2 ;;
    --module) module="$2"; shift 2 ;;
    --) shift; break ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) break ;;
  esac
done

if [[ -z "$nproc" ]]; then
  nproc=$("$python" -c "import torch; print(torch.accelerator.device_count() or 1)")
fi

# Workers of a restarted round must not find the previous round's keys: torchrun (2.4+) keeps one
# TCPStore for all rounds and its workers use it unprefixed, so restarted gloo workers read the dead
# workers' addresses and hang in connectFullMesh. Without the shared store, rank 0 of each round
# hosts a fresh store.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
# torchrun forwards these signals to its workers and waits that long before it kills them (read by
# torch versions with --signals-to-handle / --shutdown-timeout; older ones forward SIGTERM and
# SIGINT only, die on SIGUSR1, and kill after 30 s)
export PET_SIGNALS_TO_HANDLE="SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
export PET_SHUTDOWN_TIMEOUT="${LAYERSKIP_SHUTDOWN_TIMEOUT:-120}"

exec "$python" -m torch.distributed.run \
  --nnodes="$nnodes" --nproc-per-node="$nproc" --node-rank="$node_rank" \
  --rdzv-backend=c10d --rdzv-endpoint="$endpoint" --rdzv-id="$run_id" \
  --max-restarts="$max_restarts" \
  -m "$module" "$@"
