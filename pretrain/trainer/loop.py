"""The training loop: check everything, then for each step plan -> step -> log -> maybe save;
resumable exactly. Checkpoints (where, when, resume with fallback, rollback, the asynchronous
writer) are the Checkpointer's (pretrain/checkpoint/checkpointer.py); what keeps a long run safe
on a shared cluster (run lock, signals and time limit, non-finite guard, hang watchdog) is
pretrain/operations/, called at the points marked `ops.` (see pretrain/operations/session.py)."""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from pretrain.checkpoint.checkpointer import Checkpointer
from pretrain.config import RunConfig
from pretrain.data.dataset import PackedDataset
from pretrain.data.loader import TrainBatches
from pretrain.data.sources import source_list
from pretrain.device import peak_memory_bytes, synchronize
from pretrain.evaluation.early_exit_eval import format_eval_table
from pretrain.evaluation.evaluate import evaluate
from pretrain.downstream.report import with_earlier_downstream
from pretrain.downstream.training import downstream_at_evaluation
from pretrain.layerskip.plan import step_plan
from pretrain.metrics.flops import mfu, step_flops
from pretrain.files import write_atomic
from pretrain.metrics.logger import MetricsLogger
from pretrain.metrics.sinks import safe_print
from pretrain.operations.compile_events import compile_events
from pretrain.operations.nonfinite import finite_tree
from pretrain.operations.run_dir import for_restarted_workers
from pretrain.operations.session import RunOperations
from pretrain.trainer.build import build_model, learning_rate_at
from pretrain.trainer.preflight import CheckedRun, check_run
from pretrain.trainer.summary import startup_summary
from pretrain.trainer.trainer import Trainer
from parallel.mesh import launched_world_size, setup_parallel, teardown_parallel


