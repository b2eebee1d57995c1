"""Adaptive draft length and dynamic exit: greedy output stays exact, the controllers move the way
they should."""
import pytest
import torch
from conftest import NEW, PROMPTS, make_model, reference_greedy

from pretrain.decoding import generate
from pretrain.decoding.adaptive_draft import AdaptiveDraftLength
from pretrain.decoding.dynamic_exit import DynamicExit
from schedules.speedup import expected_tokens_per_layer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("options", [
    dict(exit_layer=3, draft_len=6, adaptive_draft=True, draft_threshold=0.6, target_acceptance=0.9),
    dict(exit_layer=1, draft_len=4, adaptive_draft=True, draft_threshold=0.05, target_acceptance=0.5),
    dict(exit_layer=4, draft_len=2, dynamic_exit=True, max_draft_len=5, probe_every=1),
    dict(exit_layer=5, draft_len=3, dynamic_exit=True, adaptive_draft=True, draft_threshold=0.1,
         target_acceptance=0.6, probe_every=2, probe_window=4),
], ids=["adaptive", "adaptive-low-target", "dynamic", "both"])
def test_options_keep_greedy_output_exact(model, expected, options):
    out, stats = generate(model, PROMPTS, max_new_tokens=NEW, **options)
    assert out == expected
    if options.get("dynamic_exit"):
        assert len(set(stats.exit_layers)) > 1   # E moved
    if options.get("adaptive_draft"):
        assert len(set(stats.draft_lens)) > 1    # γ varied


def test_adaptive_threshold_tunes_toward_target():
    ctl = AdaptiveDraftLength(threshold=0.5, target_acceptance=0.8)
    ctl.update(accepted=1, judged=4)      # acceptance 0.25 < 0.8: stricter
    assert ctl.threshold > 0.5
    high = ctl.threshold
    for _ in range(20):
        ctl.update(accepted=4, judged=4)  # everything accepted: draft longer
    assert ctl.threshold < high and ctl.threshold >= ctl.min_threshold
    for _ in range(50):
        ctl.update(accepted=0, judged=1)
    assert ctl.threshold == ctl.max_threshold
    assert ctl.unsure(torch.tensor([[0.5, 0.5], [0.999, 0.001]])).tolist() == [True, False]
    with pytest.raises(ValueError, match="target_acceptance"):
        AdaptiveDraftLength(target_acceptance=1.0)


def test_adaptive_drafts_less_on_a_weak_exit(model):
    # a target above exit 1's acceptance (~0.85 here) raises the threshold: shorter drafts
    _, fixed = generate(model, PROMPTS, exit_layer=1, draft_len=6, max_new_tokens=24)
    _, adaptive = generate(model, PROMPTS, exit_layer=1, draft_len=6, max_new_tokens=24, adaptive_draft=True,
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
    out, stats = generate(strong_exit, [[1, 2, 3], [7, 8]], exit_layer=5, draft_len=2, max_new_tokens=40,
                          dynamic_exit=True)
    assert stats.exit_layers[0] == 5 and stats.exit_layers[-1] <= 3
    assert out == [reference_greedy(strong_exit, p, 40) for p in ([1, 2, 3], [7, 8])]
    _, static = generate(strong_exit, [[1, 2, 3], [7, 8]], exit_layer=5, draft_len=2, max_new_tokens=40)
    assert stats.summary()["layer_evals_per_token"] < static.summary()["layer_evals_per_token"]
