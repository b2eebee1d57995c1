"""Prefill, and the one-token-per-forward strategies: autoregressive (all L blocks) and early exit
(blocks [0, E) then the shared head: cheaper, lossy)."""
from __future__ import annotations

import torch

from pretrain.decoding.runner import BlockRunner
from pretrain.decoding.sampling import SamplingConfig, choose
from pretrain.decoding.sequences import Sequences


def prefill(runner: BlockRunner, seqs: Sequences, stop: int, sampling: SamplingConfig,
            generator: torch.Generator | None) -> None:
    """Run the prompts, right-padded to the longest, through blocks [0, stop) once; commit each
    row's first new token; crop the padding out of the cache."""
    width = int(seqs.prompt_len.max())
    runner.in_prefill = True
    h, _ = runner.blocks(runner.embed(seqs.tokens[:, :width]), 0, stop, seqs.batch)
    last = h.gather(1, (seqs.prompt_len - 1)[:, None, None].expand(-1, 1, h.shape[-1]))
    logits = runner.head(last, seqs.batch)[:, 0]
    runner.in_prefill = False
    token, _ = choose(logits, sampling, generator)
    first = seqs.commit(token[:, None], torch.ones_like(token))
    runner.stats.generated += first
    runner.stats.prefill_tokens += first
    runner.crop_to_committed(seqs.length, stop)


def decode_stepwise(runner: BlockRunner, seqs: Sequences, stop: int, sampling: SamplingConfig,
                    generator: torch.Generator | None) -> None:
    """One token per forward through blocks [0, stop) until every row is finished
    (stop = L: autoregressive; stop = E < L: early exit). Nothing is ever rejected, so the cache
    needs no crop: an unfinished row's KV grows by the token it commits; a finished row's keeps
    growing by the ignored tokens it rides along with, within the slots its max_new_tokens left."""
    while not seqs.all_finished():
        rows = int(seqs.active.sum())
        h, _ = runner.blocks(runner.embed(seqs.last_tokens()[:, None]), 0, stop, rows)
        token, _ = choose(runner.head(h, rows)[:, 0], sampling, generator)
        runner.stats.rounds += rows
        runner.stats.generated += seqs.commit(token[:, None], torch.ones_like(token))
