"""Self-speculative decoding with the KVQ cache, batched over rows of different lengths.

A round, for every row at once; N-1 is the position of the row's last committed token, which has
not been run yet (every layer's KV cache holds positions < N-1):
  draft   for i = 0..γ-1: blocks [0, E) on the previous token at position N-1+i (writing the early
          blocks' KV), the shared head gives draft d_{i+1}; the exit hidden state goes to the
          exit-query cache;
  verify  blocks [0, E) on d_γ only, the one draft not yet cached, then blocks [E, L) on the γ+1
          cached exit hidden states, positions N-1..N-1+γ, in one forward; the head gives the
          full model's prediction after each of them;
  accept  per row, the longest accepted prefix (greedy: agreeing with the full model's argmax;
          sampling: accepted with probability min(1, p/q)), plus one token of the full model: its
          argmax, a draw from norm(max(0, p - q)) after a rejection, or from p when all drafts
          were accepted (the bonus token);
  crop    every layer's KV (early and late) back to the committed tokens but the last, and the
          exit-query cache to empty: rejected drafts are gone. Rows that already finished ride
          along and are cropped back each round.
"""
from __future__ import annotations

import torch

from pretrain.decoding.adaptive_draft import AdaptiveDraftLength
from pretrain.decoding.dynamic_exit import DynamicExit
from pretrain.decoding.kv_cache import ExitQueryCache
from pretrain.decoding.runner import BlockRunner
from pretrain.decoding.sampling import (SamplingConfig, acceptance_probability, accept_drafts, choose,
                                        probabilities, residual_sample)
from pretrain.decoding.sequences import Sequences


def speculative_round(runner: BlockRunner, seqs: Sequences, queries: ExitQueryCache, exit_layer: int,
                      draft_len: int, sampling: SamplingConfig, generator: torch.Generator | None,
                      adaptive: AdaptiveDraftLength | None = None, probes: list[int] = (),
                      score_exits: bool = False) -> dict[int, tuple[float, int]]:
    """One draft/verify round for every unfinished row. With `score_exits`, returns {exit: (score,
    positions)}, the per-exit acceptance evidence (see dynamic_exit.py) for the exit used and the
    probed exits; otherwise {}."""
    L, E = runner.num_layers, exit_layer
    device = seqs.tokens.device
    active = seqs.active
    rows = int(active.sum())
    # a round commits at most γ+1 tokens: no drafting past what any row may still take
    gamma = min(draft_len, seqs.most_remaining() - 1)
    early_probes = [e for e in probes if e < E]
    late_probes = [e for e in probes if E < e < L]
    early_captured: dict[int, list[torch.Tensor]] = {e: [] for e in early_probes}

    def early_blocks(tokens: torch.Tensor) -> torch.Tensor:
        h, captured = runner.blocks(runner.embed(tokens[:, None]), 0, E, rows, early_probes)
        queries.append(h)
        for e in early_probes:
            early_captured[e].append(captured[e])
        return h

    # --- draft
    drafts, draft_q, draft_logits = [], [], []
    limit = torch.full((seqs.batch,), max(gamma, 0), dtype=torch.long, device=device)
    stopped = ~active
    previous = seqs.last_tokens()
    for i in range(gamma):
        logits = runner.head(early_blocks(previous), rows)[:, 0]
        draft_logits.append(logits)
        token, q = choose(logits, sampling, generator)
        if adaptive is not None and i > 0:  # one draft always: it is the threshold's feedback
            unsure = ~stopped & adaptive.unsure(q if q is not None else torch.softmax(logits.float(), -1))
            limit = torch.where(unsure, i, limit)
            stopped |= unsure
            if bool(stopped.all()):
                break  # the unsure token is dropped; its input's exit state stays cached
        drafts.append(token)
        draft_q.append(q)
        previous = token
    G = len(drafts)
    if queries.count == G:  # d_G has not been through the early blocks yet
        early_blocks(previous)

    # --- verify
    h, late_captured = runner.blocks(queries.states(), E, L, rows, late_probes)
    queries.crop(0)
    logits = runner.head(h, rows)                                   # [B, G+1, V]
    target_top = logits.argmax(-1)
    p = None if sampling.greedy else probabilities(logits, sampling)

    # --- accept
    if G:
        d = torch.stack(drafts, 1)
        if sampling.greedy:
            ok = d == target_top[:, :G]
        else:
            ok = accept_drafts(d, torch.stack(draft_q, 1), p[:, :G], generator)
        ok &= torch.arange(G, device=device)[None, :] < limit[:, None]
        n_accepted = ok.long().cumprod(1).sum(1)
    else:
        d = torch.zeros(seqs.batch, 0, dtype=torch.long, device=device)
        n_accepted = torch.zeros(seqs.batch, dtype=torch.long, device=device)
    if sampling.greedy:
        extra = target_top.gather(1, n_accepted[:, None]).squeeze(1)
    else:
        p_next = p.gather(1, n_accepted[:, None, None].expand(-1, 1, p.shape[-1]))[:, 0]
        extra = torch.multinomial(p_next, 1, generator=generator).squeeze(1)
        rejected = n_accepted < limit
        if G and bool(rejected.any()):
            q = torch.stack(draft_q, 1)
            q_at = q.gather(1, n_accepted.clamp_max(G - 1)[:, None, None].expand(-1, 1, q.shape[-1]))[:, 0]
            extra = torch.where(rejected, residual_sample(p_next, q_at, generator), extra)
    new = torch.cat([d, torch.zeros_like(extra)[:, None]], 1).scatter(1, n_accepted[:, None], extra[:, None])

    # --- commit, crop, count
    drafted, accepted, rejections = torch.stack([
        limit.masked_fill(~active, 0).sum(), n_accepted.masked_fill(~active, 0).sum(),
        ((n_accepted < limit) & active).sum()]).tolist()
    stats = runner.stats
    stats.generated += seqs.commit(new, n_accepted + 1)
    runner.crop_to_committed(seqs.length)
    stats.drafted += drafted
    stats.accepted += accepted
    stats.rejections += rejections
    stats.rounds += rows
    stats.exit_layers.append(E)
    stats.draft_lens.append(G)
    if adaptive is not None:
        adaptive.update(accepted, accepted + rejections)

    if not score_exits:
        return {}
    # --- per-exit acceptance evidence, on positions whose inputs were committed (0..n_accepted)
    valid = (torch.arange(G + 1, device=device)[None, :] <= n_accepted[:, None]) & active[:, None]
    evidence = {}
    if draft_logits:  # the exit in use, from its own drafts
        mask = valid[:, :len(draft_logits)]
        evidence[E] = _score(torch.stack(draft_logits, 1)[mask], logits[:, :mask.shape[1]][mask], sampling)
    hidden = dict(late_captured)
    hidden.update({e: torch.cat(hs, 1) for e, hs in early_captured.items()})
    for e, states in hidden.items():  # probed exits: the shared head on the captured states
        n = int(valid.sum())
        if n:
            evidence[e] = _score(runner.head(states[valid], n), logits[valid], sampling)
    return evidence


