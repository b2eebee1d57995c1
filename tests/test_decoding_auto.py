"""strategy="auto": drafts when the measured costs and the observed acceptance say drafting pays,
decodes autoregressively when not, switches mid-generation, and gives the full model's greedy text
whatever it does; its report says what it chose and why; bad input is refused."""
import dataclasses
import functools

import pytest
import torch
from builders import NEW, PROMPTS, make_model, reference_greedy

from pretrain.decoding import DecodeOptions, generate, generation
from pretrain.decoding.agreement_chain import AgreementChain
from pretrain.decoding.auto_strategy import AutoStrategy
from pretrain.decoding.decode_timings import DecodeTimings, decode_timings_for
from pretrain.decoding.sampling import SamplingConfig
from pretrain.decoding.self_speculative import speculative_round
from schedules.speedup import (DecodeCosts, autoregressive_cost, expected_speedup_with_costs,
                              expected_tokens_per_round_in_runs, round_cost)

pytestmark = pytest.mark.usefixtures("one_thread")

# layer counts (a block costs 1 on any number of positions, the head nothing): drafting pays at high α
PAYS = DecodeCosts.layer_count(9)
# a block on 2+ positions costs 10 (compute bound): drafting cannot pay even with every draft accepted
NEVER = DecodeCosts(block=(1.0,) + (10.0,) * 8, head=(0.0,) * 9)


def _play(chain, rows_bits):
    """Read one plain step per entry of `rows_bits` (a bit per row) through read_step, on logits
    made to agree (1) or not (0), and add what the synchronisation would read."""
    for bits in rows_bits:
        full = torch.zeros(len(bits), 5)
        full[:, 0] = 1.0
        exit_ = full.clone()
        exit_[torch.tensor(bits) == 0] = torch.tensor([0.0, 1.0, 0, 0, 0])
        chain.add(chain.read_step(exit_, full.argmax(-1), None, SamplingConfig()).long().tolist())


def test_controller_reads_then_decides_from_costs_and_runs():
    auto = AutoStrategy(num_layers=6, exit_layer=2, costs=PAYS, max_draft_len=8, min_evidence=16,
                        chain=AgreementChain(decay=1.0))
    auto.chain.start(1, "cpu")
    assert not auto.never_drafts and auto.strategy == "autoregressive"
    bits = [1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1]
    for i, bit in enumerate(bits):                  # plain steps that read until 16 bits are judged
        assert auto.next_move() == (0, True)
        _play(auto.chain, [[bit]])
        auto.observe(generated=i + 2)
        assert (auto.decisions != []) == (i == 15)
    # 13 bits after a 1, 11 of them 1; 2 after a 0, both 1; one pseudo-count at the pooled α each
    alpha = 14 / 16
    p, q = (11 + alpha) / 14, (2 + alpha) / 3
    assert auto.chain.continuation() == pytest.approx((p, q))
    best = max((expected_tokens_per_round_in_runs(p, q, g) * autoregressive_cost(6, PAYS) / round_cost(g, 2, 6, PAYS), g)
               for g in range(1, 9))
    assert auto.strategy == "self_speculative" and auto.predicted == pytest.approx(best[0]) and auto.draft_len == best[1]
    assert auto.decisions[0]["after_tokens"] == 17 and "it pays" in auto.reason
    # drafting: a timed plain step that reads, then rounds; another plain step before the 33rd round
    moves = [auto.next_move() for _ in range(34)]
    assert moves == [(0, True)] + [(best[1], False)] * 32 + [(0, True)]
    _play(auto.chain, [[0]] * 30)                   # agreement collapses: plain steps
    auto.observe(generated=100)
    assert auto.strategy == "autoregressive" and auto.predicted < 1
    assert [d["strategy"] for d in auto.decisions] == ["self_speculative", "autoregressive"]
    # while autoregressive: recheck_every unread steps, then read_window steps that read, again and
    # again, the unread gap doubling up to max_unread
    gaps = [32, 64, 128, 256, 256]
    cycle = [move for gap in gaps for move in [(0, False)] * gap + [(0, True)] * auto.read_window]
    assert [auto.next_move() for _ in range(len(cycle))] == cycle
    _play(auto.chain, [[1]] * 300)                  # agreement returns: drafting, and the gap is reset
    auto.observe(generated=2000)
    assert auto.strategy == "self_speculative" and auto.unread_gap == auto.recheck_every

    never = AutoStrategy(num_layers=6, exit_layer=2, costs=NEVER)
    assert never.never_drafts and never.ceiling < 1 and never.strategy == "autoregressive"
    assert [never.next_move() for _ in range(20)] == [(0, False)] * 20      # nor does it read
    assert "cannot pay" in never.report()["reason"]


