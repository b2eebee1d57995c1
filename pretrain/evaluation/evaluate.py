"""The evaluation shared by training's periodic eval and `python -m pretrain.eval`."""
from __future__ import annotations

import math

import torch

from pretrain.config import EvalConfig
from pretrain.data.dataset import PackedDataset
from pretrain.data.loader import validation_batches
from pretrain.evaluation.decode_check import decode_check
from pretrain.evaluation.early_exit_eval import exit_statistics, exit_summary


def evaluate(model: torch.nn.Module, val: PackedDataset | dict[str, PackedDataset], device: torch.device,
             cfg: EvalConfig) -> dict:
    """Per-exit loss / agreement / expected speedup; then, when configured, decode held-out
    prompts at the best (E, γ) and report measured next to predicted.

    `val` may map source names to their validation splits (data.sources): each source is evaluated
    on its own (`result["sources"][name]` = per-exit loss, perplexity, agreement) and the overall
    figures are their token-weighted means; prompts come from the first source."""
    sets = val if isinstance(val, dict) else {"": val}
    empty = [name for name, ds in sets.items() if not len(ds)] if len(sets) > 1 else []
    if len(empty) < len(sets):  # a source too small for a validation sample is reported, not a failure
        sets = {name: ds for name, ds in sets.items() if name not in empty}
    per_source, weights = {}, {}
    for name, ds in sets.items():
        per_source[name] = exit_statistics(model, validation_batches(ds, cfg.batch_size, max_batches=cfg.batches),
                                           device)
        weights[name] = min(len(ds), cfg.batch_size * cfg.batches) * ds.seq_len  # target tokens seen
    result = exit_summary(combine_exit_statistics(per_source, weights), model.cfg.n_layers, cfg.max_draft_len)
    result["tokens"] = sum(weights.values())  # what the figures rest on (pretrain/evaluation/eval_file.py)
    if len(sets) > 1 or empty:
        result["sources"] = per_source
    if empty:
        result["sources_without_validation_samples"] = empty
    first = next(iter(sets.values()))
    if cfg.decode_prompts and "best" in result:
        n = min(cfg.decode_prompts, len(first))
        # fit prompt + new tokens + one draft window into the model's positions
        room = model.cfg.max_seq_len - result["best"]["draft_len"] - 2
        prompt_len = min(cfg.decode_prompt_len, room // 2)
        prompts = [first[i][:prompt_len].tolist() for i in range(n)]
        result["decoding"] = decode_check(model, prompts, result["best"],
                                          min(cfg.decode_new_tokens, room - prompt_len))
    return result


def combine_exit_statistics(per_source: dict[str, dict[int, dict[str, float]]], tokens: dict[str, int]
                            ) -> dict[int, dict[str, float]]:
    """Token-weighted mean of loss and agreement over sources (perplexity = exp(mean loss)): the
    statistics of all their tokens together."""
    if len(per_source) == 1:
        return next(iter(per_source.values()))
    total = sum(tokens.values())
    exits = next(iter(per_source.values())).keys()
    combined = {}
    for layer in exits:
        loss = sum(per_source[n][layer]["loss"] * tokens[n] for n in per_source) / total
        agreement = sum(per_source[n][layer]["agreement"] * tokens[n] for n in per_source) / total
        combined[layer] = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "agreement": agreement}
    return combined
