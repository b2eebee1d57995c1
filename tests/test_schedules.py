"""Schedules against hand-computed values."""
import math

import pytest
import torch

from schedules import (best_draft_config, counter_uniform, depth_scale, exit_importance,
                       exit_loss_weights, exits_on, expected_speedup, expected_tokens_per_layer,
                       keep_masks, layer_dropout_rate, layer_dropout_rates, learning_rate, time_scale)


@pytest.mark.parametrize("kind, layer, expected", [
    ("uniform", 2, 1.0),
    ("linear", 1, 0.25),              # x = 1/4
    ("exp", 0, 0.0),
    ("exp", 2, 0.41421356237),        # 2^0.5 - 1
    ("exp", 4, 1.0),
    ("log", 2, 0.68260619448),        # log_5(3) = ln 3 / ln 5
    ("sin", 2, 0.70710678118),        # sin(pi/4)
    ("sigmoid", 2, 0.5),
    ("sigmoid", 4, 0.99330714907),    # 1 / (1 + e^-5)
])
def test_depth_scale_L5(kind, layer, expected):
    assert depth_scale(layer, 5, kind) == pytest.approx(expected, abs=1e-10)


def test_time_scale():
    assert time_scale(0, 11, "exp") == 0.0
    assert time_scale(5, 11, "exp") == pytest.approx(0.41421356237)
    assert time_scale(10, 11, "exp") == 1.0
    assert time_scale(50, 11, "exp") == 1.0          # clamped after the last step
    assert time_scale(3, 11, "linear") == pytest.approx(0.3)
    assert time_scale(3, 11, "constant") == 1.0


def test_layer_dropout_rate_is_product():
    # L=5, T=11, t=5, l=4, exp/exp, p_max 0.2: 0.41421356 * 1 * 0.2
    assert layer_dropout_rate(5, 4, num_layers=5, total_steps=11, p_max=0.2, depth="exp",
                              time="exp") == pytest.approx(0.0828427125)
    rates = layer_dropout_rates(0, num_layers=3, total_steps=1, p_max=0.5, depth="linear")
    assert rates == pytest.approx([0.0, 0.25, 0.5])


def test_layer_dropout_validation():
    with pytest.raises(ValueError, match="p_max"):
        layer_dropout_rate(0, 0, num_layers=2, total_steps=2, p_max=1.0)
    with pytest.raises(ValueError, match="unknown depth scale 'cubic'"):
        depth_scale(0, 2, "cubic")
    with pytest.raises(ValueError, match="unknown time scale"):
        time_scale(0, 2, "fast")


@pytest.mark.parametrize("kind, expected", [
    ("uniform", 1.0), ("l", 4.0), ("sum_l", 10.0), ("sqrt_l", 2.0), ("inv_l", 0.25), ("inv_sqrt_l", 0.5)])
def test_exit_importance(kind, expected):
    assert exit_importance(4, kind) == pytest.approx(expected)


def test_weights_all_exits_sum_l():
    w = exit_loss_weights(0, num_layers=4, importance="sum_l")
    assert w == pytest.approx({1: 1 / 20, 2: 3 / 20, 3: 6 / 20, 4: 10 / 20})


def test_e_scale_applies_to_non_final_exits_only():
    # e' = [0.5·1, 0.5·3, 0.5·6, 10] = [0.5, 1.5, 3, 10], total 15
    w = exit_loss_weights(0, num_layers=4, importance="sum_l", e_scale=0.5)
    assert w == pytest.approx({1: 0.5 / 15, 2: 1.5 / 15, 3: 3 / 15, 4: 10 / 15})


def test_rotational_curriculum():
    # R=2, L=4: even steps exits {2, 4}; odd steps {1, 3, 4}
    assert exits_on(0, num_layers=4, curriculum="rotational", rotation_period=2) == [2, 4]
    assert exits_on(1, num_layers=4, curriculum="rotational", rotation_period=2) == [1, 3, 4]
    w = exit_loss_weights(1, num_layers=4, importance="l", curriculum="rotational", rotation_period=2)
    assert w == pytest.approx({1: 1 / 8, 3: 3 / 8, 4: 4 / 8})