def test_reading_windows_keep_within_the_read_budget():
    """A read costing 10% of a step (the head's share by the costs, then 20% as timed): windows of
    8 reads come after at least 8 (r / budget - 1) unread steps, so reading takes <= 1% of the
    plain steps; the doubling gap still applies once it is the longer."""
    head_heavy = DecodeCosts(block=(1.0,) * 9, head=(2 / 3,) * 9)              # a step 6 + 2/3: head 10%
    auto = AutoStrategy(num_layers=6, exit_layer=2, costs=head_heavy, chain=AgreementChain(decay=1.0))
    auto.chain.start(1, "cpu")
    _play(auto.chain, [[0]] * 16)
    auto.observe(generated=16)
    assert auto.strategy == "autoregressive" and auto.read_share == pytest.approx(0.1)
    assert auto.budget_gap == 72                                              # 8 (0.1 / 0.01 - 1)
    moves = [auto.next_move() for _ in range(72 + 8)]
    assert moves == [(0, False)] * 72 + [(0, True)] * 8
    assert sum(read for _, read in moves) * auto.read_share <= 0.01 * len(moves) + 1e-9
    for read in (True, False) * 5:                                            # reading steps take 1.2x
        auto.observe_time(0, 1.2 if read else 1.0, read)
    assert auto.read_share == pytest.approx(0.2) and auto.budget_gap == 152
    assert [auto.next_move() for _ in range(152 + 8)] == [(0, False)] * 152 + [(0, True)] * 8
    untimed = AutoStrategy(num_layers=6, exit_layer=2, costs=head_heavy, timed=False, timings=auto.timings)
    assert untimed.read_share == pytest.approx(0.1)                           # the costs alone (tensor parallel)
    with pytest.raises(ValueError, match="read_budget=0"):
        AutoStrategy(num_layers=6, exit_layer=2, costs=head_heavy, read_budget=0)


def test_thin_evidence_does_not_buy_drafting():
    """Exit 4 of 6: 7 of 8 drafts accepted predicts drafting 1.12x, above min_speedup 1.07, but not
    one standard error of the agreement lower: autoregressive. The same text over 32 bits: drafting."""
    pattern = [1, 1, 1, 0, 1, 1, 1, 1]
    chosen = []
    for repeats in (1, 4):
        auto = AutoStrategy(num_layers=6, exit_layer=4, costs=PAYS, min_speedup=1.07, chain=AgreementChain(decay=1.0))
        auto.chain.start(1, "cpu")
        _play(auto.chain, [[b] for b in pattern * repeats])
        auto.observe(generated=10)
        n, alpha = 8 * repeats, 7 / 8
        error = (alpha * (1 - alpha) / n) ** 0.5
        p, q = auto.chain.continuation()
        cautious = max(expected_tokens_per_round_in_runs(max(0, p - error), max(0, q - error), g)
                       * autoregressive_cost(6, PAYS) / round_cost(g, 4, 6, PAYS) for g in range(1, 9))
        assert auto.verdict["predicted_speedup_cautious"] == pytest.approx(cautious)
        assert auto.predicted > 1.07
        chosen.append(auto.strategy)
    assert chosen == ["autoregressive", "self_speculative"]


def _reference_counts(rows):
    """[bits, from 1, from 0, Σ bits, 1 -> 1, 0 -> 1] over rows of bits in [0, 1] (None: not judged;
    a fractional bit is the probability of a 1)."""
    sums = [0.0] * 6
    for bits in rows:
        for prev, bit in zip([None] + bits, bits):
            if bit is None:
                continue
            sums[0] += 1
            sums[3] += bit
            if prev is not None:
                sums[1] += prev
                sums[4] += prev * bit
                sums[2] += 1 - prev
                sums[5] += (1 - prev) * bit
    return sums


