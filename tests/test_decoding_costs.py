"""Decode cost model: the round cost formula matches the block and head calls the decoder makes,
measured costs steer the dynamic exit without changing greedy output, and bad input is refused."""
import dataclasses

import pytest
from builders import NEW, PROMPTS, make_model

from pretrain.decoding import generate
from pretrain.decoding.cost_model import measure_decode_costs, calibrate_on_decodes
from pretrain.decoding.dynamic_exit import DynamicExit
from pretrain.decoding.runner import BlockRunner
from schedules.speedup import DecodeCosts, expected_speedup_with_costs, round_cost

pytestmark = pytest.mark.usefixtures("one_thread")


def test_round_cost_counts_what_the_decoder_runs(model, monkeypatch):
    """Log every block, head and embedding call (one per forward pass) of a real decode, price it
    with a cost table, and compare each full-length round with round_cost."""
    costs = DecodeCosts(block=(1.0, 1.7, 2.9, 3.1), head=(0.4, 0.9, 1.3, 2.2), step=0.25)
    spent, rounds = [0.0], []
    embed, blocks, head, crop = BlockRunner.embed, BlockRunner.blocks, BlockRunner.head, BlockRunner.crop_to_committed

    def priced_embed(self, tokens):
        spent[0] += costs.step
        return embed(self, tokens)

    def priced_blocks(self, h, start, stop, exits=()):
        spent[0] += (max(stop - start, 0)) * costs.block_cost(h.shape[1])
        return blocks(self, h, start, stop, exits)

    def priced_head(self, h):
        spent[0] += costs.head_cost(h.shape[1] if h.dim() == 3 else 1)
        return head(self, h)

    def end_of_round(self, length, max_length=None, stop=None):
        rounds.append(spent[0])
        spent[0] = 0.0
        return crop(self, length, max_length, stop)

    monkeypatch.setattr(BlockRunner, "embed", priced_embed)
    monkeypatch.setattr(BlockRunner, "blocks", priced_blocks)
    monkeypatch.setattr(BlockRunner, "head", priced_head)
    monkeypatch.setattr(BlockRunner, "crop_to_committed", end_of_round)
    E, gamma, L = 2, 3, model.cfg.n_layers
    _, stats = generate(model, PROMPTS[:1], strategy="self_speculative", exit_layer=E, draft_len=gamma,
                        max_new_tokens=NEW)
    per_round = rounds[1:]  # the first is the prefill
    assert len(per_round) == len(stats.draft_lens)
    full = [c for c, g in zip(per_round, stats.draft_lens) if g == gamma]
    assert len(full) >= 3
    assert full == pytest.approx([round_cost(gamma, E, L, costs)] * len(full))


def test_measured_costs_are_timings_of_every_width(model):
    costs = measure_decode_costs(model, max_positions=3, context=8, repeats=3, warmup=1)
    assert costs.max_positions == 3
    assert all(b > 0 for b in costs.block) and all(h > 0 for h in costs.head) and costs.step >= 0
    assert not model.training
    model.train()
    try:
        measure_decode_costs(model, max_positions=1, context=4, repeats=1, warmup=0)
        assert model.training  # the caller's mode is restored
    finally:
        model.eval()
    with pytest.raises(ValueError, match="max_seq_len"):
        measure_decode_costs(model, max_positions=4, context=model.cfg.max_seq_len - 10)
    with pytest.raises(ValueError, match="max_positions=0"):
        measure_decode_costs(model, max_positions=0)


