"""Schedules against hand-computed values, plus the argument checks."""
import math

import pytest
import torch

from schedules import (CURRICULA, DEPTH_SCALES, IMPORTANCE_KINDS, TIME_SCALES, DecodeCosts, best_draft_config,
                       counter_uniform, expected_speedup_with_costs, round_cost, depth_scale, exit_importance, exit_loss_weights, exits_on,
                       expected_speedup, expected_tokens_per_layer, expected_tokens_per_round,
                       expected_tokens_per_round_in_runs, keep_masks, layer_dropout_rate,
                       layer_dropout_rates, layer_keep_mask, learning_rate, time_scale)

# ---------------------------------------------------------------- layer dropout


@pytest.mark.parametrize("kind, layer, expected", [
    ("uniform", 2, 1.0),
    ("linear", 1, 0.25),              # x = 1/4
    ("exp", 0, 0.0),
    ("exp", 2, 0.41421356237),        # 2^0.5 - 1
    ("exp", 4, 1.0),
    ("log", 0, 0.0),                  # log_5(1)
    ("log", 2, 0.68260619448),        # log_5(3) = ln 3 / ln 5
    ("log", 4, 1.0),
    ("sin", 1, 0.38268343236),        # sin(pi/8)
    ("sin", 2, 0.70710678118),        # sin(pi/4)
    ("sigmoid", 2, 0.5),
    ("sigmoid", 0, 0.00669285092),    # 1 / (1 + e^5)
    ("sigmoid", 4, 0.99330714907),    # 1 / (1 + e^-5)
])
def test_depth_scale_L5(kind, layer, expected):
    assert depth_scale(layer, 5, kind) == pytest.approx(expected, abs=1e-10)


@pytest.mark.parametrize("kind", DEPTH_SCALES)
def test_depth_scale_single_layer_is_the_deepest(kind):
    expected = {"sigmoid": 0.99330714907}.get(kind, 1.0)   # x = 1; log returns 1 by convention
    assert depth_scale(0, 1, kind) == pytest.approx(expected, abs=1e-10)


def test_time_scale():
    assert time_scale(0, 11, "exp") == 0.0
    assert time_scale(5, 11, "exp") == pytest.approx(0.41421356237)
    assert time_scale(10, 11, "exp") == 1.0
    assert time_scale(50, 11, "exp") == 1.0          # clamped after the last step
    assert time_scale(3, 11, "linear") == pytest.approx(0.3)
    assert time_scale(50, 11, "linear") == 1.0
    assert time_scale(3, 11, "constant") == 1.0
    assert time_scale(0, 1, "exp") == 1.0            # T = 1: x = 1


def test_layer_dropout_rate_is_product():
    # L=5, T=11, t=5, l=4, exp/exp, p_max 0.2: 0.41421356 * 1 * 0.2
    assert layer_dropout_rate(5, 4, num_layers=5, total_steps=11, p_max=0.2, depth="exp",
                              time="exp") == pytest.approx(0.0828427125)
    # l=2 as well: 0.41421356 * 0.41421356 * 0.2 = (3 - 2·sqrt 2) · 0.2
    assert layer_dropout_rate(5, 2, num_layers=5, total_steps=11, p_max=0.2, depth="exp",
                              time="exp") == pytest.approx(0.0343145751)
    rates = layer_dropout_rates(0, num_layers=3, total_steps=1, p_max=0.5, depth="linear")
    assert rates == pytest.approx([0.0, 0.25, 0.5])
    # defaults: depth exp, time constant; L=3 → D = [0, sqrt 2 - 1, 1]
    assert layer_dropout_rates(7, num_layers=3, total_steps=100, p_max=0.1) == pytest.approx(
        [0.0, 0.041421356237, 0.1])
    assert layer_dropout_rates(0, num_layers=4, total_steps=10, p_max=0.0) == [0.0] * 4


