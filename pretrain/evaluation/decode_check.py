"""Measured self-speculative decoding next to the prediction from per-exit agreement.

On a few held-out prompts, decode greedily at the predicted best (E, γ) and report the measured
acceptance, tokens per round and layer evaluations per token beside the predicted
α, (1-α^(γ+1))/(1-α) and (γE+L)/tokens-per-round."""
from __future__ import annotations

import torch

from pretrain.decoding import DecodeOptions, generate
from schedules.speedup import expected_tokens_per_round


def predicted_decoding(acceptance: float, exit_layer: int, draft_len: int, num_layers: int) -> dict:
    per_round = expected_tokens_per_round(acceptance, draft_len)
    return {"acceptance": acceptance, "tokens_per_round": per_round,
            "layer_evals_per_token": (draft_len * exit_layer + num_layers) / per_round}


def measured_decoding(model: torch.nn.Module, prompts: list[list[int]], exit_layer: int, draft_len: int,
                      new_tokens: int) -> dict:
    _, stats = generate(model, prompts, DecodeOptions(strategy="self_speculative", exit_layer=exit_layer,
                                                      draft_len=draft_len,
                                                      max_new_tokens=new_tokens))
    s = stats.summary()
    return {"acceptance": s["acceptance"], "tokens_per_round": s["tokens_per_round"],
            "layer_evals_per_token": s["layer_evals_per_token"], "tokens_per_s": s["tokens_per_s"]}


def decode_check(model: torch.nn.Module, prompts: list[list[int]], best: dict, new_tokens: int) -> dict:
    E, gamma, L = best["exit_layer"], best["draft_len"], model.cfg.n_layers
    return {"exit_layer": E, "draft_len": gamma,
            "predicted": predicted_decoding(best["acceptance"], E, gamma, L),
            "measured": measured_decoding(model, prompts, E, gamma, new_tokens)}