def _burn_cpu(seconds: float) -> None:
    import time

    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_round_extra_is_what_a_real_round_costs_besides_its_passes(model, monkeypatch):
    """A round's own work (here made 20 ms of CPU longer, at the cache crop every round ends with)
    shows in round_extra at every draft length, and not in a plain step's calibrated cost; without
    it the extra is far smaller; round_cost counts it."""
    costs = measure_decode_costs(model, max_positions=4, context=8, repeats=3, warmup=1)
    plain = calibrate_on_decodes(model, costs, exit_layer=2, context=8, repeats=3)
    assert plain.exit_layer == 2 and len(plain.round_extra) == 3 and plain.block == costs.block
    crop = BlockRunner.crop_to_committed

    def slow_crop(self, *args, **kwargs):
        _burn_cpu(0.02)
        return crop(self, *args, **kwargs)

    monkeypatch.setattr(BlockRunner, "crop_to_committed", slow_crop)
    slow = calibrate_on_decodes(model, costs, exit_layer=2, context=8, repeats=3)
    for gamma, (before, after) in enumerate(zip(plain.round_extra, slow.round_extra), start=1):
        assert abs(before) < 0.01 and 0.015 < after - before < 0.03, (gamma, before, after)
        assert round_cost(gamma, 2, model.cfg.n_layers, slow) == pytest.approx(
            round_cost(gamma, 2, model.cfg.n_layers, dataclasses.replace(slow, round_extra=(0.0,) * 3)) + after)
    assert abs(slow.step - plain.step) < 0.005      # plain steps crop nothing: their calibration is unchanged
    with pytest.raises(ValueError, match=f"exit_layer={model.cfg.n_layers} < {model.cfg.n_layers}"):
        calibrate_on_decodes(model, costs, exit_layer=model.cfg.n_layers)
    with pytest.raises(ValueError, match="round_extra needs one cost per draft length 1..3"):
        DecodeCosts(block=costs.block, head=costs.head, round_extra=(0.0,))


def test_costs_steer_the_dynamic_exit_toward_short_drafts():
    # a block on M positions costing M (a compute-bound device) makes long verifies expensive
    linear = DecodeCosts(block=tuple(float(m) for m in range(1, 8)), head=(0.0,) * 7)
    by_layers = DynamicExit(num_layers=8, exit_layer=2, draft_len=2, max_draft_len=6)
    by_time = DynamicExit(num_layers=8, exit_layer=2, draft_len=2, max_draft_len=6, costs=linear)
    for ctl in (by_layers, by_time):
        ctl.observe(2, score=9.0, positions=10)   # α = 0.9
        ctl.choose()
    assert by_time.draft_len < by_layers.draft_len
    best = max((expected_speedup_with_costs(0.9, g, 2, 8, linear), g) for g in range(1, 7))
    assert by_time.draft_len == best[1]
    with pytest.raises(ValueError, match="max_draft_len \\+ 1 = 7"):
        DynamicExit(num_layers=8, exit_layer=2, draft_len=2, max_draft_len=6, costs=DecodeCosts.layer_count(4))


def test_dynamic_exit_with_measured_costs_keeps_greedy_output_exact(model, expected):
    costs = measure_decode_costs(model, max_positions=5, context=8, repeats=2, warmup=1)
    out, stats = generate(model, PROMPTS, strategy="self_speculative", exit_layer=4, draft_len=2, max_new_tokens=NEW,
                          dynamic_exit=True, max_draft_len=4, probe_every=1, costs=costs)
    assert out == expected
    assert stats.rounds > 0
    with pytest.raises(ValueError, match="costs only steer the dynamic exit"):
        generate(model, PROMPTS, strategy="self_speculative", max_new_tokens=4, costs=costs)
    with pytest.raises(ValueError, match="max_draft_len=8 need 9"):
        generate(model, PROMPTS, strategy="self_speculative", max_new_tokens=4, dynamic_exit=True, costs=costs)


def test_calibrated_costs_price_the_step_and_the_rounds_as_measured(model, monkeypatch):
    """Whatever the parts say, the calibrated model prices a plain step at the measured median and
    every round at the line through the measured medians; the step's rest may be negative."""
    import pretrain.decoding.cost_model as cost_model
    from schedules.speedup import autoregressive_cost

    measured = iter(range(1, 10_000))

    def fake_median(column):
        return float(next(measured))

    costs = DecodeCosts(block=(5.0, 5.0, 5.0, 5.0), head=(1.0, 1.0, 1.0, 1.0), step=0.5)
    monkeypatch.setattr(cost_model.statistics, "median", fake_median)   # step 1, rounds 2, 3, 4
    calibrated = calibrate_on_decodes(model, costs, exit_layer=2, context=8, repeats=2)
    L = model.cfg.n_layers
    assert autoregressive_cost(L, calibrated) == pytest.approx(1.0) and calibrated.step < 0
    assert [round_cost(g, 2, L, calibrated) for g in (1, 2, 3)] == pytest.approx([2.0, 3.0, 4.0])
    with pytest.raises(ValueError, match="must be positive"):
        DecodeCosts(block=costs.block, head=costs.head, step=-1.0)
