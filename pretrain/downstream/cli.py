"""Downstream tasks per exit and per decoding strategy (lm-evaluation-harness):

    python -m pretrain.eval --checkpoint runs/demo --tasks arc_easy,hellaswag --exits 2,4,all --limit 200 \\
        [--strategies autoregressive,early_exit:2,self_speculative:2:4,adaptive:2:6,dynamic:2:4] \\
        [--include-path DIR] [--batch-size 8] [--truncate] [--out FILE] [--plot [PNG]] [--wandb MODE]

--checkpoint: a run directory, a checkpoint or an HF Llama directory. --tasks: harness task names,
the local tasks shipped in pretrain/downstream/tasks (layerskip_tiny_mc, layerskip_tiny_gen), or
tasks in --include-path directories (task YAMLs; repeatable). --exits: exit layers, 'all' = the last,
'every' = 1..L. --strategies: generation tasks are also decoded with each (name[:E[:γ]]) and
reported with acceptance, tokens/s and speedup over autoregressive decoding of the same prompts.
Writes the result under the key "downstream" of <run_dir>/eval.json (other keys kept; an HF
directory: only with --out), the W&B table (--wandb; default: into the run's W&B run when it has
one), and with --plot the figure (default <run_dir>/plots/downstream.png).
Under torchrun with N processes the model is tensor-parallel over them; rank 0 reports."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from pretrain.device import select_device
from pretrain.downstream.source import ModelSource
from pretrain.downstream.strategies import parse_exits, parse_strategy
from pretrain.model_loading import is_hf_dir


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m pretrain.eval --tasks", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--tasks", required=True, help="comma-separated task names")
    ap.add_argument("--exits", default="all", help="e.g. 2,4,all or every (default: all = the last exit)")
    ap.add_argument("--strategies", default="", help="decoding strategies for generation tasks, name[:E[:γ]]")
    ap.add_argument("--limit", type=int, help="documents per task (default: all)")
    ap.add_argument("--include-path", action="append", default=[], help="directory of task YAMLs (repeatable)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--truncate", action="store_true",
                    help="cut contexts longer than the model's positions on the left (default: an error)")
    ap.add_argument("--out", help="JSON file to merge the result into (default: <run_dir>/eval.json)")
    ap.add_argument("--plot", nargs="?", const="", metavar="PNG", help="accuracy-per-exit figure")
    ap.add_argument("--wandb", choices=("auto", "online", "offline", "disabled"),
                    help="W&B table (default: auto when the run has a W&B run, else disabled)")
    return ap


def _shard_under_torchrun(device: torch.device):
    """A prepare hook that shards the loaded model tensor-parallel over a torchrun launch (None alone)."""
    from parallel.mesh import init_process_group, launched_world_size

    world = launched_world_size()
    if world == 1:
        return None

    def shard(model: torch.nn.Module) -> None:
        from torch.distributed.device_mesh import init_device_mesh

        from parallel.tensor_parallel import apply_tensor_parallel_for_decoding
        from pretrain.config import check_tensor_parallel_widths

        check_tensor_parallel_widths(model.cfg, world, tp_key="WORLD_SIZE (tensor-parallel evaluation)")
        init_process_group(device)
        apply_tensor_parallel_for_decoding(model, init_device_mesh(device.type, (world,), mesh_dim_names=("tp",)))
    return shard


def run(args: argparse.Namespace) -> int:
    """Everything checked before the model is loaded: the checkpoint's shape and tokenizer, exits,
    strategies, matplotlib for --plot, task names; then requests against the model's positions."""
    import os

    from parallel.mesh import local_rank
    from pretrain.downstream.lm import RequestTooLong
    from pretrain.downstream.report import accuracy_figure, format_report, log_wandb, merge_into_eval_json
    from pretrain.downstream.sweep import run_sweep, task_manager

    try:
        if args.batch_size < 1 or (args.limit is not None and args.limit < 1):
            raise ValueError(f"--batch-size={args.batch_size} and --limit={args.limit} must be >= 1")
        device = select_device(args.device, local_rank())
        source = ModelSource.open(args.checkpoint, device, getattr(torch, args.dtype))
        L = source.num_layers
        exits = parse_exits(args.exits, L)
        strategies = [parse_strategy(s, L) for s in args.strategies.split(",") if s.strip()]
        if args.plot is not None:
            try:
                import matplotlib  # noqa: F401
            except ImportError:
                raise ValueError("--plot needs matplotlib: pip install -e '.[plot]'") from None
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        if not tasks:
            raise ValueError("--tasks names no task")
        manager = task_manager(tasks, args.include_path)
        source.prepare = _shard_under_torchrun(device)
        printing = int(os.environ.get("RANK", "0")) == 0
        result = run_sweep(source, tasks, exits, strategies, manager, args.limit, args.batch_size, args.truncate,
                           progress=print if printing else (lambda line: None))
    except (ValueError, FileNotFoundError, RequestTooLong) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not printing:
        return 0
    result.update(checkpoint=args.checkpoint, exits_requested=args.exits)
    print(format_report(result))
    run_dir = None if is_hf_dir(args.checkpoint) else _run_dir(args.checkpoint)
    out = Path(args.out) if args.out else (run_dir / "eval.json" if run_dir else None)
    if out is not None:
        print(f"wrote {merge_into_eval_json(out, result)} (key 'downstream')")
    if args.plot is not None:
        png = Path(args.plot) if args.plot else (run_dir or Path(".")) / "plots" / "downstream.png"
        print(f"wrote {accuracy_figure(result, png, title=f'downstream accuracy per exit: {args.checkpoint}')}")
    mode = args.wandb or ("auto" if run_dir and (run_dir / "wandb_run_id").is_file() else "disabled")
    where = log_wandb(result, run_dir or Path(out.parent if out else "."), mode, f"downstream {args.checkpoint}")
    if where:
        print(f"W&B tables: {where}")
    return 0


def _run_dir(checkpoint: str) -> Path:
    from pretrain.checkpoint.inference import resolve_checkpoint

    return resolve_checkpoint(checkpoint).parent.parent


def main(argv: list[str] | None = None) -> int:
    import torch.distributed as dist

    from parallel.mesh import teardown_parallel

    code = 1
    try:
        with torch.no_grad():
            code = run(build_parser().parse_args(argv))
    finally:
        if dist.is_initialized():   # the tensor-parallel group of a torchrun launch
            teardown_parallel(wait_for_peers=code == 0)
    return code
