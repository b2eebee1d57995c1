"""FLOPs a LayerSkip training step actually executes, and model FLOP utilisation (MFU).

Counted per token, forward + backward (= 3 x forward), matmuls only:
  * a block row: 6 x (its matmul weights) + attention scores and values, 12 x T x H x Dh
    (QK^T and AV for every query over all T keys, the usual non-causal convention of PaLM's MFU);
  * an exit head: 6 x dim x vocab, once per exit that is on at the step.
Block rows skipped by layer dropout are left out (the trainer reports the rows it ran), and the
head is counted only at exits that are on. Embedding lookups, norms and activation recomputation
are not counted.
"""
from __future__ import annotations

from pretrain.model.config import ModelConfig


def block_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    attn_weights = cfg.dim * cfg.head_dim * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
    mlp_weights = 3 * cfg.dim * cfg.ffn_dim
    return 6.0 * (attn_weights + mlp_weights) + 12.0 * seq_len * cfg.n_heads * cfg.head_dim


def head_flops_per_token(cfg: ModelConfig) -> float:
    return 6.0 * cfg.dim * cfg.vocab_size


def step_flops(cfg: ModelConfig, seq_len: int, block_rows: int, head_rows: int) -> float:
    """block_rows: (sample, block) pairs run; head_rows: (sample, exit) pairs with a loss."""
    return seq_len * (block_rows * block_flops_per_token(cfg, seq_len) + head_rows * head_flops_per_token(cfg))


def mfu(flops: float, seconds: float, peak_flops_per_device: float, devices: int) -> float | None:
    """Achieved FLOP/s over the peak of all devices; None when no peak is configured."""
    if peak_flops_per_device <= 0 or seconds <= 0:
        return None
    return flops / seconds / (peak_flops_per_device * devices)
