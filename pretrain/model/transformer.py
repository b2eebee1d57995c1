"""The LayerSkip decoder: a Llama-style stack with one shared exit head usable after any block.

Exits are 1-based: exit l is the output of block l-1, and exit L is the ordinary model output.
The exit head g = output ∘ norm is shared by all exits. No parallel code lives here: `parallel/`
shards these modules and may prune `layers` (a ModuleDict keyed by the global block index) for
pipeline stages, which is why blocks are looked up by name rather than by position.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from pretrain.model.config import ModelConfig
from pretrain.model.layers import KVCache, TransformerBlock
from pretrain.model.rope import rope_tables, rotate_half_signed


class LayerSkipTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(cfg) for i in range(cfg.n_layers)})
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, scaling=self._rope_scaling())
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", rotate_half_signed(sin), persistent=False)   # as apply_rope takes it
        self.reset_parameters()

    @property
    def num_layers(self) -> int:
        return self.cfg.n_layers

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std); residual output projections scaled by 1/sqrt(2L) (GPT-2)."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)
            elif name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
                nn.init.normal_(p, std=std / math.sqrt(2 * self.cfg.n_layers))
            else:
                nn.init.normal_(p, std=std)

    @torch.no_grad()
    def init_rope_buffers(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        """Recompute the RoPE tables on `device` in `dtype` (default: where and what they are now):
        a model materialised from the meta device has none yet."""
        device = self.rope_cos.device if device is None else device
        dtype = self.rope_cos.dtype if dtype is None else dtype
        cos, sin = rope_tables(self.cfg.head_dim, self.cfg.max_seq_len, self.cfg.rope_theta, device=device,
                               scaling=self._rope_scaling())
        self.rope_cos = cos.to(dtype)
        self.rope_sin = rotate_half_signed(sin).to(dtype)

    def _rope_scaling(self) -> dict | None:
        c = self.cfg
        if c.rope_scaling_factor == 1.0:
            return None
        return {"factor": c.rope_scaling_factor, "low_freq_factor": c.rope_low_freq_factor,
                "high_freq_factor": c.rope_high_freq_factor,
                "original_max_positions": c.rope_original_max_positions}

    def rope(self, seq_len: int, positions: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, signed sin) for apply_rope: [1, T, 1, Dh] for positions 0..T-1 (None) or given for
        all rows ([T]), [B, T, 1, Dh] for per-row positions [B, T]; shaped once per forward."""
        if positions is None:
            if seq_len > self.cfg.max_seq_len:
                raise ValueError(f"sequence length {seq_len} exceeds model.max_seq_len={self.cfg.max_seq_len}")
            cos, sin = self.rope_cos[:seq_len], self.rope_sin[:seq_len]
        else:
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        if cos.dim() == 2:  # one position range for every row
            cos, sin = cos[None], sin[None]
        return cos[:, :, None], sin[:, :, None]

    def run_layers(self, h: torch.Tensor, *, keep: torch.Tensor | None = None,
                   exits: Iterable[int] = (), positions: torch.Tensor | None = None,
                   cache: KVCache | None = None, start: int = 0, stop: int | None = None,
                   ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Run the blocks held here whose global index is in [start, stop).

        keep: bool [L, B]; keep[l, b] False skips block l for row b (identity), and the block
        runs only on the kept rows. Returns the last hidden state and {exit: hidden} for the
        requested exits (1-based) among the blocks run.
        """
        stop = self.cfg.n_layers if stop is None else stop
        wanted = set(exits)
        cos, sin = self.rope(h.shape[1], positions)
        captured: dict[int, torch.Tensor] = {}
        for name, block in self.layers.items():
            layer = int(name)
            if not start <= layer < stop:
                continue
            rows = None if keep is None else keep[layer]
            h = self._run_block(block, h, cos, sin, rows, cache, layer)
            if layer + 1 in wanted:
                captured[layer + 1] = h
        return h, captured

    def _run_block(self, block: nn.Module, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   rows: torch.Tensor | None, cache: KVCache | None, layer: int) -> torch.Tensor:
        if rows is None or bool(rows.all()):
            return block(h, cos, sin, cache, layer)
        if not bool(rows.any()):
            return h
        idx = rows.nonzero().squeeze(1)
        if cos.shape[0] > 1:  # per-row positions
            cos, sin = cos.index_select(0, idx), sin.index_select(0, idx)
        return h.index_copy(0, idx, block(h.index_select(0, idx), cos, sin, cache, layer))

    def exit_logits(self, h: torch.Tensor) -> torch.Tensor:
        """The shared exit head g(h) = output(norm(h))."""
        return self.output(self.norm(h))

    def forward(self, tokens: torch.Tensor, *, keep: torch.Tensor | None = None,
                exits: Iterable[int] = (), positions: torch.Tensor | None = None,
                cache: KVCache | None = None) -> dict[int, torch.Tensor]:
        """Hidden states (before the exit head) at the requested exits; the final exit L is
        always included. Apply `exit_logits` to turn one into logits."""
        h = self.tok_embeddings(tokens)
        h, captured = self.run_layers(h, keep=keep, exits=exits, positions=positions, cache=cache)
        captured[self.cfg.n_layers] = h
        return captured

    def logits(self, tokens: torch.Tensor, exit_layer: int | None = None) -> torch.Tensor:
        """Logits at one exit (default: the full model), no layer dropout."""
        exit_layer = self.cfg.n_layers if exit_layer is None else exit_layer
        if not 1 <= exit_layer <= self.cfg.n_layers:
            raise ValueError(f"exit layer {exit_layer} outside 1..{self.cfg.n_layers}")
        h = self.tok_embeddings(tokens)
        h, _ = self.run_layers(h, stop=exit_layer)
        return self.exit_logits(h)
