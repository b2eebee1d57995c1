"""Prefill, and the one-token-per-step strategies: autoregressive (all L blocks) and early exit
(blocks before E, then the shared head: lossy)."""
from __future__ import annotations

import torch

from pretrain.decoding.batch import BlockRunner, Sequences
from pretrain.decoding.sampling import SamplingConfig, choose


def prefill(runner: BlockRunner, seqs: Sequences, stop: int, sampling: SamplingConfig,
            generator: torch.Generator | None) -> None:
    """Run the (right-padded) prompts through blocks [0, stop) once, commit the first new token."""
    width = int(seqs.prompt_len.max())
    positions = torch.arange(width, device=seqs.tokens.device).expand(len(seqs.length), -1)
    runner.counting_prefill = True
    h, _ = runner.blocks(runner.embed(seqs.tokens[:, :width]), positions, 0, stop, seqs.active)
    last = h.gather(1, (seqs.prompt_len - 1)[:, None, None].expand(-1, 1, h.shape[-1]))
    logits = runner.head(last, seqs.active)[:, 0]
    runner.counting_prefill = False
    token, _ = choose(logits, sampling, generator)
    first = seqs.commit(token[:, None], torch.ones_like(token))
    runner.stats.generated += first
    runner.stats.prefill_tokens += first


def decode_stepwise(runner: BlockRunner, seqs: Sequences, stop: int, sampling: SamplingConfig,
                    generator: torch.Generator | None) -> None:
    """One token per forward through blocks [0, stop) until every row is finished."""
    while not bool(seqs.finished.all()):
        active = seqs.active
        positions = (seqs.length - 1)[:, None]
        h, _ = runner.blocks(runner.embed(seqs.last_tokens()[:, None]), positions, 0, stop, active)
        token, _ = choose(runner.head(h, active)[:, 0], sampling, generator)
        runner.stats.rounds += int(active.sum())
        runner.stats.generated += seqs.commit(token[:, None], torch.ones_like(token))
