"""Token choice: greedy, or sampling from temperature / top-k / top-p processed distributions,
and the speculative-sampling acceptance rule that keeps the full model's distribution exactly:
accept a draft d with probability min(1, p(d)/q(d)); on rejection draw from norm(max(0, p - q))."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0   # 0 = greedy
    top_k: int = 0             # 0 = off
    top_p: float = 1.0         # 1 = off

    def __post_init__(self):
        if not 0 <= self.temperature < math.inf:   # also refuses nan
            raise ValueError(f"temperature={self.temperature} must be a finite number >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0")
        if not 0 < self.top_p <= 1:   # also refuses nan
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def probabilities(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """The distribution tokens are drawn from: softmax(logits / T) restricted to the top-k and to
    the smallest set with mass >= top_p, renormalised. [..., V] float32.

    The logits are shifted by their maximum before the division, so that any positive temperature,
    however small (1e-45 is a float32 subnormal), gives finite scaled logits: the largest is 0, the
    others <= 0 or -inf, and the softmax is never nan."""
    logits = logits.float()
    shifted = logits - logits.max(-1, keepdim=True).values
    logits = torch.where(shifted == 0, 0.0, shifted / cfg.temperature)
    if cfg.top_k and cfg.top_k < logits.shape[-1]:
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if cfg.top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        before = torch.cumsum(sorted_p, dim=-1) - sorted_p  # mass strictly before each token
        sorted_p = sorted_p.masked_fill(before >= cfg.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def choose(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None
           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(tokens [...], probabilities [..., V] or None when greedy)."""
    if cfg.greedy:
        return logits.argmax(-1), None
    probs = probabilities(logits, cfg)
    flat = probs.reshape(-1, probs.shape[-1])
    tokens = torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])
    return tokens, probs


def accept_drafts(drafts: torch.Tensor, draft_probs: torch.Tensor, target_probs: torch.Tensor,
                  generator: torch.Generator | None) -> torch.Tensor:
    """Per draft position, whether speculative sampling accepts it: u < p(d)/q(d). [B, G] bool."""
    p = target_probs.gather(-1, drafts[..., None]).squeeze(-1)
    q = draft_probs.gather(-1, drafts[..., None]).squeeze(-1)
    u = torch.rand(drafts.shape, generator=generator, device=drafts.device)
    return u * q < p


def residual_sample(target_probs: torch.Tensor, draft_probs: torch.Tensor,
                    generator: torch.Generator | None) -> torch.Tensor:
    """Draw from norm(max(0, p - q)) per row ([B, V] -> [B]); falls back to p where p == q."""
    residual = (target_probs - draft_probs).clamp_min(0.0)
    mass = residual.sum(-1, keepdim=True)
    residual = torch.where(mass > 0, residual / mass.clamp_min(1e-30), target_probs)
    return torch.multinomial(residual, 1, generator=generator).squeeze(-1)


def acceptance_probability(draft_probs: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """Probability that speculative sampling accepts a token drafted from q: sum_v min(p, q) [...]."""
    return torch.minimum(draft_probs, target_probs).sum(-1)


def acceptance_per_position(exit_logits: torch.Tensor, full_token: torch.Tensor, full_probs: torch.Tensor | None,
                            sampling: SamplingConfig) -> torch.Tensor:
    """The probability that a draft from the exit is accepted, per position ([..., V] logits of the
    exit; the full model's chosen token [...] and, when sampling, its distribution [..., V]): top-1
    agreement when greedy (0 or 1), sum_v min(p_exit, p_full) when sampling. float32 [...]."""
    if sampling.greedy:
        return (exit_logits.argmax(-1) == full_token).float()
    return acceptance_probability(probabilities(exit_logits, sampling), full_probs)


def acceptance_score(exit_logits: torch.Tensor, full_logits: torch.Tensor, sampling: SamplingConfig
                     ) -> tuple[float, int]:
    """[N, V] logits of an exit and of the full model at N positions -> (sum over the positions of
    acceptance_per_position, N). Reads the sum on the host."""
    full_probs = None if sampling.greedy else probabilities(full_logits, sampling)
    score = acceptance_per_position(exit_logits, full_logits.argmax(-1), full_probs, sampling).sum()
    return float(score), exit_logits.shape[0]