def test_layer_dropout_validation():
    for p_max in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="p_max"):
            layer_dropout_rate(0, 0, num_layers=2, total_steps=2, p_max=p_max)
    with pytest.raises(ValueError, match="unknown depth scale 'cubic'; choose one of uniform, linear, exp"):
        depth_scale(0, 2, "cubic")
    with pytest.raises(ValueError, match="unknown time scale 'fast'; choose one of constant, exp, linear"):
        time_scale(0, 2, "fast")
    with pytest.raises(ValueError, match=r"layer 3 outside 0..2"):
        depth_scale(3, 3, "exp")
    with pytest.raises(ValueError, match=r"layer -1 outside"):
        depth_scale(-1, 3, "exp")
    with pytest.raises(ValueError, match="num_layers=0"):
        depth_scale(0, 0, "exp")
    with pytest.raises(ValueError, match="num_layers=0"):
        layer_dropout_rates(0, num_layers=0, total_steps=2, p_max=0.1)
    with pytest.raises(ValueError, match="total_steps=0"):
        time_scale(0, 0, "exp")
    with pytest.raises(ValueError, match="step=-1"):
        time_scale(-1, 5, "exp")
    assert TIME_SCALES == ("constant", "exp", "linear")

# ---------------------------------------------------------------- early-exit loss


@pytest.mark.parametrize("kind, at4, at9", [
    ("uniform", 1.0, 1.0), ("l", 4.0, 9.0), ("sum_l", 10.0, 45.0), ("sqrt_l", 2.0, 3.0),
    ("inv_l", 0.25, 1 / 9), ("inv_sqrt_l", 0.5, 1 / 3)])
def test_exit_importance(kind, at4, at9):
    assert exit_importance(4, kind) == pytest.approx(at4)
    assert exit_importance(9, kind) == pytest.approx(at9)


def test_weights_all_exits_sum_l():
    w = exit_loss_weights(0, num_layers=4, importance="sum_l")
    assert w == pytest.approx({1: 1 / 20, 2: 3 / 20, 3: 6 / 20, 4: 10 / 20})


@pytest.mark.parametrize("importance", IMPORTANCE_KINDS)
@pytest.mark.parametrize("curriculum", CURRICULA)
def test_weights_sum_to_one_over_the_exits_on(importance, curriculum):
    for t in range(7):
        kw = dict(num_layers=6, curriculum=curriculum, rotation_period=3, gradual_steps=5)
        w = exit_loss_weights(t, importance=importance, e_scale=0.3, **kw)
        assert sorted(w) == exits_on(t, **kw) and 6 in w
        assert sum(w.values()) == pytest.approx(1.0) and min(w.values()) > 0


def test_e_scale_applies_to_non_final_exits_only():
    # e' = [0.5·1, 0.5·3, 0.5·6, 10] = [0.5, 1.5, 3, 10], total 15
    w = exit_loss_weights(0, num_layers=4, importance="sum_l", e_scale=0.5)
    assert w == pytest.approx({1: 0.5 / 15, 2: 1.5 / 15, 3: 3 / 15, 4: 10 / 15})
    # uniform, subset {2}, e_scale 3: e' = {2: 3, 4: 1}
    w = exit_loss_weights(0, num_layers=4, exit_layers=[2], importance="uniform", e_scale=3.0)
    assert w == pytest.approx({2: 0.75, 4: 0.25})


def test_rotational_curriculum():
    # R=2, L=4: even steps exits {2, 4}; odd steps {1, 3, 4}
    assert exits_on(0, num_layers=4, curriculum="rotational", rotation_period=2) == [2, 4]
    assert exits_on(1, num_layers=4, curriculum="rotational", rotation_period=2) == [1, 3, 4]
    assert exits_on(6, num_layers=4, curriculum="rotational", rotation_period=2) == [2, 4]
    w = exit_loss_weights(1, num_layers=4, importance="l", curriculum="rotational", rotation_period=2)
    assert w == pytest.approx({1: 1 / 8, 3: 3 / 8, 4: 4 / 8})
    # R=3, L=6: t=0 → {3, 6}; t=1 → {1, 4, 6}; t=2 → {2, 5, 6}; sum_l at t=2: (3, 15, 21)/39
    assert [exits_on(t, num_layers=6, curriculum="rotational", rotation_period=3) for t in range(4)] == [
        [3, 6], [1, 4, 6], [2, 5, 6], [3, 6]]
    w = exit_loss_weights(2, num_layers=6, curriculum="rotational", rotation_period=3)
    assert w == pytest.approx({2: 3 / 39, 5: 15 / 39, 6: 21 / 39})
    # R=1 is every exit every step
    assert exits_on(5, num_layers=3, curriculum="rotational", rotation_period=1) == [1, 2, 3]


