"""The training loop: plan the step, run it, log, evaluate, checkpoint; resumable exactly."""
from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from pretrain.checkpoint.store import find_latest_checkpoint, load_checkpoint, save_checkpoint
from pretrain.config import ConfigError, RunConfig
from pretrain.data.dataset import PackedDataset
from pretrain.data.loader import TrainBatches
from pretrain.data.sources import open_split, source_list, validation_sets  # data: sources / mixing
from pretrain.device import synchronize
from pretrain.evaluation.early_exit_eval import format_eval_table
from pretrain.evaluation.run import evaluate
from pretrain.layerskip.plan import step_plan
from pretrain.metrics.flops import mfu, step_flops
from pretrain.metrics.logger import MetricsLogger
from pretrain.trainer.build import build_model, init_model_config, set_learning_rate
from parallel.mesh import setup_parallel, teardown_parallel
from parallel.runtime import build_trainer
from schedules.lr import learning_rate



def check_data_matches(cfg: RunConfig, data: PackedDataset) -> None:
    if data.seq_len != cfg.train.seq_len:
        raise ConfigError(f"train.seq_len={cfg.train.seq_len} but the data in data.dir={cfg.data.dir!r} "
                          f"was packed with seq_len={data.seq_len}; re-run prepare or set train.seq_len")
    if data.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                          f"vocabulary ({data.vocab_size}) in data.dir={cfg.data.dir!r}")


def resume_point(cfg: RunConfig, run_dir: Path) -> Path | None:
    mode = cfg.checkpoint.resume
    if mode == "none":
        return None
    if mode == "auto":
        return find_latest_checkpoint(run_dir)
    path = Path(mode)
    if not path.exists():
        raise ConfigError(f"checkpoint.resume={mode!r}: no such checkpoint")
    return path


def run_evaluation(cfg: RunConfig, model, val: PackedDataset, device, logger: MetricsLogger,
                   step: int, run_dir: Path) -> dict:
    result = evaluate(model, val, device, cfg.eval)
    result["step"] = step
    logger.log({"step": step, **{f"exit_{l}": s for l, s in result["exits"].items()},
                "best": result.get("best", {}), "decoding": result.get("decoding", {}),
                "sources": result.get("sources", {})}, kind="eval")  # data: per-source per-exit eval
    (run_dir / "eval.json").write_text(json.dumps(result, indent=2))
    return result


def evaluate_on_main(cfg: RunConfig, trainer, val: PackedDataset, device, logger: MetricsLogger,
                     step: int, run_dir: Path) -> dict:
    """Evaluate on rank 0 (under a parallel layout, on the whole model gathered there; the
    other ranks wait). Returns {} on the other ranks."""
    model = trainer.evaluation_model()
    result = {} if model is None else run_evaluation(cfg, model, val, device, logger, step, run_dir)
    trainer.barrier()
    return result


def train(cfg: RunConfig) -> dict:
    """Run (or resume) training; returns a summary with the per-step losses of this invocation."""
    run_dir = Path(cfg.run_dir)
    cfg = dataclasses.replace(cfg, model=init_model_config(cfg))
    # Checks the parallel layout against the launched world size, then (several processes)
    # creates the process group and the device mesh.
    ctx, created_group = setup_parallel(cfg)
    try:
        summary = _train(cfg, ctx, run_dir)
    except BaseException:
        if created_group:
            teardown_parallel(wait_for_peers=False)
        raise
    if created_group:
        teardown_parallel()
    return summary


