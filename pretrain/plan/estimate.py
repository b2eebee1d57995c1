"""Step time and tokens/s of a layout, predicted from the FLOPs the step executes
(pretrain/metrics/flops.py) at a stated utilisation.

    model FLOPs      = flops.step_flops(model, seq_len, block_rows = B·L, head_rows = B·exits_on)
                       (worst case: nothing dropped by layer dropout; B = global batch)
    executed FLOPs   = model FLOPs + recompute, recompute = B·L·seq_len·block_flops/3 with
                       activation checkpointing (each block's forward again) else 0
    step time        = executed FLOPs / (N · peak · plan.mfu) · (1 + bubble)
    bubble           = (pp - 1) / (micro-batches · virtual_stages)   (1F1B, GPipe, interleaved)
    tokens/s         = B · seq_len / step time;   MFU = model FLOPs / (step time · N · peak)

plan.mfu is the utilisation of the device's peak that the kernels reach on the work they do
(no recomputation, no pipeline bubble); the reported MFU is what remains after both. Communication
is assumed overlapped with compute (FSDP prefetching, async TP is not modelled): at large
tensor-parallel degrees across nodes the real step is slower.
"""
from __future__ import annotations

from dataclasses import dataclass

from pretrain.config import RunConfig
from pretrain.metrics.flops import block_flops_per_token, step_flops
from pretrain.plan.devices import Device
from parallel.dims import ParallelDims


@dataclass
class Throughput:
    model_flops: float
    executed_flops: float
    bubble: float
    step_s: float
    tokens_per_s: float
    mfu: float


def pipeline_bubble(dims: ParallelDims) -> float:
    if dims.pp == 1:
        return 0.0
    return (dims.pp - 1) / (dims.microbatches * dims.virtual_stages)


def predict_throughput(cfg: RunConfig, dims: ParallelDims, exits_on: int, device: Device,
                       mfu: float) -> Throughput:
    m, T, B, L = cfg.model, cfg.train.seq_len, cfg.train.global_batch_size, cfg.model.n_layers
    model = step_flops(m, T, block_rows=B * L, head_rows=B * exits_on)
    recompute = B * L * T * block_flops_per_token(m, T) / 3 if cfg.train.activation_checkpointing else 0.0
    bubble = pipeline_bubble(dims)
    peak = dims.world_size * device.peak_bf16_flops
    step_s = (model + recompute) / (peak * mfu) * (1 + bubble)
    return Throughput(model_flops=model, executed_flops=model + recompute, bubble=bubble, step_s=step_s,
                      tokens_per_s=B * T / step_s, mfu=model / (step_s * peak))