def test_gradual_curriculum():
    # L=4, T_C=8: exit l on iff t >= 8·(4-l)/4 = 2·(4-l): exit 3 from t=2, 2 from 4, 1 from 6
    on = [exits_on(t, num_layers=4, curriculum="gradual", gradual_steps=8) for t in (0, 1, 2, 4, 5, 6, 100)]
    assert on == [[4], [4], [3, 4], [2, 3, 4], [2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4]]
    # L=3, T_C=10: exit 2 from t >= 10/3 (t=4), exit 1 from t >= 20/3 (t=7)
    on = [exits_on(t, num_layers=3, curriculum="gradual", gradual_steps=10) for t in (3, 4, 6, 7)]
    assert on == [[3], [2, 3], [2, 3], [1, 2, 3]]
    assert exit_loss_weights(0, num_layers=4, curriculum="gradual", gradual_steps=8) == {4: 1.0}
    assert exits_on(0, num_layers=4, curriculum="gradual", gradual_steps=0) == [1, 2, 3, 4]


def test_exit_subset_always_includes_final():
    assert exits_on(0, num_layers=6, exit_layers=[2, 4]) == [2, 4, 6]
    assert exits_on(0, num_layers=6, exit_layers=[4, 2, 4, 6]) == [2, 4, 6]
    assert exits_on(0, num_layers=6, exit_layers=[]) == [6]
    # subset with rotation R=2: odd steps switch off 2 and 4 (both even), the final stays on
    assert exits_on(1, num_layers=6, exit_layers=[2, 4], curriculum="rotational", rotation_period=2) == [6]


def test_exit_loss_validation():
    with pytest.raises(ValueError, match="exit layer 7 outside 1..6"):
        exits_on(0, num_layers=6, exit_layers=[7])
    with pytest.raises(ValueError, match="exit layer 0 outside 1..6"):
        exits_on(0, num_layers=6, exit_layers=[0])
    with pytest.raises(ValueError, match="unknown exit curriculum 'random'; choose one of none, rotational"):
        exits_on(0, num_layers=6, curriculum="random")
    with pytest.raises(ValueError, match="rotation_period=0"):
        exits_on(0, num_layers=6, curriculum="rotational", rotation_period=0)
    with pytest.raises(ValueError, match="gradual_steps=-1"):
        exits_on(0, num_layers=6, curriculum="gradual", gradual_steps=-1)
    with pytest.raises(ValueError, match="num_layers=0"):
        exits_on(0, num_layers=0)
    with pytest.raises(ValueError, match="step=-1"):
        exits_on(-1, num_layers=4)
    with pytest.raises(ValueError, match="unknown exit importance 'cube'; choose one of uniform, l, sum_l"):
        exit_loss_weights(0, num_layers=4, importance="cube")
    with pytest.raises(ValueError, match="exit 0 must be >= 1"):
        exit_importance(0, "l")
    with pytest.raises(ValueError, match="e_scale=0"):
        exit_loss_weights(0, num_layers=4, e_scale=0.0)

# ---------------------------------------------------------------- learning rate