def test_agreement_chain_counts_rounds_and_steps_as_one_sequence():
    """Two rows through plain steps (read or not) and rounds (accepted, judged, rejected), then the
    first row leaves; the chain's sums equal those of each row's bit sequence, where a round's
    drafts give their bits in order and the bonus position after γ accepted drafts, an unread step
    and a round a row could not draft in give none."""
    chain = AgreementChain(decay=1.0)
    chain.start(2, "cpu")
    rows = [[], []]
    live = [0, 1]                   # the rows still in the batch, in batch order

    def step(bits):
        if bits is None:
            chain.forget()
        else:
            _play(chain, [bits])
        for i, r in enumerate(live):
            rows[r].append(None if bits is None else bits[i])

    def round_(accepted, judged):
        acc, jud = torch.tensor(accepted), torch.tensor(judged)
        chain.add(chain.read_round(acc, jud, acc < jud).long().tolist())
        for r, a, j in zip(live, accepted, judged):
            rows[r].extend([1] * a + ([0] if a < j else [None]))   # the rejection, or the bonus / no draft

    step([1, 0])
    round_([2, 0], [3, 1])          # row 0: 1 1 0; row 1: 0
    round_([2, 1], [2, 2])          # row 0: 1 1 (bonus); row 1: 1 0
    step([0, 1])
    step(None)
    round_([0, 3], [0, 3])          # row 0 could not draft; row 1: 1 1 1 (bonus)
    step([1, 1])
    assert chain.sums == pytest.approx(_reference_counts(rows))
    chain.select_rows(torch.tensor([1]))   # row 0 leaves the batch
    live = [1]
    step([0])
    round_([1], [2])
    step([1])
    assert chain.sums == pytest.approx(_reference_counts(rows))
    assert chain.seen == sum(b is not None for r in rows for b in r) and chain.reads == 5


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
    timed, untimed = (AutoStrategy(num_layers=6, exit_layer=2, costs=PAYS, timed=t) for t in (True, False))
    for auto in (timed, untimed):
        auto.chain.start(1, "cpu")
        for _ in range(20):
            auto.observe_time(1, 3 * round_cost(1, 2, 6, PAYS))
            auto.observe_time(0, autoregressive_cost(6, PAYS))
        _play(auto.chain, [[1]] * 15 + [[0]])
        auto.observe(generated=20)                            # α ≈ 0.94: pays by the costs alone
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
    # the prompts' 15 positions are the evidence of the first decision, made before any step
    assert report["prompt_positions_judged"] == sum(map(len, PROMPTS)) >= 8
    timing_steps = -(-report["drafting_rounds"] // 32)       # one plain step before every 32 rounds, timed
    assert timing_steps <= report["autoregressive_steps"] <= timing_steps + 1
    assert report["agreement_reads"] == report["autoregressive_steps"]
    assert report["decisions"][0]["strategy"] == "self_speculative"
    assert report["decisions"][0]["after_tokens"] == len(PROMPTS)



def test_the_timings_correction_is_kept_across_calls():
    """A second call starts from the correction the first one's timings gave (no rounds spent
    re-learning it); another batch size or other costs start from 1."""
    strong_exit = make_model(scale=0.01, embed_scale=20)
    cache_type = generation.decoding_cache_type(strong_exit)
    _, first = generate(strong_exit, PROMPTS, exit_layer=2, max_new_tokens=24, costs=PAYS)
    kept = decode_timings_for(strong_exit, PAYS, len(PROMPTS), 2, cache_type)
    assert kept.rounds[1] > 0 and kept.steps[1] > 0                 # both kinds timed by the first call
    assert first.auto[0]["decisions"][0]["time_correction"] == 1.0   # nothing known before it
    assert first.auto[0]["time_correction"] == pytest.approx(kept.correction) != 1.0
    carried = kept.correction
    _, second = generate(strong_exit, PROMPTS, exit_layer=2, max_new_tokens=24, costs=PAYS)
    assert second.auto[0]["decisions"][0]["time_correction"] == pytest.approx(carried)
    _, other_batch = generate(strong_exit, PROMPTS[:1], exit_layer=2, max_new_tokens=24, costs=PAYS)
    assert other_batch.auto[0]["decisions"][0]["time_correction"] == 1.0
    before = (list(kept.rounds), list(kept.steps))
    _, untimed = generate(strong_exit, PROMPTS, exit_layer=2, max_new_tokens=24, costs=PAYS, auto_timing=False)
    assert untimed.auto[0]["time_correction"] == 1.0
    assert (kept.rounds, kept.steps) == before                          # untimed decodes leave it alone
    other_costs = dataclasses.replace(PAYS, step=0.5)
    assert other_costs != PAYS
    _, repriced = generate(strong_exit, PROMPTS, exit_layer=2, max_new_tokens=24, costs=other_costs)
    assert repriced.auto[0]["decisions"][0]["time_correction"] == 1.0
    with pytest.raises(ValueError, match="priced by other costs"):
        AutoStrategy(num_layers=6, exit_layer=2, costs=PAYS, timings=DecodeTimings(NEVER))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_plain_steps_read_the_exits_agreement_with_the_full_model(model, expected, monkeypatch, temperature):
    """Reading on every plain step, the chain's sums are the agreement of exit 2 with the full model
    at the prompts' last positions (here 20 bits: 5 a row) and at every decoded position, and its runs,
    computed independently from whole forwards: greedy, whether the argmaxes agree; sampling, the
    probability sum_v min(p, q) that a draft is accepted."""
    chain = AgreementChain(decay=1.0)
    monkeypatch.setattr(generation, "AutoStrategy", functools.partial(AutoStrategy, min_evidence=10 ** 9,
                                                                       chain=chain, prompt_bits=20))
    out, stats = generate(model, PROMPTS, exit_layer=2, max_new_tokens=NEW, costs=PAYS, temperature=temperature)
    assert stats.drafted == 0 and (out == expected) == (temperature == 0)
    rows = []
    with torch.no_grad():
        for prompt, new in zip(PROMPTS, out):
            ids = torch.tensor([prompt + new])
            exit_, full = model.logits(ids, exit_layer=2)[0].double(), model.logits(ids)[0].double()
            if temperature:
                bits = torch.minimum(exit_.softmax(-1), full.softmax(-1)).sum(-1)
            else:
                bits = (exit_.argmax(-1) == full.argmax(-1)).double()
            # the prefill reads the prompt's last 5 positions (the last one chose the first new
            # token); each step decodes one more position
            rows.append(bits[max(0, len(prompt) - 5):len(prompt) + len(new) - 1].tolist())
    assert chain.sums == pytest.approx(_reference_counts(rows), abs=1e-3)
    assert 0 < chain.sums[3] < chain.sums[0] - (0.1 if temperature else 1)   # not every draft would be accepted
    assert stats.auto[0]["agreement_reads"] == NEW - 1 == stats.auto[0]["autoregressive_steps"]


@pytest.mark.parametrize("eos_row", [None, 1])
def test_switching_every_round_gives_the_autoregressive_text(model, expected, monkeypatch, eos_row):
    """Ragged prompts, rows ending at EOS: two rounds (γ cycling 1..3), then plain steps until one
    reads, again and again; the text is the full model's greedy text."""
    flips = []

    def flip(self, generated):
        self.strategy = "autoregressive" if len(flips) % 3 == 2 else "self_speculative"
        self.draft_len = 1 + len(flips) % 3
        flips.append(self.strategy)

    monkeypatch.setattr(AutoStrategy, "observe", flip)
    monkeypatch.setattr(generation, "AutoStrategy", functools.partial(AutoStrategy, recheck_every=1,
                                                                       read_window=1))
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

    def spec_then_steps(self, generated):   # plain steps once the long row has left
        self.strategy, self.draft_len = ("autoregressive", 8) if left and left[-1] == 1 else ("self_speculative", 8)

    def uneven_round(runner, seqs, *args, **kwargs):
        gammas = torch.tensor([8, 0][2 - seqs.batch:])     # the short row drafts nothing
        evidence = speculative_round(runner, seqs, *args, row_draft_lens=gammas, **kwargs)
        left.append(seqs.batch)
        return evidence

    monkeypatch.setattr(AutoStrategy, "observe", spec_then_steps)
    # plain steps only at the end (no reading window, whose decision would come back to drafting)
    monkeypatch.setattr(generation, "AutoStrategy", functools.partial(AutoStrategy, recheck_every=1000))
    monkeypatch.setattr(auto_module, "speculative_round", uneven_round)
    out, stats = generate(strong_exit, prompts, exit_layer=2, max_new_tokens=new, costs=PAYS)
    assert out == [reference_greedy(strong_exit, p, new) for p in prompts]
    assert left[0] == 2 and left[-1] == 1 and stats.auto[0]["autoregressive_steps"] > 20


def test_many_bits_at_once_weigh_what_the_decayed_window_holds():
    """512 prompt bits (8 rows of 64) count as the ~50 bits the decay keeps (1 / (1 - 0.98)), with
    their proportions; `seen` counts them all."""
    chain = AgreementChain()
    chain.start(8, "cpu")
    bits = (torch.arange(8 * 64).reshape(8, 64) % 4 != 0).float()   # 3 in 4 agree
    full = torch.zeros(8, 64, 5)
    full[..., 0] = 1.0
    exit_ = full.clone()
    exit_[bits == 0] = torch.tensor([0.0, 1.0, 0, 0, 0])
    chain.add(chain.read_prompt(exit_, full, torch.ones(8, 64, dtype=torch.bool), SamplingConfig()).long().tolist(),
              prompt=True)
    assert chain.sums[0] == pytest.approx(50.0) and chain.acceptance == pytest.approx(0.75)
    assert chain.seen == chain.prompt_bits == 512
    # each row 0 1 1 1 0 1 1 1 ..: of its 63 steps, 47 from a 1 (32 to a 1), 16 from a 0 (all to a 1);
    # scaled by 50 / 512, one pseudo-count at α each
    scale = 50 / 512
    p, q = chain.continuation()
    assert p == pytest.approx((8 * 32 * scale + 0.75) / (8 * 47 * scale + 1))
    assert q == pytest.approx((8 * 16 * scale + 0.75) / (8 * 16 * scale + 1))
