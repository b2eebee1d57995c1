"""generate(): one entry point for the three strategies."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pretrain.decoding.batch import BlockRunner, DecodeStats, Sequences, Timer
from pretrain.decoding.cache import PositionalKVCache
from pretrain.decoding.controllers import AdaptiveDraftLength, DynamicExit
from pretrain.decoding.sampling import SamplingConfig
from pretrain.decoding.self_speculative import decode_self_speculative
from pretrain.decoding.stepwise import decode_stepwise, prefill

STRATEGIES = ("autoregressive", "early_exit", "self_speculative")


@dataclass
class DecodeOptions:
    strategy: str = "self_speculative"
    max_new_tokens: int = 64
    exit_layer: int | None = None        # E; default L // 4 (at least 1)
    draft_len: int = 4                   # γ (the maximum when adaptive)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    eos_id: int | None = None
    seed: int = 0
    adaptive_draft: bool = False
    draft_threshold: float = 0.5         # initial τ
    target_acceptance: float = 0.8
    dynamic_exit: bool = False
    max_draft_len: int = 8               # γ range searched by the dynamic exit


def _validate(opts: DecodeOptions, num_layers: int) -> int:
    if opts.strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {opts.strategy!r}; choose one of {', '.join(STRATEGIES)}")
    exit_layer = opts.exit_layer if opts.exit_layer is not None else max(1, num_layers // 4)
    if opts.strategy != "autoregressive" and not 1 <= exit_layer < num_layers:
        raise ValueError(f"exit_layer={exit_layer} must be in 1..{num_layers - 1} (the model has {num_layers} layers)")
    if opts.draft_len < 1 or opts.max_draft_len < 1:
        raise ValueError(f"draft_len={opts.draft_len} and max_draft_len={opts.max_draft_len} must be >= 1")
    if opts.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={opts.max_new_tokens} must be >= 1")
    return exit_layer


@torch.no_grad()
def generate(model: torch.nn.Module, prompts: list[list[int]], opts: DecodeOptions
             ) -> tuple[list[list[int]], DecodeStats]:
    """New tokens per prompt (prompts may differ in length) and the decoding statistics."""
    L = model.cfg.n_layers
    exit_layer = _validate(opts, L)
    device = model.tok_embeddings.weight.device
    was_training = model.training
    model.eval()
    gamma_cap = max(opts.draft_len, opts.max_draft_len if opts.dynamic_exit else 0)
    seqs = Sequences(prompts, opts.max_new_tokens, opts.eos_id, spare=gamma_cap + 2, device=device)
    if seqs.capacity > model.cfg.max_seq_len:
        raise ValueError(f"longest prompt + max_new_tokens + draft needs {seqs.capacity} positions, "
                         f"the model allows {model.cfg.max_seq_len}")
    stats = DecodeStats()
    runner = BlockRunner(model, PositionalKVCache.for_model(model, len(prompts), seqs.capacity), stats)
    generator = torch.Generator(device=device).manual_seed(opts.seed)
    prefill_stop = exit_layer if opts.strategy == "early_exit" else L
    with Timer(stats, device):
        prefill(runner, seqs, prefill_stop, opts.sampling, generator)
        if opts.strategy == "self_speculative":
            adaptive = (AdaptiveDraftLength(opts.draft_threshold, opts.target_acceptance)
                        if opts.adaptive_draft else None)
            dynamic = (DynamicExit(L, exit_layer, opts.draft_len, gamma_cap) if opts.dynamic_exit else None)
            decode_self_speculative(runner, seqs, exit_layer, opts.draft_len, opts.sampling, generator,
                                    adaptive, dynamic)
        else:
            decode_stepwise(runner, seqs, prefill_stop, opts.sampling, generator)
    model.train(was_training)
    return seqs.outputs(), stats
