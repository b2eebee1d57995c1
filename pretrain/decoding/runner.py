"""Runs ranges of blocks of the model through the shared KV cache, and counts the work done."""
from __future__ import annotations

from collections.abc import Iterable

import torch

from pretrain.decoding.kv_cache import StaticKVCache
from pretrain.decoding.stats import DecodeStats


class BlockRunner:
    """Every forward of the decoder goes through here: the RoPE positions of the new tokens are the
    cache slots they take (the cache's row lengths at the first block run), and block and head
    evaluations are counted for the rows still decoding."""

    def __init__(self, model: torch.nn.Module, cache: StaticKVCache, stats: DecodeStats):
        self.model, self.cache, self.stats = model, cache, stats
        self.num_layers = model.cfg.n_layers
        self.in_prefill = False

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.tok_embeddings(tokens)

    def blocks(self, h: torch.Tensor, start: int, stop: int, rows: int,
               exits: Iterable[int] = ()) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Blocks [start, stop) on h [B, T, D] appended after each row's cached tokens; returns the
        output and {exit: hidden} for the requested exits (1-based) in (start, stop]. `rows`: how
        many rows are still decoding (the others ride along uncounted)."""
        if start >= stop:
            return h, {}
        positions = self.cache.positions(start, h.shape[1])
        h, captured = self.model.run_layers(h, positions=positions, cache=self.cache, start=start, stop=stop,
                                            exits=exits)
        calls = (stop - start) * rows
        if self.in_prefill:
            self.stats.prefill_layer_evals += calls
        else:
            self.stats.layer_evals += calls
            self.stats.position_layer_evals += calls * h.shape[1]
        return h, captured

    def head(self, h: torch.Tensor, rows: int) -> torch.Tensor:
        """The shared exit head on h [B, T, D] or [B, D]; `rows` rows of it counted, all positions."""
        if not self.in_prefill:
            self.stats.head_evals += rows * (h[0].numel() // h.shape[-1])
        return self.model.exit_logits(h)

    def crop_to_committed(self, length: torch.Tensor, stop: int | None = None) -> None:
        """Every layer below `stop` (default: all) keeps the committed tokens of each row but the
        last, which has not been run yet: drafts the verifier rejected are dropped."""
        stop = self.num_layers if stop is None else stop
        self.cache.crop(length - 1, [l for l in self.cache.layers if l < stop])