def _train(cfg: RunConfig, ctx, run_dir: Path) -> dict:
    device = ctx.device
    run_dir.mkdir(parents=True, exist_ok=True)
    config_yaml = OmegaConf.to_yaml(OmegaConf.structured(cfg))
    if ctx.is_main:
        (run_dir / "config.yaml").write_text(config_yaml)

    # data: one data.dir or data.sources mixed by weight; val_data maps source name -> its val split
    train_data = open_split(cfg.data, "train")
    val_data = validation_sets(cfg.data)
    check_data_matches(cfg, train_data)
    tokenizer = Path(source_list(cfg.data)[0][1]) / "tokenizer.json"
    if tokenizer.is_file() and ctx.is_main:
        shutil.copyfile(tokenizer, run_dir / "tokenizer.json")

    trainer = build_trainer(cfg, ctx, build_model(cfg, device))
    batches = TrainBatches(train_data, cfg.train.global_batch_size, cfg.train.seed, dp_rank=ctx.dp_rank,
                           dp_size=ctx.dp_size, prefetch=2 if cfg.data.prefetch else 0)
    start_step, run_id = 0, None
    ckpt = resume_point(cfg, run_dir)
    if ckpt is not None:
        state = load_checkpoint(ckpt, trainer.model_parts, trainer.optimizer_parts)
        batches.load_state_dict(state["data"])
        start_step, run_id = state["step"], state.get("wandb_run_id")

    logger = MetricsLogger(run_dir, cfg.logging, enabled=ctx.is_main,
                           run_config=OmegaConf.to_container(OmegaConf.structured(cfg)),
                           total_steps=cfg.train.steps, start_step=start_step, run_id=run_id)
    if ckpt is not None:
        logger.write(f"resumed from {ckpt} at step {start_step}")

    losses: dict[int, float] = {}
    eval_result: dict = {}
    end = cfg.train.stop_at_step or cfg.train.steps
    for part in trainer.model_parts:
        part.train()
    for step, batch in batches:
        if step >= end:
            break
        plan = step_plan(cfg, step)
        lr = learning_rate(step, base_lr=cfg.optim.lr, warmup_steps=cfg.optim.warmup_steps,
                           total_steps=cfg.train.steps, min_lr_ratio=cfg.optim.min_lr_ratio,
                           decay=cfg.optim.decay)
        set_learning_rate(trainer.optimizer, lr)
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        started = time.perf_counter()
        result = trainer.train_step(plan, batch)
        synchronize(device)
        elapsed = time.perf_counter() - started
        losses[step] = result.loss
        logger.advance(1, postfix=f"loss {result.loss:.3f}")
        done = step + 1
        if done % cfg.logging.every == 0 or done == cfg.train.steps:
            tokens_per_s = result.tokens / elapsed
            # FLOPs actually run: block-rows not dropped, exit heads only where on
            flops = step_flops(cfg.model, cfg.train.seq_len, result.rows_run,
                               cfg.train.global_batch_size * len(plan.exit_weights))
            util = mfu(flops, elapsed, cfg.train.peak_flops, ctx.layout.world_size)
            logger.log({"step": step, "loss": result.loss,
                        "exit_loss": {str(l): v for l, v in result.exit_losses.items()},
                        "lr": lr, "grad_norm": result.grad_norm, "tokens_per_s": tokens_per_s,
                        "step_time_s": elapsed, "tflops_per_s": flops / elapsed / 1e12,
                        **({"mfu": util} if util is not None else {}),
                        "blocks_run_fraction": result.rows_run / max(result.rows_total, 1),
                        "layer_dropout_rate": list(plan.drop_rates),
                        "tokens_seen": batches.tokens_seen(done)},  # data: training tokens per source
                       console=f"step {step:>6d} loss {result.loss:.4f} "
                               f"(exit {cfg.model.n_layers}: {result.exit_losses[cfg.model.n_layers]:.4f}) "
                               f"lr {lr:.2e} gnorm {result.grad_norm:.3f} tok/s {tokens_per_s:,.0f}"
                               + (f" mfu {100 * util:.1f}%" if util is not None else ""))
        if cfg.eval.every and done % cfg.eval.every == 0 and done < cfg.train.steps:
            eval_result = evaluate_on_main(cfg, trainer, val_data, device, logger, step, run_dir)
        if (cfg.checkpoint.every and done % cfg.checkpoint.every == 0) or done == end:
            save_checkpoint(run_dir, done, trainer.model_parts, trainer.optimizer_parts,
                            {"data": batches.state_dict(), "wandb_run_id": logger.run_id},
                            config_yaml, cfg.checkpoint.keep)
    if start_step < end == cfg.train.steps:
        eval_result = evaluate_on_main(cfg, trainer, val_data, device, logger, cfg.train.steps - 1, run_dir)
        if eval_result:
            logger.write(format_eval_table(eval_result))
    logger.close()
    return {"losses": losses, "eval": eval_result, "run_dir": str(run_dir)}
