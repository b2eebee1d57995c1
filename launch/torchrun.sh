#!/usr/bin/env bash
# Launch LayerSkip training with torchrun, on one node or several (c10d rendezvous).
#
#   launch/torchrun.sh [--nproc N] [--nnodes N] [--node-rank R] [--endpoint HOST:PORT]
#                      [--run-id ID] [--max-restarts N] [--module pretrain.train] -- [hydra overrides...]
#
# Each option falls back to an environment variable: NPROC_PER_NODE, NNODES, NODE_RANK,
# RDZV_ENDPOINT, RDZV_ID, MAX_RESTARTS (default 0), LAYERSKIP_MODULE, and for Slurm jobs
# SLURM_NNODES / SLURM_NODEID / SLURM_JOB_ID. Every rank gets the same run_dir (pass run_dir=... or
# name=...; the default runs/<name> has no timestamp), so all ranks write to one Hydra run directory.
#
# Python: PYTHON or LAYERSKIP_PYTHON if set, else the repository's .venv (LAYERSKIP_VENV), as
# launch/slurm.sbatch does, else python3 from PATH; the repository goes on PYTHONPATH. So
# `launch/torchrun.sh ...` works after `make setup` from any directory, venv activated or not.
#
# Rendezvous on one node: a free port on localhost and an id unique to this launch (two users or
# two runs on one machine never meet); give --endpoint/--run-id to choose them. Several nodes need
# --endpoint (the same on every node); the id defaults to the Slurm job id, else to the endpoint.
#
# Exit code: the trainer's (75 checkpointed on a signal or at the time limit, 76 hang, ...), not
# torchrun's 1 with a traceback (pretrain/operations/launcher.py).
#
# --max-restarts N: when a worker fails, torchrun stops the others and starts all workers again
# (every node, through a new rendezvous round), up to N times; the trainer resumes from the newest
# checkpoint (checkpoint.resume=auto, the default). Signals: SIGTERM, SIGINT, SIGHUP (terminal or SSH
# session closed) and SIGUSR1 reach the workers (the trainer checkpoints at the next step and exits
# 75); torchrun kills workers that are still running LAYERSKIP_SHUTDOWN_TIMEOUT seconds later
# (default 120).
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
endpoint="${RDZV_ENDPOINT:-}"
run_id="${RDZV_ID:-${SLURM_JOB_ID:-}}"
max_restarts="${MAX_RESTARTS:-0}"
module="${LAYERSKIP_MODULE:-pretrain.train}"

# the repository (this file's parent folder) and its python, the same way as launch/slurm.sbatch
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="${LAYERSKIP_VENV:-$root/.venv}"
python="${PYTHON:-${LAYERSKIP_PYTHON:-}}"
if [[ -z "$python" ]]; then
  if [[ -x "$venv/bin/python" ]]; then python="$venv/bin/python"; else python=$(command -v python3 || command -v python || echo python); fi
fi
if ! "$python" -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is None)" 2>/dev/null; then
  echo "torchrun.sh: $python cannot import torch; run make setup, or set LAYERSKIP_VENV (a venv) or PYTHON" >&2
  exit 2
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"

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
    -h|--help) sed -n '2,35p' "$0"; exit 0 ;;
    *) break ;;
  esac
done

if [[ -z "$endpoint" ]]; then
  if [[ "$nnodes" != 1 ]]; then
    echo "torchrun.sh: --nnodes $nnodes needs --endpoint HOST:PORT (a port the first node listens on; the same on every node)" >&2
    exit 2
  fi
  endpoint="localhost:$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  run_id="${run_id:-layerskip-$(id -un 2>/dev/null || echo user)-$$-$(date +%s)}"
fi
run_id="${run_id:-layerskip-${endpoint//[^A-Za-z0-9]/-}}"

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

# pretrain.operations.launcher is torchrun that exits with the trainer's code (75, 76, ...)
exec "$python" -m pretrain.operations.launcher \
  --nnodes="$nnodes" --nproc-per-node="$nproc" --node-rank="$node_rank" \
  --rdzv-backend=c10d --rdzv-endpoint="$endpoint" --rdzv-id="$run_id" \
  --max-restarts="$max_restarts" \
  -m "$module" "$@"