def test_learning_rate():
    kw = dict(base_lr=1.0, warmup_steps=4, total_steps=14, min_lr_ratio=0.1)
    assert [learning_rate(t, **kw) for t in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert learning_rate(4, **kw) == pytest.approx(1.0)    # peak: decay starts here
    assert learning_rate(9, **kw) == pytest.approx(0.55)   # half-way: 0.1 + 0.9·0.5
    # W=4, T=12, t=6: a quarter of the way, 0.1 + 0.9·(1 + cos(pi/4))/2 = 0.1 + 0.9·0.85355339
    quarter = dict(kw, total_steps=12)
    assert learning_rate(6, **quarter) == pytest.approx(0.86819805153)
    assert learning_rate(14, **kw) == pytest.approx(0.1)
    assert learning_rate(99, **kw) == pytest.approx(0.1)
    assert learning_rate(9, decay="linear", **kw) == pytest.approx(0.55)
    assert learning_rate(6, decay="linear", **quarter) == pytest.approx(0.775)   # 1 - 0.9·0.25
    assert learning_rate(99, decay="linear", **kw) == pytest.approx(0.1)
    assert learning_rate(9, decay="constant", **kw) == 1.0
    assert learning_rate(2, decay="constant", **kw) == 0.75   # warmup applies to every decay


def test_learning_rate_edges():
    # no warmup: decay from step 0; base_lr 3e-4 → floor 3e-5
    assert learning_rate(0, base_lr=3e-4, warmup_steps=0, total_steps=10) == pytest.approx(3e-4)
    assert learning_rate(10, base_lr=3e-4, warmup_steps=0, total_steps=10) == pytest.approx(3e-5)
    # warmup as long as the run: no decay phase, floor from T on
    assert learning_rate(4, base_lr=1.0, warmup_steps=5, total_steps=5) == 1.0
    assert learning_rate(5, base_lr=1.0, warmup_steps=5, total_steps=5) == pytest.approx(0.1)
    assert learning_rate(7, base_lr=2.0, warmup_steps=2, total_steps=12, min_lr_ratio=0.0) == pytest.approx(1.0)


def test_learning_rate_validation():
    kw = dict(base_lr=1.0, warmup_steps=4, total_steps=14)
    with pytest.raises(ValueError, match="unknown LR decay 'step'; choose one of cosine, linear, constant"):
        learning_rate(0, decay="step", **kw)
    with pytest.raises(ValueError, match="step=-1"):
        learning_rate(-1, **kw)
    with pytest.raises(ValueError, match="min_lr_ratio=1.5"):
        learning_rate(0, min_lr_ratio=1.5, **kw)
    with pytest.raises(ValueError, match="warmup_steps=-2"):
        learning_rate(0, base_lr=1.0, warmup_steps=-2, total_steps=10)
    with pytest.raises(ValueError, match="base_lr=-1"):
        learning_rate(0, base_lr=-1.0, warmup_steps=0, total_steps=10)

# ---------------------------------------------------------------- speedup

_TABLE = [  # notes section 1: (α, c = E/L, best γ, speedup)
    (0.6, 0.125, 3, 1.58), (0.8, 0.125, 5, 2.27), (0.9, 0.125, 9, 3.07),
    (0.6, 0.25, 2, 1.31), (0.8, 0.25, 3, 1.69), (0.9, 0.25, 6, 2.09),
    (0.6, 0.5, 1, 1.07), (0.8, 0.5, 2, 1.22), (0.9, 0.5, 3, 1.38)]


@pytest.mark.parametrize("alpha, c, gamma, expected", _TABLE)
def test_speedup_table_of_the_notes(alpha, c, gamma, expected):
    L = 32
    E = int(c * L)
    assert expected_speedup(alpha, gamma, E, L) == pytest.approx(expected, abs=0.006)
    # and γ is the best draft length for that α and c
    assert best_draft_config({E: alpha}, L, max_draft_len=32)[:2] == (E, gamma)


def test_speedup_hand_values():
    # α=0.8, γ=5, E/L=1/8: (1 - 0.8^6)/(0.2·1.625) = 0.737856/0.325
    assert expected_speedup(0.8, 5, 4, 32) == pytest.approx(2.27032615385)
    assert expected_speedup(1.0, 3, 2, 8) == pytest.approx(4 / 1.75)      # α = 1: γ+1 tokens
    assert expected_speedup(1 - 1e-12, 3, 2, 8) == pytest.approx(4 / 1.75)
    assert expected_speedup(0.0, 2, 2, 8) == pytest.approx(1 / 1.5)       # only the verify token
    assert expected_tokens_per_layer(0.5, 1, 4, 8) == pytest.approx(1.5 / 12)
    assert expected_tokens_per_layer(1.0, 4, 2, 8) == pytest.approx(5 / 16)
    assert expected_tokens_per_layer(0.9, 0, 3, 8) == pytest.approx(1 / 8)   # no draft: autoregressive


def test_best_draft_config():
    E, gamma, s = best_draft_config({2: 0.5, 4: 0.9, 8: 1.0}, num_layers=8, max_draft_len=8)
    brute = max((expected_speedup(a, g, e, 8), e, g) for e, a in {2: 0.5, 4: 0.9}.items() for g in range(1, 9))
    assert (E, gamma) == (brute[1], brute[2]) and s == pytest.approx(brute[0])
    # α = 1 at exit 1 of 4: speedup (γ+1)/(1+γ/4) grows with γ, so the cap wins: 5/2 at γ=4
    assert best_draft_config({1: 1.0}, 4, max_draft_len=4) == pytest.approx((1, 4, 2.5))
    # tie: identical speedups at two exits → the smaller exit
    assert best_draft_config({3: 0.0, 1: 0.0}, 4, max_draft_len=3)[:2] == (1, 1)


def test_speedup_validation():
    with pytest.raises(ValueError, match="acceptance=1.2"):
        expected_speedup(1.2, 2, 2, 8)
    with pytest.raises(ValueError, match="draft_len=-1"):
        expected_speedup(0.5, -1, 2, 8)
    with pytest.raises(ValueError, match=r"exit_layer=0 outside 1..8"):
        expected_speedup(0.5, 2, 0, 8)
    with pytest.raises(ValueError, match=r"exit_layer=9 outside 1..8"):
        expected_tokens_per_layer(0.5, 2, 9, 8)
    with pytest.raises(ValueError, match="no candidate exit below num_layers=8"):
        best_draft_config({8: 0.9}, 8)
    with pytest.raises(ValueError, match="max_draft_len=0"):
        best_draft_config({2: 0.9}, 8, max_draft_len=0)


def _simulated_tokens_per_round(after_accepted, after_rejected, gamma, n=200_000, seed=0):
    """Greedy rounds walked over a sampled agreement sequence: a round judges bits from its start
    until a 0 or γ ones, commits the judged bits (the correction included) or γ + 1 (the bonus)."""
    import random
    rng = random.Random(seed)
    bits, prev = [], 1
    for _ in range(n):
        prev = int(rng.random() < (after_accepted if prev else after_rejected))
        bits.append(prev)
    t = rounds = 0
    while t < n - gamma - 1:
        k = 0
        while k < gamma and bits[t + k]:
            k += 1
        t += k + 1 if k < gamma else gamma + 1
        rounds += 1
    return t / rounds


@pytest.mark.parametrize("p,q,gamma", [(0.9, 0.3, 1), (0.9, 0.3, 4), (0.6, 0.6, 3), (0.95, 0.05, 6), (0.3, 0.8, 2)])
def test_tokens_per_round_in_runs_matches_simulated_rounds(p, q, gamma):
    assert expected_tokens_per_round_in_runs(p, q, gamma) == pytest.approx(
        _simulated_tokens_per_round(p, q, gamma), rel=0.01)


def test_tokens_per_round_in_runs_edges():
    for alpha in (0.0, 0.4, 0.9, 1.0):            # independent positions: the geometric sum
        assert expected_tokens_per_round_in_runs(alpha, alpha, 3) == pytest.approx(expected_tokens_per_round(alpha, 3))
    assert expected_tokens_per_round_in_runs(1.0, 0.0, 3) == 1.0     # stuck after a rejection
    with pytest.raises(ValueError, match="after_rejected=1.5"):
        expected_tokens_per_round_in_runs(0.5, 1.5, 2)
    with pytest.raises(ValueError, match="draft_len=0"):
        expected_tokens_per_round_in_runs(0.5, 0.5, 0)

# ---------------------------------------------------------------- counter RNG

_M64, _PHI = (1 << 64) - 1, 0x9E3779B97F4A7C15


def _reference_uniform(seed, step, layer, sample_id):
    """The module docstring's formula in unsigned Python integers (no torch, no wrapping tricks)."""
    def mix(x):
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
        return x ^ (x >> 31)
    h = 0
    for key in (seed, step, layer, sample_id):
        h = mix((h + key * _PHI + _PHI) & _M64)
    return (h >> 11) / 2.0 ** 53


def test_counter_rng_matches_reference_bit_for_bit():
    ids = [0, 1, 2, 7, 12345, -5, 2**40 + 3, 2**63 - 1, -2**63]
    for keys in [(0, 0, 0), (5, 9, 2), (123456789, 10**6, 31), (-1, 3, 0)]:
        got = counter_uniform(*keys, torch.tensor(ids)).tolist()
        assert got == [_reference_uniform(*keys, i) for i in ids]
    # pinned: a change here changes every run's dropout pattern
    assert counter_uniform(0, 0, 0, torch.tensor([0, 1, 2])).tolist() == [
        0.1296456182997474, 0.049920065672091285, 0.6703283700586791]


def test_counter_rng_is_uniform_and_independent():
    ids = torch.arange(100_000)
    u = counter_uniform(0, 0, 0, ids)
    assert u.dtype == torch.float64 and 0 <= u.min() and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 4 * (1 / 12) ** 0.5 / math.sqrt(len(ids))
    assert abs(u.var().item() - 1 / 12) < 0.002
    hist = torch.histc(u.float(), bins=10, min=0, max=1)
    assert (hist - 10_000).abs().max() < 4 * math.sqrt(10_000 * 0.9)
    for other in (counter_uniform(0, 0, 1, ids), counter_uniform(0, 1, 0, ids), counter_uniform(1, 0, 0, ids),
                  counter_uniform(0, 0, 0, ids + 1)):
        assert not torch.equal(u, other)
        corr = torch.corrcoef(torch.stack([u, other]))[0, 1].abs().item()
        assert corr < 4 / math.sqrt(len(ids))


def test_drop_fraction_matches_rate():
    n = 100_000
    for layer, rate in enumerate([0.05, 0.3, 0.5]):
        frac = 1 - layer_keep_mask(3, 11, layer, torch.arange(n), rate).double().mean().item()
        assert abs(frac - rate) < 4 * math.sqrt(rate * (1 - rate) / n)
    masks = keep_masks(0, 0, torch.arange(n), [0.3, 0.3])
    both = (~masks[0] & ~masks[1]).double().mean().item()      # independent layers: 0.09
    assert abs(both - 0.09) < 4 * math.sqrt(0.09 * 0.91 / n)


def test_counter_rng_is_pure_and_layout_free():
    ids = torch.arange(16) * 7 + 3
    state = torch.get_rng_state()
    whole = counter_uniform(5, 9, 2, ids)
    assert torch.equal(torch.cat([counter_uniform(5, 9, 2, ids[:8]), counter_uniform(5, 9, 2, ids[8:])]), whole)
    assert torch.equal(counter_uniform(5, 9, 2, ids.flip(0)), whole.flip(0))
    assert torch.equal(counter_uniform(5, 9, 2, ids.view(4, 4)), whole.view(4, 4))
    assert torch.equal(counter_uniform(5, 9, 2, ids.to(torch.int32)), whole)
    assert torch.equal(counter_uniform(5, 9, 2, ids), whole)               # repeatable
    masks = keep_masks(5, 9, ids, [0.0, 0.5, 0.999999])
    assert torch.equal(torch.get_rng_state(), state)
    assert masks.shape == (3, 16) and masks.dtype == torch.bool and masks[0].all()
    assert torch.equal(masks[1], counter_uniform(5, 9, 1, ids) >= 0.5)
    assert torch.equal(torch.cat([keep_masks(5, 9, ids[:5], [0.2, 0.6]), keep_masks(5, 9, ids[5:], [0.2, 0.6])],
                                 dim=1), keep_masks(5, 9, ids, [0.2, 0.6]))
    assert not layer_keep_mask(5, 9, 0, ids, 1.0).any()
    assert keep_masks(5, 9, ids, []).shape == (0, 16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_counter_rng_same_on_gpu():
    ids = torch.randint(-2**62, 2**62, (4096,), generator=torch.Generator().manual_seed(0))
    cpu = counter_uniform(7, 100, 3, ids)
    gpu = counter_uniform(7, 100, 3, ids.cuda())
    assert gpu.device.type == "cuda" and torch.equal(gpu.cpu(), cpu)


def test_counter_rng_validation():
    with pytest.raises(ValueError, match="integer dtype, got torch.float32"):
        counter_uniform(0, 0, 0, torch.arange(4.0))
    with pytest.raises(ValueError, match="must be a torch.Tensor"):
        counter_uniform(0, 0, 0, [1, 2])
    with pytest.raises(ValueError, match="drop_rate=1.5"):
        layer_keep_mask(0, 0, 0, torch.arange(4), 1.5)
    with pytest.raises(ValueError, match="drop_rate=-0.1"):
        keep_masks(0, 0, torch.arange(4), [0.1, -0.1])


# ---------------------------------------------------------------- speedup under measured costs


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.75, 1.0])
@pytest.mark.parametrize("E, L", [(1, 4), (2, 8), (8, 32)])
def test_layer_count_costs_give_the_papers_speedup(alpha, E, L):
    costs = DecodeCosts.layer_count(7)
    for gamma in range(1, 7):
        assert expected_speedup_with_costs(alpha, gamma, E, L, costs) == pytest.approx(
            expected_speedup(alpha, gamma, E, L))
        assert round_cost(gamma, E, L, costs) == gamma * E + L


