"""Shared helpers of the torchrun scripts: a tiny LayerSkip config, synthetic global batches,
a single-process reference run written independently of pretrain.trainer, and comparisons."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
for path in (ROOT, ROOT / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from pretrain.config import RunConfig  # noqa: E402
from pretrain.data.loader import rank_slice  # noqa: E402
from pretrain.layerskip.early_exit_loss import early_exit_loss  # noqa: E402
from pretrain.layerskip.plan import StepPlan, step_plan  # noqa: E402
from pretrain.model import LayerSkipTransformer  # noqa: E402
from pretrain.trainer.build import build_optimizer, learning_rate_at as lr_at  # noqa: E402
from launch import report  # noqa: E402,F401  (the scripts' RESULT line)
from builders import tiny_model_config  # noqa: E402  (the tests' one tiny-model builder)

torch.set_num_threads(1)


def tiny_config(*, steps: int = 3, global_batch: int = 8, micro_batch: int = 2, seq_len: int = 16,
                p_max: float = 0.5, tie: bool = False, adam_eps: float = 1e-8,
                activation_checkpointing: bool = False, checkpoint_heads: bool = False, compile: bool = False,
                compile_backend: str = "inductor", loss_chunk_tokens: int = 0, **parallel) -> RunConfig:
    cfg = RunConfig(model=tiny_model_config(vocab_size=64, tie_embeddings=tie))
    tr = cfg.train
    tr.steps, tr.global_batch_size, tr.micro_batch_size, tr.seq_len, tr.device = steps, global_batch, micro_batch, seq_len, "cpu"
    tr.activation_checkpointing, tr.compile, tr.compile_backend = activation_checkpointing, compile, compile_backend
    ls = cfg.layerskip
    ls.early_exit.checkpoint_heads, ls.early_exit.loss_chunk_tokens = checkpoint_heads, loss_chunk_tokens
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
    """This data-parallel rank's rows of the global batch, as the data loader splits it."""
    return {k: rank_slice(v, dp_rank, dp_size) for k, v in batch.items()}


def fresh_model(cfg: RunConfig) -> LayerSkipTransformer:
    torch.manual_seed(cfg.train.seed)
    return LayerSkipTransformer(cfg.model)


def reference_step(model: LayerSkipTransformer, opt: torch.optim.Optimizer, plan: StepPlan,
                   batch: dict[str, torch.Tensor], micro_batch_size: int, grad_clip: float) -> tuple[float, dict]:
    """One LayerSkip step written plainly, without pretrain.trainer (the cross-check): the whole
    model per micro-batch, loss = sum_l w_l · CE_l with CE as a token sum over the step's tokens,
    zero gradients for blocks no row ran, clipping by the global norm, AdamW."""
    step_tokens = batch["targets"].numel()
    exit_sums: dict[int, float] = {}
    for i in range(0, batch["tokens"].shape[0], micro_batch_size):
        micro = {k: v[i:i + micro_batch_size] for k, v in batch.items()}
        hiddens = model(micro["tokens"], keep=plan.keep_masks(micro["sample_ids"]), exits=plan.exit_weights)
        loss, per_exit = early_exit_loss(model.exit_logits, hiddens, micro["targets"], plan.exit_weights, step_tokens)
        loss.backward()
        for layer, value in per_exit.items():
            exit_sums[layer] = exit_sums.get(layer, 0.0) + float(value)
    for p in model.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    torch.nn.utils.clip_grad_norm_(list(model.parameters()), grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return sum(plan.exit_weights[l] * v for l, v in exit_sums.items()), exit_sums


def reference_run(cfg: RunConfig) -> tuple[list[float], dict[int, dict[int, float]], dict[str, torch.Tensor]]:
    """`reference_step` on the whole global batch: losses, per-exit losses, final weights."""
    model = fresh_model(cfg)
    opt = build_optimizer(cfg, model, torch.device("cpu"))
    losses, exits = [0.0] * cfg.train.steps, {}
    for step in range(cfg.train.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step)
        losses[step], exits[step] = reference_step(model, opt, step_plan(cfg, step), global_batch(cfg, step),
                                                   cfg.train.micro_batch_size, cfg.optim.grad_clip)
    return losses, exits, {k: v.detach().clone() for k, v in model.state_dict().items()}


def max_rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)
