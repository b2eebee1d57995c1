"""Self-speculative decoding with the KVQ cache, batched over rows of different lengths, each row
with its own draft length and its own progress.

A round, for every row of the batch at once; N-1 is the position of the row's last committed
token, which has not been run yet (every layer's KV cache holds positions < N-1):
  draft   for i = 0..G-1: blocks [0, E) on the previous token at position N-1+i (writing the early
          blocks' KV), the shared head gives draft d_{i+1}; the exit hidden state goes to the
          exit-query cache. Row b keeps its first γ_b drafts (its own draft length, capped by what
          it may still commit, cut further by the adaptive draft, which also ends the batch's
          drafting when too few rows still draft); G = max γ_b, the other rows' extra drafts ride
          along and are ignored;
  verify  blocks [0, E) on d_G only, the one draft not yet cached, then blocks [E, L) on the G+1
          cached exit hidden states, positions N-1..N-1+G, in one forward; the head gives the
          full model's prediction after each of them;
  accept  per row, the longest accepted prefix of its γ_b drafts (greedy: agreeing with the full
          model's argmax; sampling: accepted with probability min(1, p/q)), plus one token of the
          full model: its argmax, a draw from norm(max(0, p - q)) after a rejection, or from p
          when all γ_b drafts were accepted (the bonus token);
  settle  the round's one host synchronisation reads the statistics and the rows that finished;
          every layer's KV (early and late) is cropped to each row's committed tokens but the last
          (rejected drafts and the ignored ones are gone), and finished rows leave the batch.
Rows therefore advance independently: a row that accepted all its drafts commits γ_b + 1 tokens
while its neighbour commits 1, and a row that is done stops costing anything.
"""
from __future__ import annotations

import torch

from pretrain.decoding.adaptive_draft import AdaptiveDraftLength
from pretrain.decoding.agreement_chain import AgreementChain
from pretrain.decoding.dynamic_exit import DynamicExit
from pretrain.decoding.kv_cache import ExitQueryCache
from pretrain.decoding.runner import BlockRunner
from pretrain.decoding.sampling import (SamplingConfig, accept_drafts, acceptance_score, choose, probabilities,
                                        residual_sample)
from pretrain.decoding.sequences import Sequences, drop_finished_rows


