"""Runs ranges of blocks of the model through the shared KV cache, and counts the work done."""
from __future__ import annotations

from collections.abc import Iterable

import torch

from pretrain.decoding.kv_cache import StaticKVCache
from pretrain.decoding.stats import DecodeStats


class BlockRunner:
    """Every forward of the decoder goes through here: the RoPE positions of the new tokens are the
    cache slots they take (the cache's row lengths at the first block run), and the block and head
    evaluations done are counted: every row of the batch, as every row is computed (finished rows
    have left the batch; a row drafting fewer tokens than the others is computed all the same)."""

    def __init__(self, model: torch.nn.Module, cache: StaticKVCache, stats: DecodeStats):
        self.model, self.cache, self.stats = model, cache, stats
        self.num_layers = model.cfg.n_layers
        self.last_position = model.cfg.max_seq_len - 1
        self.in_prefill = False

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.tok_embeddings(tokens)

    def blocks(self, h: torch.Tensor, start: int, stop: int,
               exits: Iterable[int] = ()) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Blocks [start, stop) on h [B, T, D] appended after each row's cached tokens; returns the
        output and {exit: hidden} for the requested exits (1-based) in (start, stop]."""
        if start >= stop:
            return h, {}
        positions = self.cache.positions(start, h.shape[1])
        if self.cache.span(start, h.shape[1]) > self.last_position + 1:
            # a row drafting past its own end (riding along with longer drafts of other rows)
            # computes tokens that are discarded; their positions are clamped into the RoPE table
            positions = positions.clamp_max(self.last_position)
        h, captured = self.model.run_layers(h, positions=positions, cache=self.cache, start=start, stop=stop,
                                            exits=exits)
        calls = (stop - start) * h.shape[0]
        if self.in_prefill:
            self.stats.prefill_layer_evals += calls
        else:
            self.stats.layer_evals += calls
            self.stats.position_layer_evals += calls * h.shape[1]
        return h, captured

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """The shared exit head on h [B, T, D] or [B, D]; every position counted."""
        if not self.in_prefill:
            self.stats.head_evals += h.numel() // h.shape[-1]
        return self.model.exit_logits(h)

    def crop_to_committed(self, length: torch.Tensor, max_length: int | None = None, stop: int | None = None) -> None:
        """Every layer below `stop` (default: all) keeps the committed tokens of each row but the
        last, which has not been run yet: drafts the verifier rejected are dropped. `max_length`:
        the longest row, if the caller knows it on the host."""
        stop = self.num_layers if stop is None else stop
        self.cache.crop(length - 1, [l for l in self.cache.layers if l < stop],
                        None if max_length is None else max_length - 1)
