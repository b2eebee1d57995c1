"""The evaluation shared by training's periodic eval and `python -m pretrain.eval`."""
from __future__ import annotations

import torch

from pretrain.config import EvalConfig
from pretrain.data.dataset import PackedDataset
from pretrain.data.loader import validation_batches
from pretrain.evaluation.decode_check import decode_check
from pretrain.evaluation.early_exit_eval import evaluate_exits


def evaluate(model: torch.nn.Module, val: PackedDataset, device: torch.device, cfg: EvalConfig) -> dict:
    """Per-exit loss / agreement / expected speedup; then, when configured, decode held-out
    prompts at the best (E, γ) and report measured next to predicted."""
    result = evaluate_exits(model, validation_batches(val, cfg.batch_size, max_batches=cfg.batches),
                            device, cfg.max_draft_len)
    if cfg.decode_prompts and "best" in result:
        n = min(cfg.decode_prompts, len(val))
        # fit prompt + new tokens + one draft window into the model's positions
        room = model.cfg.max_seq_len - result["best"]["draft_len"] - 2
        prompt_len = min(cfg.decode_prompt_len, room // 2)
        prompts = [val[i][:prompt_len].tolist() for i in range(n)]
        result["decoding"] = decode_check(model, prompts, result["best"],
                                          min(cfg.decode_new_tokens, room - prompt_len))
    return result
