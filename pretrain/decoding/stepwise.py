"""Prefill, and the one-token-per-forward strategies: autoregressive (all L blocks) and early exit
(blocks [0, E) then the shared head: cheaper, lossy)."""
from __future__ import annotations

import torch

from pretrain.decoding.agreement_chain import AgreementChain
from pretrain.decoding.runner import BlockRunner
from pretrain.decoding.sampling import SamplingConfig, choose
from pretrain.decoding.sequences import Sequences, drop_finished_rows


def prefill(runner: BlockRunner, seqs: Sequences, stop: int, sampling: SamplingConfig,
            generator: torch.Generator | None, agreement: AgreementChain | None = None, exit_layer: int = 0,
            prompt_positions: int = 64) -> None:
    """Run the prompts, right-padded to the longest, through blocks [0, stop) once; commit each
    row's first new token; crop the padding out of the cache; rows already finished leave. With
    `agreement` (started here), also read whether exit `exit_layer` agrees with the full model at
    each row's last `prompt_positions` prompt positions (two head evaluations on each)."""
    width = seqs.longest_prompt
    runner.in_prefill = True
    h, captured = runner.blocks(runner.embed(seqs.tokens[:, :width]), 0, stop,
                                (exit_layer,) if agreement is not None else ())
    last = h.gather(1, (seqs.prompt_len - 1)[:, None, None].expand(-1, 1, h.shape[-1]))
    logits = runner.head(last)[:, 0]
    reads = ()
    if agreement is not None:
        agreement.start(seqs.batch, h.device)
        # the window of each row's last positions, right-aligned on its prompt; before it: padding
        at = seqs.prompt_len[:, None] - min(prompt_positions, width) + torch.arange(min(prompt_positions, width),
                                                                                     device=h.device)
        mask = at >= 0
        index = at.clamp_min(0)[..., None].expand(-1, -1, h.shape[-1])
        reads = (agreement.read_prompt(runner.head(captured[exit_layer].gather(1, index)),
                                       runner.head(h.gather(1, index)), mask, sampling),)
    runner.in_prefill = False
    token, _ = choose(logits, sampling, generator)
    first, *counts = seqs.settle(seqs.commit(token[:, None], torch.ones_like(token)).sum(), *reads)
    if agreement is not None:
        agreement.add(counts, prompt=True)
    runner.stats.generated += first
    runner.stats.prefill_tokens += first
    runner.crop_to_committed(seqs.length, seqs.max_length, stop)
    drop_finished_rows(seqs, runner.cache, agreement)


def decode_stepwise(runner: BlockRunner, seqs: Sequences, stop: int, sampling: SamplingConfig,
                    generator: torch.Generator | None) -> None:
    """One token per forward through blocks [0, stop) until every row is finished
    (stop = L: autoregressive; stop = E < L: early exit), one host synchronisation per step.
    Nothing is ever rejected, so the cache needs no crop: a row's KV grows by the token it commits;
    finished rows leave the batch."""
    while seqs.batch:
        decode_step(runner, seqs, stop, sampling, generator)


def decode_step(runner: BlockRunner, seqs: Sequences, stop: int, sampling: SamplingConfig,
                generator: torch.Generator | None, track_lengths: bool = False, states: tuple = (),
                agreement: AgreementChain | None = None, exit_layer: int = 0) -> None:
    """One token for every row through blocks [0, stop). `track_lengths`: the synchronisation also
    reads the longest row and the most tokens a row may still take, so that a speculative round
    next (strategy auto) drafts no further than that. With `agreement`, the step also reads whether
    exit `exit_layer` agrees with the full model at this position (one more head evaluation).
    Finished rows leave the batch and `states` (e.g. the exit-query cache, the agreement chain)."""
    exits = (exit_layer,) if agreement is not None else ()
    h, captured = runner.blocks(runner.embed(seqs.last_tokens()[:, None]), 0, stop, exits)
    logits = runner.head(h)[:, 0]
    token, probs = choose(logits, sampling, generator)
    reads = () if agreement is None else (agreement.read_step(runner.head(captured[exit_layer])[:, 0], token, probs,
                                                               sampling),)
    runner.stats.rounds += seqs.batch
    committed, *counts = seqs.settle(seqs.commit(token[:, None], torch.ones_like(token)).sum(), *reads,
                                     lengths=track_lengths)
    runner.stats.generated += committed
    if agreement is not None:
        agreement.add(counts)
    drop_finished_rows(seqs, runner.cache, *states)
