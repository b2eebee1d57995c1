"""The LayerSkip ablation at CPU scale (issue 14): one small model trained from scratch on the same
data, seed and steps as

- baseline:       no layer dropout, loss at the last exit only (layerskip=off);
- layer_dropout:  layer dropout only, D(l) = exp, S(t) = exp;
- early_exit:     early-exit loss only, rotational curriculum (p_max = 0);
- layerskip:      both (preset=from_scratch);

and continual pretraining of the baseline checkpoint for a fraction of its steps:

- continual_plain:     plain training (layerskip=off);
- continual_layerskip: LayerSkip with S(t) = 1 and the gradual exit curriculum (preset=continual).

Per variant and exit: held-out loss, perplexity, top-1 agreement with the last layer and the best
expected (γ, speedup); at the best predicted (E, γ) measured greedy self-speculative decoding
(acceptance, layer evaluations per token, tokens/s vs autoregressive, identical tokens checked);
the last layer's loss cost of LayerSkip; training tokens/s and the fraction of block work run.
Writes bench/results/<name>.md and .json and the figures in bench/results/<name>/.

    python -m bench.ablation [--data-dir data/demo] [--steps 600] [--layers 8] [--dim 64] [--reuse]

Runs go to --runs-dir/<variant> (default runs/ablation); an existing run directory is an error
unless --reuse (keep a finished run, train an unfinished one on) or --overwrite.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

from bench.ablation_report import write_figures, write_report
from bench.common import RESULTS, interleaved_medians
from bench.decoding_speedup import decode_each
from pretrain.checkpoint.inference import resolve_checkpoint
from pretrain.model_loading import load_model
from pretrain.checkpoint.layout import list_checkpoints
from pretrain.data.dataset import PackedDataset
from pretrain.data.loader import validation_batches
from pretrain.decoding import DecodeOptions
from pretrain.device import select_device
from pretrain.evaluation.early_exit_eval import evaluate_exits

FROM_SCRATCH = ("baseline", "layer_dropout", "early_exit", "layerskip")
CONTINUAL = ("continual_plain", "continual_layerskip")


def variant_overrides(args) -> dict[str, list[str]]:
    """Hydra overrides of each variant, on top of common_overrides."""
    p = f"layerskip.layer_dropout.p_max={args.p_max}"
    continual_steps = continual_step_count(args)
    cont = [f"train.steps={continual_steps}", f"optim.lr={args.continual_lr}",
            f"optim.warmup_steps={max(1, continual_steps // 10)}", "train.seed=1",
            f"checkpoint.init_from={Path(args.runs_dir) / 'baseline'}"]
    return {
        "baseline": ["layerskip=off"],
        "layer_dropout": ["layerskip=off", p, "layerskip.layer_dropout.depth_scale=exp",
                          "layerskip.layer_dropout.time_scale=exp"],
        "early_exit": ["layerskip=from_scratch", "layerskip.layer_dropout.p_max=0.0"],
        "layerskip": ["preset=from_scratch", p],
        "continual_plain": ["layerskip=off", *cont],
        "continual_layerskip": ["preset=continual", p, "layerskip.early_exit.curriculum=gradual",
                                f"layerskip.early_exit.gradual_steps={max(1, continual_steps // 2)}", *cont],
    }


def continual_step_count(args) -> int:
    return max(2, round(args.steps * args.continual_fraction))


def common_overrides(args, data: PackedDataset, variant: str) -> list[str]:
    return [f"model={args.model}", f"model.n_layers={args.layers}", f"model.dim={args.dim}",
            f"model.n_heads={args.heads}", f"model.n_kv_heads={args.kv_heads}", f"model.ffn_dim={args.ffn_dim}",
            f"model.vocab_size={data.vocab_size}", f"model.max_seq_len={max(256, data.seq_len)}",
            f"data.dir={args.data_dir}", f"run_dir={Path(args.runs_dir) / variant}", f"name=ablation_{variant}",
            f"train.steps={args.steps}", f"train.global_batch_size={args.batch_size}",
            f"train.micro_batch_size={args.batch_size}", f"train.seq_len={data.seq_len}", "train.seed=0",
            f"train.device={args.device}",
            f"optim.lr={args.lr}", f"optim.warmup_steps={args.warmup}", "logging.every=1",
            "logging.progress_bar=false", f"logging.wandb.mode={args.wandb}", "eval.every=0",
            f"eval.batches={args.eval_batches}", f"eval.batch_size={args.eval_batch_size}",
            f"eval.max_draft_len={args.max_draft_len}", "eval.decode_prompts=0",
            "checkpoint.every=0", "checkpoint.keep=1", "checkpoint.resume=auto"]


def train_variant(args, data: PackedDataset, variant: str, overrides: list[str]) -> float:
    """Train one variant in this process through the same Hydra config as `python -m pretrain.train`;
    returns the wall seconds (0 when a finished run was reused)."""
    from pretrain.config import compose_run_config
    from pretrain.trainer.loop import train

    run_dir = Path(args.runs_dir) / variant
    steps = int(next(o for o in reversed(overrides) if o.startswith("train.steps=")).split("=")[1])
    if run_dir.exists():
        found = list_checkpoints(run_dir)
        if args.reuse and found and found[-1][0] == steps:
            print(f"[ablation] {variant}: reusing the finished run {run_dir}", flush=True)
            return 0.0
        if args.overwrite:
            shutil.rmtree(run_dir)
        elif not args.reuse:
            raise SystemExit(f"error: {run_dir} exists; pass --reuse to keep finished runs or --overwrite")
    cfg, _ = compose_run_config(overrides)
    print(f"[ablation] {variant}: training {steps} steps -> {run_dir}", flush=True)
    started = time.perf_counter()
    train(cfg)
    return time.perf_counter() - started


def training_throughput(run_dir: Path) -> dict:
    """Median training tokens/s and mean fraction of block work run, over the logged steps after
    the first 10% (warm-up and allocator growth excluded)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    steady = train[len(train) // 10:] or train
    return {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady),
            "blocks_run_fraction": statistics.fmean(r["blocks_run_fraction"] for r in train),
            "step_time_s": sum(r["step_time_s"] for r in train),
            "final_train_loss": statistics.fmean(r["loss"] for r in train[-max(1, len(train) // 20):])}


def measure_decoding(model, prompts: list[list[int]], exit_layer: int, draft_len: int, new_tokens: int,
                     repeats: int) -> dict:
    """Greedy self-speculative decoding at (E, γ) vs autoregressive on the same prompts, batch 1:
    identical tokens checked; tokens/s from interleaved medians."""
    ar = DecodeOptions(strategy="autoregressive", max_new_tokens=new_tokens)
    spec = DecodeOptions(strategy="self_speculative", exit_layer=exit_layer, draft_len=draft_len,
                         max_new_tokens=new_tokens)
    reference, _ = decode_each(model, prompts, ar)
    outputs, stats = decode_each(model, prompts, spec)
    times = interleaved_medians({"autoregressive": lambda: decode_each(model, prompts, ar),
                                 "self_speculative": lambda: decode_each(model, prompts, spec)}, repeats)
    n = len(prompts) * new_tokens
    return {"exit_layer": exit_layer, "draft_len": draft_len, "identical_tokens": outputs == reference,
            "acceptance": stats["acceptance"], "tokens_per_round": stats["tokens_per_round"],
            "layer_evals_per_token": stats["layer_evals_per_token"],
            "tokens_per_s": n / times["self_speculative"], "autoregressive_tokens_per_s": n / times["autoregressive"],
            "speedup": times["autoregressive"] / times["self_speculative"]}


def evaluate_variant(args, run_dir: Path, val: PackedDataset) -> dict:
    device = select_device(args.device)
    model, _ = load_model(resolve_checkpoint(run_dir), device=device)
    with torch.no_grad():
        result = evaluate_exits(model, validation_batches(val, args.eval_batch_size, max_batches=args.eval_batches),
                                device, args.max_draft_len)
        n = min(args.prompts, len(val))  # spread over the split: different documents
        prompts = [val[i * len(val) // n][:args.prompt_len].tolist() for i in range(n)]
        best = result["best"]
        result["decoding"] = measure_decoding(model, prompts, best["exit_layer"], best["draft_len"],
                                              args.new_tokens, args.repeats)
    return result


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default="data/demo", help="prepared stdlib corpus (make demo-data)")
    ap.add_argument("--runs-dir", default="runs/ablation")
    ap.add_argument("--results-dir", default=str(RESULTS))
    ap.add_argument("--name", default="ablation", help="results: <results-dir>/<name>.md, .json, <name>/*.png")
    ap.add_argument("--model", default="demo", help="model group the shape flags override")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--ffn-dim", type=int, default=192)
    ap.add_argument("--steps", type=int, default=600, help="from-scratch steps (every variant)")
    ap.add_argument("--continual-fraction", type=float, default=0.25, help="continual steps / --steps")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--continual-lr", type=float, default=3e-4)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--p-max", type=float, default=0.2)
    ap.add_argument("--eval-batches", type=int, default=8)
    ap.add_argument("--eval-batch-size", type=int, default=16)
    ap.add_argument("--max-draft-len", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: leave as is)")
    ap.add_argument("--device", default="cpu", help="training, evaluation and decoding device (cpu, auto, ...)")
    ap.add_argument("--wandb", default="disabled", help="logging.wandb.mode of the training runs")
    ap.add_argument("--reuse", action="store_true", help="keep finished runs, continue unfinished ones")
    ap.add_argument("--overwrite", action="store_true", help="delete existing variant run directories")
    ap.add_argument("--variants", default=",".join(FROM_SCRATCH + CONTINUAL))
    ap.add_argument("--notes", help="a markdown file inserted into the results after the figure (interpretation)")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.notes and not Path(args.notes).is_file():
        raise SystemExit(f"error: --notes {args.notes}: no such file")
    if not (Path(args.data_dir) / "manifest.json").is_file():
        raise SystemExit(f"error: --data-dir {args.data_dir}: no prepared data (run `make demo-data`)")
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(FROM_SCRATCH + CONTINUAL))
    if unknown or ("baseline" not in variants and set(variants) & set(CONTINUAL)):
        raise SystemExit(f"error: --variants {args.variants}: choose from {', '.join(FROM_SCRATCH + CONTINUAL)}; "
                         "continual variants need baseline")
    data, val = PackedDataset(args.data_dir, "train"), PackedDataset(args.data_dir, "val")
    overrides = variant_overrides(args)
    results: dict[str, dict] = {}
    started = time.perf_counter()
    for variant in variants:
        run_dir = Path(args.runs_dir) / variant
        wall = train_variant(args, data, variant, common_overrides(args, data, variant) + overrides[variant])
        result = evaluate_variant(args, run_dir, val)
        result["training"] = {**training_throughput(run_dir), "wall_s": wall}
        result["overrides"] = overrides[variant]
        results[variant] = result
        d = result["decoding"]
        print(f"[ablation] {variant}: last-exit loss {result['exits'][args.layers]['loss']:.4f}, best "
              f"E={d['exit_layer']} γ={d['draft_len']}, acceptance {d['acceptance']:.3f}, "
              f"{d['speedup']:.2f}x measured", flush=True)
    out = Path(args.results_dir)
    figures = write_figures(args, results, out / args.name)
    path = write_report(args, results, figures, out, time.perf_counter() - started,
                        "python -m bench.ablation " + " ".join(sys.argv[1:] if argv is None else argv))
    print(f"[ablation] wrote {path}")
    return results


if __name__ == "__main__":
    os.environ.setdefault("WANDB_SILENT", "true")
    main()
