"""Shape of a Llama-style decoder. One dataclass, shared by the model, configs and HF interop."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

VOCAB_AUTO = "auto"  # a run's model.vocab_size: the data's tokenizer (pretrain/trainer/vocab.py)


@dataclass
class ModelConfig:
    vocab_size: Union[int, str] = 8192  # an int once a model is built; a run config may say VOCAB_AUTO
    dim: int = 256
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: int = 4
    ffn_dim: int = 704  # hidden width of the SwiGLU MLP
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    # Llama-3 style RoPE frequency scaling; factor 1.0 = none.
    rope_scaling_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_positions: int = 8192
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def validate(self, prefix: str = "model") -> None:
        """Raise ValueError naming the offending key when the shape is impossible."""
        checks = [
            (self.vocab_size == VOCAB_AUTO or (isinstance(self.vocab_size, int) and self.vocab_size > 0),
             "vocab_size", "must be a positive integer (or auto: the data's tokenizer)"),
            (self.dim > 0, "dim", "must be positive"),
            (self.n_layers > 0, "n_layers", "must be positive"),
            (self.n_heads > 0 and self.dim % self.n_heads == 0, "n_heads",
             f"must divide dim={self.dim}"),
            (self.n_kv_heads > 0 and self.n_heads % self.n_kv_heads == 0, "n_kv_heads",
             f"must divide n_heads={self.n_heads}"),
            (self.head_dim % 2 == 0, "n_heads", f"gives an odd head_dim={self.head_dim}; RoPE needs it even"),
            (self.ffn_dim > 0, "ffn_dim", "must be positive"),
            (self.max_seq_len > 0, "max_seq_len", "must be positive"),
            (self.norm_eps > 0, "norm_eps", "must be positive"),
            (self.rope_theta > 0, "rope_theta", "must be positive"),
            (self.rope_scaling_factor > 0, "rope_scaling_factor", "must be positive"),
            (self.rope_original_max_positions > 0, "rope_original_max_positions", "must be positive"),
            (self.init_std >= 0, "init_std", "must be >= 0"),
        ]
        for ok, key, why in checks:
            if not ok:
                raise ValueError(f"{prefix}.{key}={getattr(self, key)} {why}")

    def num_params(self) -> int:
        """Parameter count (tied embeddings counted once)."""
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        mlp = 3 * self.dim * self.ffn_dim
        per_layer = attn + mlp + 2 * self.dim
        head = 0 if self.tie_embeddings else self.vocab_size * self.dim
        return self.vocab_size * self.dim + self.n_layers * per_layer + self.dim + head
