"""strategy="auto": drafts when the measured costs and the observed acceptance say drafting pays,
decodes autoregressively when not, switches mid-generation, and gives the full model's greedy text
whatever it does; its report says what it chose and why; bad input is refused."""
import functools

import pytest
import torch
from builders import NEW, PROMPTS, make_model, reference_greedy

from pretrain.decoding import DecodeOptions, generate, generation
from pretrain.decoding.auto_strategy import AutoStrategy
from pretrain.decoding.self_speculative import speculative_round
from schedules.speedup import DecodeCosts, expected_speedup_with_costs

pytestmark = pytest.mark.usefixtures("one_thread")

# layer counts (a block costs 1 on any number of positions, the head nothing): drafting pays at high α
PAYS = DecodeCosts.layer_count(9)
# a block on 2+ positions costs 10 (compute bound): drafting cannot pay even with every draft accepted
NEVER = DecodeCosts(block=(1.0,) + (10.0,) * 8, head=(0.0,) * 9)


def test_controller_decides_from_costs_and_acceptance():
    auto = AutoStrategy(num_layers=6, exit_layer=2, costs=PAYS, max_draft_len=8, min_evidence=16)
    assert not auto.never_drafts and auto.strategy == "self_speculative"
    assert [auto.next_draft_len() for _ in range(3)] == [0, 1, 1]    # a timed plain step, then probes: one draft a round
    auto.observe(7.0, 8, generated=9)                                 # 8 judged drafts: not enough yet
    assert auto.next_draft_len() == 1 and not auto.decisions
    auto.observe(8.0, 8, generated=10)                                # α ≈ 0.94: drafting pays
    alpha = auto.acceptance   # γ: the best at α rounded to 0.01 (a table), the speedup at α
    _, gamma = max((expected_speedup_with_costs(round(alpha, 2), g, 2, 6, PAYS), -g) for g in range(1, 9))
    assert auto.strategy == "self_speculative" and auto.next_draft_len() == -gamma > 1
    assert auto.predicted == pytest.approx(expected_speedup_with_costs(alpha, -gamma, 2, 6, PAYS))
    assert auto.predicted > 0.999 * max(expected_speedup_with_costs(alpha, g, 2, 6, PAYS) for g in range(1, 9))
    for _ in range(30):                                               # acceptance collapses: plain steps
        auto.observe(0.0, 8, generated=100)
    assert auto.strategy == "autoregressive" and auto.predicted < 1 and auto.acceptance < 0.05
    assert [d["strategy"] for d in auto.decisions] == ["self_speculative", "autoregressive"]
    assert auto.decisions[0]["after_tokens"] == 10
    # while autoregressive, after every recheck_every - 1 plain steps come probe_rounds rounds of one draft
    cycle = [0] * (auto.recheck_every - 1) + [1] * auto.probe_rounds
    assert [auto.next_draft_len() for _ in range(2 * len(cycle))] == cycle * 2

    never = AutoStrategy(num_layers=6, exit_layer=2, costs=NEVER)
    assert never.never_drafts and never.ceiling < 1 and never.strategy == "autoregressive"
    assert [never.next_draft_len() for _ in range(20)] == [0] * 20
    assert "cannot pay" in never.report()["reason"]


def test_a_rounds_own_cost_can_decide_against_drafting():
    """Exit 5 of 6, layer-count passes, every draft accepted: a round of γ drafts gives γ + 1 tokens
    for 5γ + 6 blocks against 6(γ + 1) autoregressive (1.09x at γ = 1 .. 1.17x at γ = 8); a round's
    own work of 9 blocks more takes every γ below 1."""
    gammas = range(1, 9)
    assert max(expected_speedup_with_costs(1.0, g, 5, 6, PAYS) for g in gammas) > 1
    bookkept = DecodeCosts(block=PAYS.block, head=PAYS.head, round_extra=(9.0,) * 8, exit_layer=5)
    assert max(expected_speedup_with_costs(1.0, g, 5, 6, bookkept) for g in gammas) < 1
    assert not AutoStrategy(num_layers=6, exit_layer=5, costs=PAYS).never_drafts
    assert AutoStrategy(num_layers=6, exit_layer=5, costs=bookkept).never_drafts