def write_run_files(run: CheckedRun, config_yaml: str, extra_files: dict[str, str]) -> None:
    """What the run directory records (rank 0; after every check has passed): the resolved config,
    the tokenizer, and `extra_files` (relative path -> text, e.g. the composed Hydra config); each
    file replaced atomically."""
    run_dir = Path(run.cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(run_dir / "config.yaml", config_yaml)
    for rel, text in extra_files.items():
        (run_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(run_dir / rel, text)
    tokenizer = Path(source_list(run.cfg.data)[0][1]) / "tokenizer.json"  # sources share one tokenizer
    if tokenizer.is_file():
        write_atomic(run_dir / "tokenizer.json", tokenizer.read_text(encoding="utf-8"))


def train(cfg: RunConfig, extra_files: dict[str, str] | None = None) -> dict:
    """Run (or resume) training; returns a summary with the per-step losses of this invocation.
    Every check runs first (ConfigError naming the key, nothing written); then, with several
    processes, the process group and the device mesh are created. Raises RunInterrupted (exit 75)
    after writing a checkpoint on a signal or at the time limit."""
    run = check_run(for_restarted_workers(cfg), launched_world_size())
    created_group = setup_parallel(run.dims, run.cfg.train.collective_timeout_s)
    try:
        summary = _train(run, extra_files or {})
    except BaseException:
        if created_group:
            teardown_parallel(wait_for_peers=False)
        raise
    if created_group:
        teardown_parallel()
    if summary.get("interrupted"):
        raise summary["interrupted"]
    return summary


def evaluate_on_main(cfg: RunConfig, trainer: Trainer, val: dict[str, PackedDataset], logger: MetricsLogger,
                     step: int) -> dict:
    """Evaluate on rank 0 (under a parallel layout, on the whole model gathered there; the
    other ranks wait). Writes eval.json (never with a non-finite number); returns {} on the other
    ranks."""
    model = trainer.evaluation_model()
    result = {}
    if model is not None:
        # blocks compiled for training run eagerly here: decoding changes every size each token
        with torch.compiler.set_stance("force_eager"):
            result = {**evaluate(model, val, trainer.dims.device, cfg.eval), "step": step}
            result.update(downstream_at_evaluation(model, cfg, step, logger))   # eval.tasks (off by default)
        logger.log({"step": step, **{f"exit_{l}": s for l, s in result["exits"].items()},
                    "best": result.get("best", {}), "decoding": result.get("decoding", {}),
                    "sources": result.get("sources", {})}, kind="eval")
        if finite_tree(result):
            path = Path(cfg.run_dir) / "eval.json"
            write_atomic(path, json.dumps(with_earlier_downstream(path, result), indent=2))
        else:
            logger.write(f"warning: evaluation at step {step} gave non-finite values; eval.json not written")
    trainer.barrier()
    return result


def final_eval_done(run_dir: Path, steps: int) -> bool:
    """eval.json holds the final evaluation (a run killed during it has none: the rerun evaluates)."""
    try:
        return json.loads((run_dir / "eval.json").read_text()).get("step") == steps - 1
    except (OSError, ValueError):
        return False


def _train(run: CheckedRun, extra_files: dict[str, str]) -> dict:
    cfg, dims = run.cfg, run.dims
    trainer = Trainer(cfg, dims, build_model(cfg))
    report = lambda line: safe_print(line) if dims.is_main else None  # noqa: E731
    # ops: the run lock, before anything in the run directory is written; then the checkpoint
    # directory and its lock
    ops = RunOperations(cfg, Path(cfg.run_dir), dims.rank, dims.world_size, trainer.all_reduce_max, report)
    ops.open()
    checkpointer = Checkpointer(cfg, dims.rank, dims.world_size, trainer.all_reduce_max, report)
    failed = True
    try:
        checkpointer.open()
        summary = _train_locked(run, extra_files, trainer, ops, checkpointer)
        failed = False
        return summary
    finally:
        try:
            checkpointer.close(failed=failed)   # a save in flight (finite weights) completes
        finally:
            ops.close()


def _train_locked(run: CheckedRun, extra_files: dict[str, str], trainer: Trainer, ops: RunOperations,
                  checkpointer: Checkpointer) -> dict:
    cfg, dims = run.cfg, run.dims
    run_dir = Path(cfg.run_dir)
    config_yaml = checkpointer.config_yaml   # the resolved config, as each checkpoint records it
    batches = TrainBatches(run.train_data, cfg.train.global_batch_size, cfg.train.seed, dp_rank=dims.dp_rank,
                           dp_size=dims.dp, prefetch=2 if cfg.data.prefetch else 0)
    checkpointer.track(trainer.model_parts, trainer.optimizer_parts)
    resumed, state = checkpointer.resume()  # the newest checkpoint that passes every check
    start_step, run_id = 0, None
    if resumed is not None:
        batches.load_state_dict(state["data"])
        start_step, run_id = state["step"], state.get("wandb_run_id")
    if dims.is_main:
        write_run_files(run, config_yaml, extra_files)

    logger = MetricsLogger(run_dir, cfg.logging, enabled=dims.is_main,
                           run_config=OmegaConf.to_container(OmegaConf.structured(cfg)),
                           total_steps=cfg.train.steps, start_step=start_step, run_id=run_id)
    if resumed is not None:
        logger.write(f"resumed from {resumed} at step {start_step}")
    if dims.is_main:  # what this run is about to do
        logger.write(startup_summary(cfg, dims, run.train_data, resumed, start_step))
    trainer.apply_update = ops.guard  # the non-finite guard decides whether the optimizer steps
    ops.start()
    checkpointer.start(ops, lambda: {"data": batches.state_dict(), "wandb_run_id": logger.run_id})
    return _loop(run, trainer, ops, checkpointer, batches, logger, start_step)


def _loop(run: CheckedRun, trainer: Trainer, ops: RunOperations, checkpointer: Checkpointer,
          batches: TrainBatches, logger: MetricsLogger, start_step: int) -> dict:
    cfg, dims = run.cfg, run.dims
    run_dir, device = Path(cfg.run_dir), dims.device
    losses: dict[int, float] = {}
    eval_result: dict = {}
    interrupted = None
    end = cfg.train.stop_at_step or cfg.train.steps
    for part in trainer.model_parts:
        part.train()
    for step, batch in batches:
        if step >= end:
            break
        plan = step_plan(cfg, step)
        lr = learning_rate_at(cfg, step)
        trainer.optimizer.set_learning_rate(lr)
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        ops.before_step(step)
        started = time.perf_counter()
        result = trainer.train_step(plan, batch)
        synchronize(device)
        elapsed = time.perf_counter() - started
        losses[step] = result.loss
        logger.advance(1, postfix=f"loss {result.loss:.3f}")
        done = step + 1
        if result.skipped:
            logger.log({"step": step, "skipped": True, "loss": result.loss, "grad_norm": result.grad_norm,
                        "nonfinite_skipped": ops.guard.skipped}, kind="nonfinite",
                       console=f"step {step:>6d} skipped (non-finite guard): loss {result.loss}, grad norm "
                               f"{result.grad_norm} ({ops.guard.skipped} skipped so far)")
        if ops.after_step(elapsed) == "rollback":  # raises NonFiniteStop per train.nonfinite_policy
            ops.rolled_back(checkpointer.rollback(), step)   # raises NonFiniteStop when there is none
        if not result.skipped and (done % cfg.logging.every == 0 or done == cfg.train.steps):
            tokens_per_s = result.tokens / elapsed
            # FLOPs actually run: block-rows not dropped, exit heads only where on
            flops = step_flops(cfg.model, cfg.train.seq_len, result.rows_run,
                               cfg.train.global_batch_size * len(plan.exit_weights))
            util = mfu(flops, elapsed, cfg.train.peak_flops, dims.world_size)
            logger.log({"step": step, "loss": result.loss,
                        "exit_loss": {str(l): v for l, v in result.exit_losses.items()},
                        "lr": lr, "grad_norm": result.grad_norm, "tokens_per_s": tokens_per_s,
                        "step_time_s": elapsed, "tflops_per_s": flops / elapsed / 1e12,
                        **({"mfu": util} if util is not None else {}),
                        "blocks_run_fraction": result.rows_run / max(result.rows_total, 1),
                        "layer_dropout_rate": list(plan.drop_rates),
                        "tokens_seen": batches.tokens_seen(done),
                        "peak_memory_mib": peak_memory_bytes(device) / 2**20,
                        **(compile_events().metrics() if cfg.train.compile else {})},  # a recompile storm shows
                       console=f"step {step:>6d} loss {result.loss:.4f} "
                               f"(exit {cfg.model.n_layers}: {result.exit_losses[cfg.model.n_layers]:.4f}) "
                               f"lr {lr:.2e} gnorm {result.grad_norm:.3f} tok/s {tokens_per_s:,.0f}"
                               + (f" mfu {100 * util:.1f}%" if util is not None else ""))
        if cfg.eval.every and done % cfg.eval.every == 0 and done < cfg.train.steps:
            with ops.suspended():
                eval_result = evaluate_on_main(cfg, trainer, run.val_data, logger, step)
        stop = checkpointer.maybe_save(done, clean=ops.guard.clean)  # one all-reduce; policy.py decides
        if stop is not None:  # (at the last step too: the final evaluation runs on the rerun)
            interrupted = ops.leave(done, stop)
            break
    checkpointer.wait()   # the final checkpoint is on disk before the final evaluation
    final_eval_pending = start_step < end == cfg.train.steps or \
        (end == cfg.train.steps and ops.agree([float(dims.is_main and not final_eval_done(run_dir, end))])[0] > 0)
    if interrupted is None and final_eval_pending:
        with ops.suspended():
            eval_result = evaluate_on_main(cfg, trainer, run.val_data, logger, cfg.train.steps - 1)
        if eval_result:
            logger.write(format_eval_table(eval_result))
    logger.close()
    return {"losses": losses, "eval": eval_result, "run_dir": str(run_dir), "interrupted": interrupted,
            "nonfinite_skipped": ops.guard.skipped}