def test_gradual_curriculum():
    # L=4, T_C=8: exit l on iff t >= 8·(4-l)/4 = 2·(4-l): exit 3 from t=2, 2 from 4, 1 from 6
    on = [exits_on(t, num_layers=4, curriculum="gradual", gradual_steps=8) for t in (0, 1, 2, 4, 5, 6, 100)]
    assert on == [[4], [4], [3, 4], [2, 3, 4], [2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4]]


def test_exit_subset_always_includes_final():
    assert exits_on(0, num_layers=6, exit_layers=[2, 4]) == [2, 4, 6]
    with pytest.raises(ValueError, match="exit layer 7 outside 1..6"):
        exits_on(0, num_layers=6, exit_layers=[7])
    with pytest.raises(ValueError, match="unknown exit curriculum"):
        exits_on(0, num_layers=6, curriculum="random")


def test_learning_rate():
    kw = dict(base_lr=1.0, warmup_steps=4, total_steps=14, min_lr_ratio=0.1)
    assert learning_rate(0, **kw) == pytest.approx(0.25)
    assert learning_rate(3, **kw) == pytest.approx(1.0)
    assert learning_rate(4, **kw) == pytest.approx(1.0)
    assert learning_rate(9, **kw) == pytest.approx(0.55)   # half-way: 0.1 + 0.9·0.5
    assert learning_rate(14, **kw) == pytest.approx(0.1)
    assert learning_rate(99, **kw) == pytest.approx(0.1)
    assert learning_rate(9, decay="linear", **kw) == pytest.approx(0.55)
    assert learning_rate(9, decay="constant", **kw) == 1.0


@pytest.mark.parametrize("alpha, gamma, c, expected", [
    (0.6, 3, 0.125, 1.58), (0.8, 5, 0.125, 2.27), (0.9, 9, 0.125, 3.07),
    (0.6, 2, 0.25, 1.31), (0.8, 3, 0.25, 1.69), (0.9, 6, 0.25, 2.09),
    (0.6, 1, 0.5, 1.07), (0.8, 2, 0.5, 1.22), (0.9, 3, 0.5, 1.38)])
def test_speedup_table_of_the_notes(alpha, gamma, c, expected):
    L = 32
    assert expected_speedup(alpha, gamma, int(c * L), L) == pytest.approx(expected, abs=0.006)


def test_speedup_limits_and_best_config():
    assert expected_speedup(1.0, 3, 2, 8) == pytest.approx(4 / (1 + 3 * 2 / 8))
    assert expected_tokens_per_layer(0.5, 1, 4, 8) == pytest.approx(1.5 / 12)
    E, gamma, s = best_draft_config({2: 0.5, 4: 0.9, 8: 1.0}, num_layers=8, max_draft_len=8)
    brute = max((expected_speedup(a, g, e, 8), e, g) for e, a in {2: 0.5, 4: 0.9}.items() for g in range(1, 9))
    assert (E, gamma) == (brute[1], brute[2]) and s == pytest.approx(brute[0])


def test_counter_rng_is_uniform_and_independent():
    ids = torch.arange(100_000)
    u = counter_uniform(0, 0, 0, ids)
    assert u.dtype == torch.float64 and 0 <= u.min() and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 4 * (1 / 12) ** 0.5 / math.sqrt(len(ids))
    for other in (counter_uniform(0, 0, 1, ids), counter_uniform(0, 1, 0, ids), counter_uniform(1, 0, 0, ids),
                  counter_uniform(0, 0, 0, ids + 1)):
        corr = torch.corrcoef(torch.stack([u, other]))[0, 1].abs().item()
        assert corr < 4 / math.sqrt(len(ids))


def test_counter_rng_is_pure():
    ids = torch.arange(16) * 7 + 3
    state = torch.get_rng_state()
    whole = counter_uniform(5, 9, 2, ids)
    assert torch.equal(torch.cat([counter_uniform(5, 9, 2, ids[:8]), counter_uniform(5, 9, 2, ids[8:])]), whole)
    assert torch.equal(torch.get_rng_state(), state)
    masks = keep_masks(5, 9, ids, [0.0, 0.5, 0.999999])
    assert masks.shape == (3, 16) and masks[0].all()
    assert torch.equal(masks[1], counter_uniform(5, 9, 1, ids) >= 0.5)
    frac = keep_masks(0, 0, torch.arange(50_000), [0.3])[0].float().mean().item()
    assert abs(frac - 0.7) < 4 * math.sqrt(0.21 / 50_000)