def speculative_round(runner: BlockRunner, seqs: Sequences, queries: ExitQueryCache, exit_layer: int,
                      draft_len: int, sampling: SamplingConfig, generator: torch.Generator | None,
                      adaptive: AdaptiveDraftLength | None = None, probes: list[int] = (),
                      score_exits: bool = False, row_draft_lens: torch.Tensor | None = None,
                      dynamic: DynamicExit | None = None, agreement: AgreementChain | None = None
                      ) -> dict[int, tuple[float, int]]:
    """One draft/verify round for every row of the batch (all unfinished: finished rows left).
    `draft_len`: γ, or with `row_draft_lens` [B] (per-row γ_b) their maximum. With `score_exits`,
    returns {exit: (score, positions)}, the per-exit acceptance evidence (see dynamic_exit.py) for
    the exit used and the probed exits; otherwise {}. `agreement` (strategy auto) gets the round's
    judged drafts of every row. Ends with the finished rows dropped from the
    batch, the caches and the controllers."""
    L, E = runner.num_layers, exit_layer
    device = seqs.tokens.device
    # a round commits at most γ_b+1 tokens: no drafting past what a row may still take
    G_max = max(min(draft_len, seqs.most_remaining - 1), 0)
    cap = seqs.remaining() - 1
    limit = cap.clamp_max(G_max) if row_draft_lens is None else torch.minimum(row_draft_lens, cap)
    early_probes = [e for e in probes if e < E]
    late_probes = [e for e in probes if E < e < L]
    early_captured: dict[int, list[torch.Tensor]] = {e: [] for e in early_probes}

    def early_blocks(tokens: torch.Tensor) -> torch.Tensor:
        h, captured = runner.blocks(runner.embed(tokens[:, None]), 0, E, early_probes)
        queries.append(h)
        for e in early_probes:
            early_captured[e].append(captured[e])
        return h

    # --- draft
    drafts, draft_q, draft_logits = [], [], []
    previous = seqs.last_tokens()
    for i in range(G_max):
        logits = runner.head(early_blocks(previous))[:, 0]
        draft_logits.append(logits)
        token, q = choose(logits, sampling, generator)
        if adaptive is not None and i > 0:  # one draft always: it is the threshold's feedback
            unsure = (limit > i) & adaptive.unsure(q if q is not None else torch.softmax(logits.float(), -1))
            limit = torch.where(unsure, i, limit)
            if not bool(adaptive.go_on(limit > i)):   # too few rows still draft: the adaptive draft's one extra read
                limit = limit.clamp_max(i)
                break  # the unsure tokens are dropped; their inputs' exit states stay cached
        drafts.append(token)
        draft_q.append(q)
        previous = token
    G = len(drafts)
    if queries.count == G:  # d_G has not been through the early blocks yet
        early_blocks(previous)

    # --- verify
    h, late_captured = runner.blocks(queries.states(), E, L, late_probes)
    queries.crop(0)
    logits = runner.head(h)                                         # [B, G+1, V]
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
    rejected = n_accepted < limit
    if sampling.greedy:
        extra = target_top.gather(1, n_accepted[:, None]).squeeze(1)
    else:
        p_next = p.gather(1, n_accepted[:, None, None].expand(-1, 1, p.shape[-1]))[:, 0]
        extra = torch.multinomial(p_next, 1, generator=generator).squeeze(1)
        if G:
            q = torch.stack(draft_q, 1)
            q_at = q.gather(1, n_accepted.clamp_max(G - 1)[:, None, None].expand(-1, 1, q.shape[-1]))[:, 0]
            extra = torch.where(rejected, residual_sample(p_next, q_at, generator), extra)
    new = torch.cat([d, torch.zeros_like(extra)[:, None]], 1).scatter(1, n_accepted[:, None], extra[:, None])

    # --- commit, settle (the one host synchronisation), crop, count
    judged = n_accepted + rejected.long()
    taken = seqs.commit(new, n_accepted + 1)
    rows = seqs.batch
    reads = () if agreement is None else (agreement.read_round(n_accepted, judged, rejected),)
    committed, drafted, accepted, rejections, *counts = seqs.settle(taken.sum(), limit.sum(), n_accepted.sum(),
                                                                    rejected.sum(), *reads)
    if agreement is not None:
        agreement.add(counts)
    stats = runner.stats
    stats.generated += committed
    runner.crop_to_committed(seqs.length, seqs.max_length)
    stats.drafted += drafted
    stats.accepted += accepted
    stats.rejections += rejections
    stats.rounds += rows
    stats.exit_layers.append(E)
    stats.draft_lens.append(G)
    if adaptive is not None:
        adaptive.update(n_accepted, judged)
    if dynamic is not None:
        dynamic.observe_rows(n_accepted, judged)

    evidence = {}
    if score_exits:
        # per-exit acceptance evidence, on positions whose inputs were committed (0..n_accepted)
        valid = torch.arange(G + 1, device=device)[None, :] <= n_accepted[:, None]
        if draft_logits:  # the exit in use, from its own drafts
            mask = valid[:, :len(draft_logits)]
            evidence[E] = acceptance_score(torch.stack(draft_logits, 1)[mask], logits[:, :mask.shape[1]][mask],
                                           sampling)
        hidden = dict(late_captured)
        hidden.update({e: torch.cat(hs, 1) for e, hs in early_captured.items()})
        for e, states in hidden.items():  # probed exits: the shared head on the captured states
            if rows:
                evidence[e] = acceptance_score(runner.head(states[valid]), logits[valid], sampling)
    drop_finished_rows(seqs, runner.cache, queries, adaptive, dynamic, agreement)
    return evidence


def decode_self_speculative(runner: BlockRunner, seqs: Sequences, exit_layer: int, draft_len: int,
                            sampling: SamplingConfig, generator: torch.Generator | None,
                            adaptive: AdaptiveDraftLength | None = None, dynamic: DynamicExit | None = None,
                            max_draft_len: int | None = None) -> None:
    """Rounds until every row is finished. One host synchronisation per round with a static or an
    adaptive draft length (the adaptive one reads once more per draft step, to stop drafting when
    every row stopped); with `dynamic`, E and the batch's γ are re-chosen after each round from the
    evidence read on the host, and each row drafts its own γ_b."""
    model = runner.model
    device = seqs.tokens.device
    queries = ExitQueryCache(seqs.batch, max(draft_len, max_draft_len or 0) + 1, model.cfg.dim,
                             dtype=model.tok_embeddings.weight.dtype, device=device)
    if adaptive is not None:
        adaptive.start(seqs.batch, device)
    if dynamic is not None:
        dynamic.start(seqs.batch, device)
    round_index = 0
    while seqs.batch:
        probes, gammas = [], None
        if dynamic is not None:
            probes = dynamic.probe_exits(round_index)
            gammas = dynamic.row_draft_lens()
            draft_len = int(gammas.max())
        evidence = speculative_round(runner, seqs, queries, exit_layer, draft_len, sampling, generator,
                                     adaptive, probes, score_exits=dynamic is not None, row_draft_lens=gammas,
                                     dynamic=dynamic)
        if dynamic is not None:
            for e, (score, positions) in evidence.items():
                dynamic.observe(e, score, positions)
            exit_layer, _ = dynamic.choose()
        round_index += 1
