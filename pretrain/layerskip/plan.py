"""What LayerSkip does at one training step: per-layer dropout rates and the exits that are on."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pretrain.config import RunConfig
from schedules.counter_rng import keep_masks
from schedules.exit_loss import exit_loss_weights
from schedules.layer_dropout import layer_dropout_rates


@dataclass(frozen=True)
class StepPlan:
    step: int
    drop_rates: tuple[float, ...]      # p(l, t) for blocks 0..L-1
    exit_weights: dict[int, float]     # w(t, l) for the exits on at t (1-based), summing to 1
    dropout_seed: int

    @property
    def any_dropout(self) -> bool:
        return any(p > 0 for p in self.drop_rates)

    def keep_masks(self, sample_ids: torch.Tensor) -> torch.Tensor | None:
        """bool [L, B]: keep[l, b] is False when block l is skipped for global sample b.
        None when nothing can be dropped (saves the hashing)."""
        if not self.any_dropout:
            return None
        return keep_masks(self.dropout_seed, self.step, sample_ids, self.drop_rates)


def step_plan(cfg: RunConfig, step: int) -> StepPlan:
    L = cfg.model.n_layers
    ld, ee = cfg.layerskip.layer_dropout, cfg.layerskip.early_exit
    rates = layer_dropout_rates(step, num_layers=L, total_steps=cfg.train.steps, p_max=ld.p_max,
                                depth=ld.depth_scale, time=ld.time_scale)
    if ee.enabled:
        weights = exit_loss_weights(step, num_layers=L, exit_layers=ee.exit_layers,
                                    importance=ee.importance, e_scale=ee.e_scale,
                                    curriculum=ee.curriculum, rotation_period=ee.rotation_period,
                                    gradual_steps=ee.gradual_steps)
    else:
        weights = {L: 1.0}
    seed = cfg.train.seed if ld.seed is None else ld.seed
    return StepPlan(step=step, drop_rates=tuple(rates), exit_weights=dict(weights), dropout_seed=seed)