def test_the_decodes_own_timings_correct_the_prediction():
    """Rounds that take three times what the costs predict, plain steps as predicted: drafting
    predicted well above 1x runs below it, and auto stops drafting; untimed (tensor parallel), it
    keeps drafting."""
    from schedules.speedup import autoregressive_cost, round_cost

    timed, untimed = (AutoStrategy(num_layers=6, exit_layer=2, costs=PAYS, timed=t) for t in (True, False))
    for auto in (timed, untimed):
        for _ in range(20):
            auto.observe_time(1, 3 * round_cost(1, 2, 6, PAYS))
            auto.observe_time(0, autoregressive_cost(6, PAYS))
        auto.observe(15.0, 16, generated=20)                  # α ≈ 0.94: pays by the costs alone
    assert untimed.time_correction == 1.0 and untimed.strategy == "self_speculative" and untimed.predicted > 1.3
    assert timed.time_correction == pytest.approx(1 / 3)
    assert timed.strategy == "autoregressive" and timed.predicted == pytest.approx(untimed.predicted / 3)
    assert "corrected by x0.333" in timed.reason


def test_never_drafts_when_costs_say_it_cannot_pay(model, expected):
    out, stats = generate(model, PROMPTS, exit_layer=2, max_new_tokens=NEW, costs=NEVER)
    assert out == expected
    report = stats.auto[0]
    assert report["chosen"] == "autoregressive" and "cannot pay" in report["reason"]
    assert stats.drafted == 0 and report["drafting_rounds"] == 0
    assert stats.head_evals == stats.decoded        # one head per token: not a single draft
    assert report["predicted_speedup"]["self_speculative_if_all_accepted"] < 1