def test_speedup_with_costs_hand_values():
    costs = DecodeCosts(block=(1.0, 2.0, 3.0), head=(0.5, 1.0, 1.5))
    # γ=2, E=1, L=4: drafts 2·(1 + 0.5), verify 1·b(1) + 3·b(3) + h(3) = 3 + 1 + 9 + 1.5
    assert round_cost(2, 1, 4, costs) == pytest.approx(14.5)
    # α=0.5: 1.75 tokens per round; autoregressive 4·1 + 0.5 per token
    assert expected_speedup_with_costs(0.5, 2, 1, 4, costs) == pytest.approx(1.75 * 4.5 / 14.5)
    # a head as costly as the blocks makes drafting less attractive than the layer count says
    heavy = DecodeCosts(block=(1.0,) * 5, head=(4.0,) * 5)
    # a pass overhead s: 2 drafts + 1 verify pass more, 1 more per autoregressive token
    with_step = DecodeCosts(block=(1.0, 2.0, 3.0), head=(0.5, 1.0, 1.5), step=0.5)
    assert round_cost(2, 1, 4, with_step) == pytest.approx(14.5 + 3 * 0.5)
    assert expected_speedup_with_costs(0.5, 2, 1, 4, with_step) == pytest.approx(1.75 * 5.0 / 16.0)
    assert expected_speedup_with_costs(0.8, 4, 2, 8, heavy) < expected_speedup(0.8, 4, 2, 8)


def test_decode_costs_validation():
    with pytest.raises(ValueError, match="same positions"):
        DecodeCosts(block=(1.0, 1.0), head=(0.0,))
    with pytest.raises(ValueError, match="positive"):
        DecodeCosts(block=(0.0,), head=(0.0,))
    with pytest.raises(ValueError, match=r"no cost measured for 4 positions \(1..3\)"):
        round_cost(3, 1, 4, DecodeCosts.layer_count(3))
