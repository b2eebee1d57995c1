"""Batch bookkeeping for decoding: the token buffer with per-row committed lengths, finishing at
EOS or max_new_tokens, running a range of blocks while counting the work, and the statistics."""
from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from pretrain.decoding.cache import PositionalKVCache
from pretrain.device import synchronize


@dataclass
class DecodeStats:
    generated: int = 0            # tokens committed after the prompt, all rows
    prefill_tokens: int = 0       # of which the first token of each row, produced by the prefill
    drafted: int = 0              # draft tokens proposed (self-speculative)
    accepted: int = 0             # of which accepted
    rejections: int = 0           # row-rounds that ended on a rejected draft
    rounds: int = 0               # forward rounds per row (draft+verify, or one step), summed over rows
    # Sequential cost, after the prefill: one block called once for one row counts 1, however many
    # positions it processes (weight loading and per-call overhead dominate decoding). The speedup
    # formula's denominator γE + L per round counts the same thing.
    layer_evals: int = 0
    position_layer_evals: int = 0  # compute-bound cost: one block on one position of one row
    prefill_layer_evals: int = 0
    head_evals: int = 0           # exit-head evaluations per position, after prefill
    wall_s: float = 0.0
    exit_layers: list[int] = field(default_factory=list)   # exit used in each round (dynamic exit)
    draft_lens: list[int] = field(default_factory=list)    # drafts per round (adaptive draft)

    def summary(self) -> dict:
        gen = max(self.generated - self.prefill_tokens, 1)  # tokens produced by decoding rounds
        return {"generated_tokens": self.generated, "drafted": self.drafted, "accepted": self.accepted,
                # α: of the drafts the verifier judged (all before the first rejection), the share
                # accepted; the quantity in the speedup formula. accepted/drafted is lower.
                "acceptance": self.accepted / (self.accepted + self.rejections) if self.drafted else None,
                "accepted_per_drafted": self.accepted / self.drafted if self.drafted else None,
                "rounds": self.rounds, "tokens_per_round": self.generated / max(self.rounds, 1),
                "layer_evals_per_token": self.layer_evals / gen,
                "position_layer_evals_per_token": self.position_layer_evals / gen,
                "head_evals_per_token": self.head_evals / gen,
                "wall_s": self.wall_s, "tokens_per_s": self.generated / self.wall_s if self.wall_s else None,
                "mean_exit_layer": sum(self.exit_layers) / len(self.exit_layers) if self.exit_layers else None,
                "mean_draft_len": sum(self.draft_lens) / len(self.draft_lens) if self.draft_lens else None}


class Sequences:
    """Prompt + generated tokens per row. Row b has `length[b]` committed tokens; the last one has
    not been run through the model yet (its position is length-1)."""

    def __init__(self, prompts: list[list[int]], max_new_tokens: int, eos_id: int | None, spare: int,
                 device: torch.device):
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        self.prompt_len = torch.tensor([len(p) for p in prompts], device=device)
        self.capacity = int(self.prompt_len.max()) + max_new_tokens + spare
        self.tokens = torch.zeros(len(prompts), self.capacity, dtype=torch.long, device=device)
        for b, p in enumerate(prompts):
            self.tokens[b, :len(p)] = torch.tensor(p, device=device)
        self.length = self.prompt_len.clone()
        self.finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
        self.max_new_tokens, self.eos_id = max_new_tokens, eos_id

    @property
    def active(self) -> torch.Tensor:
        return ~self.finished

    def last_tokens(self) -> torch.Tensor:
        return self.tokens.gather(1, (self.length - 1)[:, None]).squeeze(1)

    def commit(self, new: torch.Tensor, counts: torch.Tensor) -> int:
        """Append new[b, :counts[b]] to every unfinished row; stop rows at EOS or max_new_tokens.
        Returns the number of tokens committed."""
        committed = 0
        for b in torch.nonzero(self.active).flatten().tolist():
            take = new[b, :int(counts[b])]
            room = self.max_new_tokens - int(self.length[b] - self.prompt_len[b])
            take = take[:room]
            if self.eos_id is not None:
                hits = torch.nonzero(take == self.eos_id).flatten()
                if len(hits):
                    take = take[:int(hits[0]) + 1]
                    self.finished[b] = True
            start = int(self.length[b])
            self.tokens[b, start:start + len(take)] = take
            self.length[b] += len(take)
            committed += len(take)
            if int(self.length[b] - self.prompt_len[b]) >= self.max_new_tokens:
                self.finished[b] = True
        return committed

    def outputs(self) -> list[list[int]]:
        return [self.tokens[b, int(self.prompt_len[b]):int(self.length[b])].tolist()
                for b in range(len(self.length))]


class BlockRunner:
    """Runs block ranges of the model through the shared cache and counts block evaluations."""

    def __init__(self, model: torch.nn.Module, cache: PositionalKVCache, stats: DecodeStats):
        self.model, self.cache, self.stats = model, cache, stats
        self.counting_prefill = False

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.tok_embeddings(tokens)

    def blocks(self, h: torch.Tensor, positions: torch.Tensor, start: int, stop: int, active: torch.Tensor,
               exits: Iterable[int] = ()) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        self.cache.set_positions(positions)
        h, captured = self.model.run_layers(h, positions=positions, cache=self.cache, start=start, stop=stop,
                                            exits=exits)
        calls = (stop - start) * int(active.sum())
        if self.counting_prefill:
            self.stats.prefill_layer_evals += calls
        else:
            self.stats.layer_evals += calls
            self.stats.position_layer_evals += calls * positions.shape[1]
        return h, captured

    def head(self, h: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        if not self.counting_prefill:
            self.stats.head_evals += h.shape[1] * int(active.sum())
        return self.model.exit_logits(h)


class Timer:
    """Adds wall time (after the device finished its queued work) to stats.wall_s."""

    def __init__(self, stats: DecodeStats, device: torch.device):
        self.stats, self.device = stats, device

    def __enter__(self):
        synchronize(self.device)
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        synchronize(self.device)
        self.stats.wall_s += time.perf_counter() - self.start