def test_drafts_when_it_pays_and_keeps_greedy_output():
    strong_exit = make_model(scale=0.01, embed_scale=20)     # exit 2 agrees with the full model
    out, stats = generate(strong_exit, PROMPTS, exit_layer=2, max_new_tokens=24, costs=PAYS)
    assert out == [reference_greedy(strong_exit, p, 24) for p in PROMPTS]
    report = stats.auto[0]
    assert report["chosen"] == "self_speculative" and "it pays" in report["reason"]
    assert report["acceptance"] > 0.8 and report["predicted_speedup"]["self_speculative"] > 1
    assert stats.drafted > 0 and report["drafting_rounds"] > 0
    timing_steps = -(-report["drafting_rounds"] // 32)       # one plain step before every 32 rounds, timed
    assert timing_steps <= report["autoregressive_steps"] <= timing_steps + 1
    assert report["decisions"][0]["strategy"] == "self_speculative"


@pytest.mark.parametrize("eos_row", [None, 1])
def test_switching_every_round_gives_the_autoregressive_text(model, expected, monkeypatch, eos_row):
    """Ragged prompts, rows ending at EOS: flip between drafting (γ cycling 1..3) and plain steps
    after every round and step; the text is the full model's greedy text."""
    flips = []

    def flip(self, score, positions, generated):
        self.strategy = "autoregressive" if self.strategy == "self_speculative" else "self_speculative"
        self.draft_len = 1 + len(flips) % 3
        flips.append(self.strategy)

    monkeypatch.setattr(AutoStrategy, "observe", flip)
    monkeypatch.setattr(generation, "AutoStrategy", functools.partial(AutoStrategy, recheck_every=2,
                                                                       probe_rounds=1))
    eos = None if eos_row is None else expected[eos_row][4]
    out, stats = generate(model, PROMPTS, exit_layer=3, max_new_tokens=NEW, costs=PAYS, eos_id=eos,
                          auto_timing=False)                     # untimed: the flips alone decide
    assert out == [reference_greedy(model, p, NEW, eos=eos) for p in PROMPTS]
    report = stats.auto[0]
    assert report["drafting_rounds"] >= 3 and report["autoregressive_steps"] >= 3 and stats.rejections > 0
    auto_ar, _ = generate(model, PROMPTS, strategy="autoregressive", max_new_tokens=NEW, eos_id=eos)
    assert out == auto_ar


def test_measured_costs_are_of_the_batch_size_and_kept():
    fresh = make_model(seed=3)
    prompts = [[1, 2, 3], [4, 5], [6]]
    reference = [reference_greedy(fresh, p, 10) for p in prompts]
    out, stats = generate(fresh, prompts, exit_layer=2, max_new_tokens=10, max_draft_len=2)
    first = stats.auto[0]
    assert out == reference
    assert first["costs"]["batch"] == 3 and len(first["costs"]["block_s"]) == 3 and first["cost_measurement_s"] > 0
    assert len(first["costs"]["round_extra_s"]) == 2 and first["costs"]["round_extra_exit"] == 2   # γ 1, 2 at E=2
    _, again = generate(fresh, prompts, exit_layer=2, max_new_tokens=10, max_draft_len=2)
    assert again.auto[0]["costs"] == first["costs"]                            # measured once
    assert again.auto[0]["cost_measurement_s"] < first["cost_measurement_s"] / 10
    _, single = generate(fresh, prompts[:1], exit_layer=2, max_new_tokens=10, max_draft_len=2)
    assert single.auto[0]["costs"]["batch"] == 1                               # another batch size: measured anew
    assert set(first["predicted_speedup"]) == {"autoregressive", "self_speculative",
                                               "self_speculative_if_all_accepted"}


def test_bad_options_are_refused(model):
    assert DecodeOptions().strategy == "auto"
    with pytest.raises(ValueError, match="adaptive_draft and dynamic_exit need strategy self_speculative"):
        generate(model, PROMPTS, adaptive_draft=True)
    with pytest.raises(ValueError, match="adaptive_draft and dynamic_exit need strategy self_speculative"):
        generate(model, PROMPTS, dynamic_exit=True)
    with pytest.raises(ValueError, match="strategy auto with max_draft_len=8 needs 9"):
        generate(model, PROMPTS, costs=DecodeCosts.layer_count(4))
    with pytest.raises(ValueError, match="min_speedup=0"):
        generate(model, PROMPTS, min_speedup=0, costs=PAYS)
    with pytest.raises(ValueError, match="choose one of auto, autoregressive"):
        generate(model, PROMPTS, strategy="fastest")
    with pytest.raises(ValueError, match="exit_layer=6 must be in 1..5"):
        generate(model, PROMPTS, exit_layer=6, costs=PAYS)
    with pytest.raises(ValueError, match="batch=0"):
        DecodeCosts(block=(1.0,), head=(0.0,), batch=0)


def test_rows_far_apart_then_plain_steps(monkeypatch):
    """A long row races ahead while drafting (γ 8, a strong exit) and leaves the batch done; the short
    row it left behind finishes with plain steps. The cache's host bound on the attended span must
    follow the rows still decoding, not the one that left (it once overran the cache)."""
    import pretrain.decoding.auto_strategy as auto_module

    strong_exit = make_model(scale=0.01, embed_scale=20)
    prompts, new = [list(range(1, 41)), [1]], 40
    left = []   # rows in the batch after each round

    def spec_then_steps(self, score, positions, generated):   # plain steps once the long row has left
        self.strategy, self.draft_len = ("autoregressive", 8) if left[-1] == 1 else ("self_speculative", 8)

    def uneven_round(runner, seqs, *args, **kwargs):
        gammas = torch.tensor([8, 0][2 - seqs.batch:])     # the short row drafts nothing
        evidence = speculative_round(runner, seqs, *args, row_draft_lens=gammas, **kwargs)
        left.append(seqs.batch)
        return evidence

    monkeypatch.setattr(AutoStrategy, "observe", spec_then_steps)
    # plain steps only at the end (a probe round would re-base the bound itself)
    monkeypatch.setattr(generation, "AutoStrategy", functools.partial(AutoStrategy, recheck_every=1000))
    monkeypatch.setattr(auto_module, "speculative_round", uneven_round)
    out, stats = generate(strong_exit, prompts, exit_layer=2, max_new_tokens=new, costs=PAYS)
    assert out == [reference_greedy(strong_exit, p, new) for p in prompts]
    assert left[0] == 2 and left[-1] == 1 and stats.auto[0]["autoregressive_steps"] > 20
