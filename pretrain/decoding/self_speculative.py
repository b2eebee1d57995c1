"""Self-speculative decoding with the KVQ cache, batched.

One round per row, with N-1 the position of the last committed token (not yet run):
  draft   for i = 0..γ-1: blocks [0, E) on the previous token at position N-1+i, the shared head
          gives draft d_{i+1}; the exit hidden state is kept (exit-query cache);
  verify  blocks [0, E) on d_γ only (the one draft not yet cached), then blocks [E, L) on the γ+1
          kept exit hidden states at positions N-1..N-1+γ in one forward; the head gives the full
          model's prediction after each of them;
  accept  the longest agreeing prefix (greedy) or speculative-sampling acceptance, plus one token
          from the full model (correction or bonus).
Both block ranges write one shared KV cache; rejected positions are overwritten next round (see
cache.py), so cropping costs nothing.
"""
from __future__ import annotations

import torch

from pretrain.decoding.batch import BlockRunner, Sequences
from pretrain.decoding.controllers import AdaptiveDraftLength, DynamicExit
from pretrain.decoding.sampling import (SamplingConfig, accept_drafts, choose, probabilities,
                                        residual_sample)


def speculative_round(runner: BlockRunner, seqs: Sequences, exit_layer: int, draft_len: int,
                      sampling: SamplingConfig, generator: torch.Generator | None,
                      adaptive: AdaptiveDraftLength | None = None, probes: list[int] = ()
                      ) -> dict[int, tuple[int, int]]:
    """Run one draft/verify round for every row; returns {exit: (agreed, compared)} for the exit
    used and any probed exits (greedy top-1 agreement with the full model on committed inputs)."""
    L = runner.model.cfg.n_layers
    E = exit_layer
    active = seqs.active
    B = len(seqs.length)
    device = seqs.tokens.device
    base = seqs.length - 1
    early_probes = [e for e in probes if e < E]
    late_probes = [e for e in probes if e > E]

    kept, drafts, draft_probs, draft_top = [], [], [], []
    early_captured: dict[int, list[torch.Tensor]] = {e: [] for e in early_probes}
    row_limit = torch.full((B,), draft_len, dtype=torch.long, device=device)
    stopped = torch.zeros(B, dtype=torch.bool, device=device)
    previous = seqs.last_tokens()
    for i in range(draft_len):
        h, cap = runner.blocks(runner.embed(previous[:, None]), (base + i)[:, None], 0, E, active, early_probes)
        kept.append(h)
        for e in early_probes:
            early_captured[e].append(cap[e])
        logits = runner.head(h, active)[:, 0]
        token, q = choose(logits, sampling, generator)
        if adaptive is not None and i > 0:  # one draft always: it is the threshold's feedback
            confidence = (q if q is not None else torch.softmax(logits.float(), -1)).max(-1).values
            newly = ~stopped & (confidence < adaptive.threshold)
            row_limit = torch.where(newly, torch.full_like(row_limit, i), row_limit)
            stopped |= newly
            if bool(stopped[active].all()):
                break  # the unconfident token is dropped; its input's hidden state is kept
        drafts.append(token)
        draft_probs.append(q)
        draft_top.append(logits.argmax(-1))
        previous = token
    G = len(drafts)
    row_limit = row_limit.clamp_max(G)
    if len(kept) == G:  # d_G has not been through the early blocks yet
        h, cap = runner.blocks(runner.embed(previous[:, None]), (base + G)[:, None], 0, E, active, early_probes)
        kept.append(h)
        for e in early_probes:
            early_captured[e].append(cap[e])
    positions = base[:, None] + torch.arange(G + 1, device=device)
    h, late_captured = runner.blocks(torch.cat(kept, dim=1), positions, E, L, active, late_probes)
    logits = runner.head(h, active)                                  # [B, G+1, V]
    target_top = logits.argmax(-1)

    steps = torch.arange(G, device=device)
    if G == 0:
        n_accepted = torch.zeros(B, dtype=torch.long, device=device)
    else:
        d = torch.stack(drafts, 1)
        if sampling.greedy:
            ok = d == target_top[:, :G]
        else:
            p = probabilities(logits[:, :G], sampling)
            ok = accept_drafts(d, torch.stack(draft_probs, 1), p, generator)
        ok &= steps[None, :] < row_limit[:, None]
        n_accepted = ok.long().cumprod(1).sum(1)
    # the full model's token at position n_accepted: argmax, a residual draw after a rejection,
    # or a draw from p when every allowed draft was accepted
    if sampling.greedy:
        extra = target_top.gather(1, n_accepted[:, None]).squeeze(1)
    else:
        p_next = probabilities(logits.gather(1, n_accepted[:, None, None].expand(-1, 1, logits.shape[-1]))[:, 0],
                               sampling)
        extra = torch.multinomial(p_next, 1, generator=generator).squeeze(1)
        rejected = n_accepted < row_limit
        if bool(rejected.any()):
            q_at = torch.stack(draft_probs, 1).gather(
                1, n_accepted.clamp_max(max(G - 1, 0))[:, None, None].expand(-1, 1, p_next.shape[-1]))[:, 0]
            extra = torch.where(rejected, residual_sample(p_next, q_at, generator), extra)
    new = torch.zeros(B, G + 1, dtype=torch.long, device=device)
    if G:
        new[:, :G] = torch.stack(drafts, 1)
    new.scatter_(1, n_accepted[:, None], extra[:, None])

    stats = runner.stats
    stats.drafted += int(row_limit[active].sum())
    stats.accepted += int(n_accepted[active].sum())
    stats.rejections += int((n_accepted < row_limit)[active].sum())
    stats.rounds += int(active.sum())
    stats.exit_layers.append(E)
    stats.draft_lens.append(G)
    stats.generated += seqs.commit(new, n_accepted + 1)
    if adaptive is not None:
        adaptive.update(int(row_limit[active].sum()), int(n_accepted[active].sum()))

    # agreement with the full model on positions whose inputs were committed (0..n_accepted)
    valid = (torch.arange(G + 1, device=device)[None, :] <= n_accepted[:, None]) & active[:, None]
    agreement = {}
    if G:
        top = torch.stack(draft_top, 1)
        v = valid[:, :G]
        agreement[E] = (int(((top == target_top[:, :G]) & v).sum()), int(v.sum()))
    for e, hidden in list(late_captured.items()) + [(e, torch.cat(hs, 1)) for e, hs in early_captured.items()]:
        top = runner.head(hidden, active).argmax(-1)
        agreement[e] = (int(((top == target_top) & valid).sum()), int(valid.sum()))
    return agreement


def decode_self_speculative(runner: BlockRunner, seqs: Sequences, exit_layer: int, draft_len: int,
                            sampling: SamplingConfig, generator: torch.Generator | None,
                            adaptive: AdaptiveDraftLength | None = None,
                            dynamic: DynamicExit | None = None) -> None:
    round_index = 0
    while not bool(seqs.finished.all()):
        probes = dynamic.probe_exits(round_index) if dynamic is not None else []
        agreement = speculative_round(runner, seqs, exit_layer, draft_len, sampling, generator, adaptive, probes)
        if dynamic is not None:
            for e, (agreed, total) in agreement.items():
                dynamic.observe(e, agreed, total)
            exit_layer, draft_len = dynamic.choose()
        round_index += 1