def _score(exit_logits: torch.Tensor, full_logits: torch.Tensor, sampling: SamplingConfig) -> tuple[float, int]:
    """[N, V] logits of an exit and of the full model at N positions -> (sum over the positions of
    the probability that a draft from the exit is accepted, N)."""
    if sampling.greedy:
        score = (exit_logits.argmax(-1) == full_logits.argmax(-1)).sum()
    else:
        score = acceptance_probability(probabilities(exit_logits, sampling),
                                       probabilities(full_logits, sampling)).sum()
    return float(score), exit_logits.shape[0]


def decode_self_speculative(runner: BlockRunner, seqs: Sequences, exit_layer: int, draft_len: int,
                            sampling: SamplingConfig, generator: torch.Generator | None,
                            adaptive: AdaptiveDraftLength | None = None, dynamic: DynamicExit | None = None,
                            max_draft_len: int | None = None) -> None:
    """Rounds until every row is finished; with `dynamic`, E and γ are re-chosen after each round."""
    model = runner.model
    queries = ExitQueryCache(seqs.batch, max(draft_len, max_draft_len or 0) + 1, model.cfg.dim,
                             dtype=model.tok_embeddings.weight.dtype, device=seqs.tokens.device)
    round_index = 0
    while not seqs.all_finished():
        probes = dynamic.probe_exits(round_index) if dynamic is not None else []
        evidence = speculative_round(runner, seqs, queries, exit_layer, draft_len, sampling, generator,
                                     adaptive, probes, score_exits=dynamic is not None)
        if dynamic is not None:
            for e, (score, positions) in evidence.items():
                dynamic.observe(e, score, positions)
            exit_layer, draft_len = dynamic.choose()
        round_index += 1
