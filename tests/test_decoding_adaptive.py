"""Adaptive draft length and dynamic exit: greedy output stays exact, the controllers move the way
they should."""
import math

import pytest
import torch
from builders import NEW, PROMPTS, make_model, reference_greedy

from pretrain.decoding import generate
from pretrain.decoding.adaptive_draft import AdaptiveDraftLength
from pretrain.decoding.dynamic_exit import DynamicExit
from schedules.speedup import expected_speedup_with_costs, expected_tokens_per_layer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("options", [
    dict(exit_layer=3, draft_len=6, adaptive_draft=True, draft_threshold=0.6, target_acceptance=0.9),
    dict(exit_layer=1, draft_len=4, adaptive_draft=True, draft_threshold=0.05, target_acceptance=0.5),
    dict(exit_layer=4, draft_len=2, dynamic_exit=True, max_draft_len=5, probe_every=1),
    dict(exit_layer=5, draft_len=3, dynamic_exit=True, adaptive_draft=True, draft_threshold=0.1,
         target_acceptance=0.6, probe_every=2, probe_window=4),
], ids=["adaptive", "adaptive-low-target", "dynamic", "both"])
def test_options_keep_greedy_output_exact(model, expected, options):
    out, stats = generate(model, PROMPTS, strategy="self_speculative", max_new_tokens=NEW, **options)
    assert out == expected
    if options.get("dynamic_exit"):
        assert len(set(stats.exit_layers)) > 1   # E moved
    if options.get("adaptive_draft"):
        assert len(set(stats.draft_lens)) > 1    # γ varied


def test_adaptive_threshold_tunes_toward_target_per_row():
    ctl = AdaptiveDraftLength(threshold=0.5, target_acceptance=0.8).start(3, "cpu")
    t = torch.tensor
    # row 0: acceptance 0.25 < 0.8, stricter; row 1: everything accepted, looser; row 2: nothing judged
    ctl.update(accepted=t([1, 4, 0]), judged=t([4, 4, 0]))
    assert ctl.thresholds[0] == pytest.approx(0.5 * math.exp(0.8 - 0.25))
    assert ctl.thresholds[1] == pytest.approx(0.5 * math.exp(0.8 - 1.0))
    assert ctl.thresholds[2] == 0.5
    for _ in range(50):
        ctl.update(accepted=t([0, 4, 0]), judged=t([1, 4, 0]))
    assert ctl.thresholds.tolist() == pytest.approx([ctl.max_threshold, ctl.min_threshold, 0.5])
    ctl.select_rows(t([2, 0]))   # row 1 left the batch
    assert ctl.thresholds.tolist() == pytest.approx([0.5, ctl.max_threshold])
    assert ctl.unsure(t([[0.4, 0.6], [0.999, 0.001]])).tolist() == [False, False]
    assert ctl.unsure(t([[0.5, 0.5], [0.9, 0.1]])).tolist() == [False, True]
    # the batch drafts on while at least half of its rows do (every row is computed each step)
    assert [bool(ctl.go_on(t(rows))) for rows in ([True, False, False], [True, True, False], [True], [False])] == \
        [False, True, True, False]
    with pytest.raises(ValueError, match="target_acceptance"):
        AdaptiveDraftLength(target_acceptance=1.0)
    with pytest.raises(ValueError, match="min_drafting"):
        AdaptiveDraftLength(min_drafting=1.5)


def test_adaptive_drafts_less_on_a_weak_exit(model):
    # a target above exit 1's acceptance (~0.85 here) raises the threshold: shorter drafts
    _, fixed = generate(model, PROMPTS, strategy="self_speculative", exit_layer=1, draft_len=6, max_new_tokens=24)
    _, adaptive = generate(model, PROMPTS, strategy="self_speculative", exit_layer=1, draft_len=6, max_new_tokens=24,
                           adaptive_draft=True,
                           draft_threshold=0.3, target_acceptance=0.9)
    assert adaptive.summary()["mean_draft_len"] < fixed.summary()["mean_draft_len"]
    assert adaptive.drafted < fixed.drafted


def test_dynamic_exit_choice_maximises_expected_tokens_per_layer():
    ctl = DynamicExit(num_layers=8, exit_layer=4, draft_len=2, max_draft_len=6, decay=0.5)
    ctl.observe(2, score=3.0, positions=10)    # α(2) = 0.3
    ctl.observe(4, score=9.0, positions=10)    # α(4) = 0.9
    ctl.observe(6, score=10.0, positions=10)   # α(6) = 1.0
    best = max(((expected_tokens_per_layer(a, g, e, 8), e, g) for e, a in ((2, 0.3), (4, 0.9), (6, 1.0))
                for g in range(1, 7)))
    assert ctl.choose() == (best[1], best[2]) == (ctl.exit_layer, ctl.draft_len) == (4, 3)
    ctl.observe(4, score=0.0, positions=10)    # decayed average: (0.5·9 + 0) / (0.5·10 + 10)
    assert ctl.acceptance(4) == pytest.approx(4.5 / 15)
    assert ctl.probe_exits(0) == [2, 3, 5, 6] and ctl.probe_exits(8) == [2, 3, 5, 6]
    assert ctl.probe_exits(1) == []
    ctl.observe(3, score=0.0, positions=0)     # nothing seen: no estimate
    assert ctl.acceptance(3) is None


def test_dynamic_exit_moves_toward_cheap_accurate_exit():
    strong_exit = make_model(scale=0.01, embed_scale=20)  # exit 2 is nearly the full model
    out, stats = generate(strong_exit, [[1, 2, 3], [7, 8]], strategy="self_speculative", exit_layer=5, draft_len=2,
                          max_new_tokens=40,
                          dynamic_exit=True)
    assert stats.exit_layers[0] == 5 and stats.exit_layers[-1] <= 3
    assert out == [reference_greedy(strong_exit, p, 40) for p in ([1, 2, 3], [7, 8])]
    _, static = generate(strong_exit, [[1, 2, 3], [7, 8]], strategy="self_speculative", exit_layer=5, draft_len=2,
                         max_new_tokens=40)
    assert stats.summary()["layer_evals_per_token"] < static.summary()["layer_evals_per_token"]


def test_dynamic_exit_gives_each_row_the_draft_length_of_its_own_acceptance():
    ctl = DynamicExit(num_layers=8, exit_layer=2, draft_len=3, max_draft_len=6).start(4, "cpu")
    t = torch.tensor
    ctl.observe_rows(accepted=t([10.0, 0.0, 6.0, 1.0]), judged=t([10.0, 10.0, 10.0, 1.0]))
    gammas = ctl.row_draft_lens().tolist()

    def best(alpha):   # γ = 0 is a plain step: speedup 1
        return max(range(7), key=lambda g: (round(expected_speedup_with_costs(alpha, g, 2, 8, ctl.costs), 12), -g))

    assert gammas == [best(1.0), 0, best(0.6), 3]   # row 3 has too little evidence: the batch's γ
    assert gammas[0] == 6 and 0 < gammas[2] < 6
    ctl.select_rows(t([2, 0]))
    assert ctl.row_draft_lens().tolist() == [gammas[2], gammas[0]]
    ctl.observe(5, score=10.0, positions=10)   # a better exit: E moves, the rows' evidence is reset
    assert ctl.choose()[0] == 5 and ctl.row_judged.tolist() == [0.0, 0.0]
