"""Shared helpers of the torchrun scripts: a tiny LayerSkip config, synthetic global batches,
a single-process reference run, and comparisons."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pretrain.config import RunConfig  # noqa: E402
from pretrain.layerskip.plan import step_plan  # noqa: E402
from pretrain.model import LayerSkipTransformer  # noqa: E402
from pretrain.trainer.build import build_optimizer, set_learning_rate  # noqa: E402
from pretrain.trainer.step import train_step  # noqa: E402
from schedules.lr import learning_rate  # noqa: E402

torch.set_num_threads(1)


def tiny_config(*, steps: int = 3, global_batch: int = 8, micro_batch: int = 2, seq_len: int = 16,
                p_max: float = 0.5, tie: bool = False, adam_eps: float = 1e-8,
                activation_checkpointing: bool = False, checkpoint_heads: bool = False, **parallel) -> RunConfig:
    cfg = RunConfig()
    m = cfg.model
    m.vocab_size, m.dim, m.n_layers, m.n_heads, m.n_kv_heads = 64, 32, 4, 4, 2
    m.ffn_dim, m.max_seq_len, m.tie_embeddings = 64, 32, tie
    tr = cfg.train
    tr.steps, tr.global_batch_size, tr.micro_batch_size, tr.seq_len, tr.device = steps, global_batch, micro_batch, seq_len, "cpu"
    tr.activation_checkpointing = activation_checkpointing
    ls = cfg.layerskip
    ls.early_exit.checkpoint_heads = checkpoint_heads
    ls.layer_dropout.p_max, ls.layer_dropout.time_scale = p_max, "constant"
    ls.early_exit.curriculum, ls.early_exit.rotation_period = "rotational", 2
    cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.grad_clip, cfg.optim.eps = 1e-2, 0, 1.0, adam_eps
    for key, value in parallel.items():
        setattr(cfg.parallel, key, value)
    return cfg


def global_batch(cfg: RunConfig, step: int) -> dict[str, torch.Tensor]:
    """A pure function of the step: random tokens, global sample ids step·B + b."""
    B, T, V = cfg.train.global_batch_size, cfg.train.seq_len, cfg.model.vocab_size
    g = torch.Generator().manual_seed(1000 + step)
    seq = torch.randint(0, V, (B, T + 1), generator=g)
    return {"tokens": seq[:, :-1].contiguous(), "targets": seq[:, 1:].contiguous(),
            "sample_ids": torch.arange(step * B, (step + 1) * B)}


def rank_batch(batch: dict[str, torch.Tensor], dp_rank: int, dp_size: int) -> dict[str, torch.Tensor]:
    per = batch["tokens"].shape[0] // dp_size
    return {k: v[dp_rank * per:(dp_rank + 1) * per] for k, v in batch.items()}


def fresh_model(cfg: RunConfig) -> LayerSkipTransformer:
    torch.manual_seed(cfg.train.seed)
    return LayerSkipTransformer(cfg.model)


def lr_at(cfg: RunConfig, step: int) -> float:
    return learning_rate(step, base_lr=cfg.optim.lr, warmup_steps=cfg.optim.warmup_steps,
                         total_steps=cfg.train.steps, min_lr_ratio=cfg.optim.min_lr_ratio, decay=cfg.optim.decay)


def reference_run(cfg: RunConfig) -> tuple[list[float], dict[int, dict[int, float]], dict[str, torch.Tensor]]:
    """The single-process trainer's step on the whole global batch: losses, per-exit losses, final weights."""
    model = fresh_model(cfg)
    opt = build_optimizer(cfg, model, torch.device("cpu"))
    losses, exits = [], {}
    for step in range(cfg.train.steps):
        set_learning_rate(opt, lr_at(cfg, step))
        batch = global_batch(cfg, step)
        r = train_step(model, opt, step_plan(cfg, step), batch, micro_batch_size=cfg.train.micro_batch_size,
                       step_tokens=batch["targets"].numel(), grad_clip=cfg.optim.grad_clip)
        losses.append(r.loss)
        exits[step] = r.exit_losses
    return losses, exits, {k: v.detach().clone() for k, v in model.state_dict().items()}


def max_rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def report(payload: dict) -> None:
    """One JSON line the pytest side parses."""
    print("RESULT " + json.dumps(payload), flush=True)

