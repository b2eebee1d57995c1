"""Decoding: greedy self-speculative output equals full-model greedy decoding token for token, for
every exit and draft length; ragged batches; EOS; the lossy strategies; statistics."""
import pytest
import torch

from builders import NEW, PROMPTS, make_model, reference_greedy
from pretrain.decoding import DecodeOptions, generate

pytestmark = pytest.mark.usefixtures("one_thread")


def test_greedy_self_speculative_is_exact_for_every_exit_and_draft_length(model, expected):
    L = model.cfg.n_layers
    drafted = accepted = rejections = 0
    for exit_layer in range(1, L):
        for gamma in (1, 2, 3, 4):
            out, stats = generate(model, PROMPTS, strategy="self_speculative", exit_layer=exit_layer,
                                  draft_len=gamma, max_new_tokens=NEW)
            assert out == expected, (exit_layer, gamma)
            assert stats.generated == sum(map(len, expected))
            drafted, accepted, rejections = (drafted + stats.drafted, accepted + stats.accepted,
                                             rejections + stats.rejections)
    assert 0 < accepted < drafted and rejections > 0  # acceptance and rejection (cropping) both happened


def test_options_object_and_keywords_agree(model):
    a = generate(model, PROMPTS, DecodeOptions(strategy="self_speculative", exit_layer=3, draft_len=2,
                                               max_new_tokens=8))[0]
    b = generate(model, PROMPTS, strategy="self_speculative", exit_layer=3, draft_len=2, max_new_tokens=8)[0]
    c = generate(model, PROMPTS, DecodeOptions(strategy="self_speculative", exit_layer=3, draft_len=5,
                                               max_new_tokens=3), draft_len=2,
                 max_new_tokens=8)[0]
    assert a == b == c
    with pytest.raises(TypeError, match="draft_lenn"):
        generate(model, PROMPTS, draft_lenn=3)


@pytest.mark.parametrize("strategy", ["self_speculative", "autoregressive", "early_exit"])
def test_ragged_batch_equals_rows_alone(model, strategy):
    opts = DecodeOptions(strategy=strategy, exit_layer=2, draft_len=3, max_new_tokens=12)
    batched, _ = generate(model, PROMPTS, opts)
    assert batched == [generate(model, [p], opts)[0][0] for p in PROMPTS]


def test_autoregressive_and_early_exit(model, expected):
    L = model.cfg.n_layers
    out, stats = generate(model, PROMPTS, strategy="autoregressive", max_new_tokens=NEW)
    assert out == expected
    s = stats.summary()
    assert s["layer_evals_per_token"] == L and s["tokens_per_round"] == 1.0 and s["drafted"] == 0
    for exit_layer in (1, 3):
        early, stats = generate(model, PROMPTS, strategy="early_exit", exit_layer=exit_layer, max_new_tokens=10)
        assert early == [reference_greedy(model, p, 10, exit_layer=exit_layer) for p in PROMPTS]
        assert stats.summary()["layer_evals_per_token"] == exit_layer
    assert early != [e[:10] for e in expected]  # lossy on this model


def test_eos_and_max_new_tokens_end_rows_independently(model, expected):
    eos = expected[1][4]
    for strategy in ("self_speculative", "autoregressive"):
        out, stats = generate(model, PROMPTS, strategy=strategy, exit_layer=2, draft_len=4, max_new_tokens=NEW,
                              eos_id=eos)
        assert out == [reference_greedy(model, p, NEW, eos=eos) for p in PROMPTS]
        assert out[1][-1] == eos and len(out[1]) <= 5
        assert any(len(o) == NEW for o in out)
    for n in (1, 2, 5):  # fewer tokens than a round could give
        out, _ = generate(model, PROMPTS, strategy="self_speculative", exit_layer=2, draft_len=4, max_new_tokens=n)
        assert out == [e[:n] for e in expected]


def test_stats_are_consistent(model):
    out, stats = generate(model, PROMPTS, strategy="self_speculative", exit_layer=2, draft_len=3, max_new_tokens=NEW)
    s = stats.summary()
    assert stats.generated == sum(map(len, out)) and stats.prefill_tokens == len(PROMPTS)
    # every round commits the accepted drafts plus one token of the full model, less what
    # max_new_tokens cuts off
    assert stats.accepted + stats.rounds - 3 * len(PROMPTS) <= stats.decoded <= stats.accepted + stats.rounds
    assert s["tokens_per_round"] == pytest.approx(stats.decoded / stats.rounds)
    assert s["acceptance"] == pytest.approx(stats.accepted / (stats.accepted + stats.rejections))
    assert stats.wall_s > 0 and s["tokens_per_s"] > 0
    assert set(stats.exit_layers) == {2} and max(stats.draft_lens) == 3
    assert s["position_layer_evals_per_token"] >= model.cfg.n_layers  # γ+1 positions per verify


def test_high_acceptance_saves_layer_evaluations():
    strong_exit = make_model(scale=0.01, embed_scale=20)
    L = strong_exit.cfg.n_layers
    out, stats = generate(strong_exit, PROMPTS, strategy="self_speculative", exit_layer=2, draft_len=4,
                          max_new_tokens=24)
    s = stats.summary()
    assert out == [reference_greedy(strong_exit, p, 24) for p in PROMPTS]
    assert s["acceptance"] > 0.8 and s["tokens_per_round"] > 2.5
    assert s["layer_evals_per_token"] < 0.6 * L   # vs L for autoregressive decoding


def test_bad_options(model):
    with pytest.raises(ValueError, match="exit_layer=6"):
        generate(model, PROMPTS, strategy="self_speculative", exit_layer=6)
    with pytest.raises(ValueError, match="unknown strategy"):
        generate(model, PROMPTS, strategy="beam")
    with pytest.raises(ValueError, match="positions"):
        generate(model, PROMPTS, max_new_tokens=500)
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[1], []])
    with pytest.raises(ValueError, match="draft_len"):
        generate(model, PROMPTS, strategy="self_speculative", draft_len=0)
