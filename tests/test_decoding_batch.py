"""Batched decoding: per-row draft lengths and progress, finished rows leaving the batch, the block
work counted as done, one host synchronisation per round, and the input checks (token ids, tiny
temperatures, the context length)."""
import pytest
import torch
from builders import NEW, PROMPTS, make_model, reference_greedy

from pretrain.decoding import ExitQueryCache, SamplingConfig, StaticKVCache, generate
from pretrain.decoding.compiled import CompiledRegionKVCache
from pretrain.decoding.runner import BlockRunner
from pretrain.decoding.self_speculative import speculative_round
from pretrain.decoding.sequences import Sequences
from pretrain.decoding.stats import DecodeStats
from pretrain.decoding.stepwise import prefill

pytestmark = pytest.mark.usefixtures("one_thread")


@torch.no_grad()
def test_each_row_drafts_its_own_length_and_advances_on_its_own(model):
    """Rows with γ_b = 0, 3, 1, 2 in the same rounds: each row commits at most γ_b + 1 tokens a round
    (a row with γ_b = 0 one, from the full model), and the text is the full model's greedy text."""
    L = model.cfg.n_layers
    seqs = Sequences(PROMPTS, max_new_tokens=20, eos_id=None, spare=4, device="cpu")
    runner = BlockRunner(model, StaticKVCache.for_model(model, seqs.batch, seqs.capacity), DecodeStats())
    queries = ExitQueryCache(seqs.batch, 4, model.cfg.dim, dtype=torch.float32, device="cpu")
    prefill(runner, seqs, L, SamplingConfig(), None)
    gammas = torch.tensor([0, 3, 1, 2])
    took = []
    for _ in range(5):
        before = seqs.length.clone()
        speculative_round(runner, seqs, queries, 2, 3, SamplingConfig(), None, row_draft_lens=gammas)
        took.append(seqs.length - before)
    took = torch.stack(took)
    assert (took >= 1).all() and (took <= gammas + 1).all()
    assert (took[:, 0] == 1).all() and took[:, 1].max() > 1   # the γ=0 row steps, the γ=3 row speculates
    assert runner.stats.drafted == 5 * int(gammas.sum())
    out = seqs.outputs()
    assert out == [reference_greedy(model, p, len(o)) for p, o in zip(PROMPTS, out)]


def _forward_rows(model, monkeypatch):
    """Record (rows, blocks) of every forward of the blocks after the prefill."""
    calls = []
    run_layers = type(model).run_layers

    def recorded(self, h, *, start=0, stop=None, **kwargs):
        if kwargs.get("cache") is not None:   # the decoder's, not the reference's
            calls.append((h.shape[0], h.shape[1], (stop or self.cfg.n_layers) - start))
        return run_layers(self, h, start=start, stop=stop, **kwargs)

    monkeypatch.setattr(type(model), "run_layers", recorded)
    return calls


@pytest.mark.parametrize("strategy", ["self_speculative", "autoregressive"])
def test_finished_rows_leave_the_batch_and_the_stats_count_the_work_done(model, expected, monkeypatch, strategy):
    eos = expected[1][4]        # row 1 stops at its 5th token, the others run to NEW
    calls = _forward_rows(model, monkeypatch)
    out, stats = generate(model, PROMPTS, strategy=strategy, exit_layer=2, draft_len=3, max_new_tokens=NEW,
                          eos_id=eos)
    assert out == [reference_greedy(model, p, NEW, eos=eos) for p in PROMPTS]
    decode = calls[1:]          # after the prefill
    rows = [r for r, _, _ in decode]
    assert rows[0] == len(PROMPTS) and min(rows) < len(PROMPTS)     # the batch shrank
    assert rows == sorted(rows, reverse=True)                        # and never grew back
    assert stats.layer_evals == sum(r * n for r, _, n in decode)
    assert stats.position_layer_evals == sum(r * t * n for r, t, n in decode)
    late = [r for r, _, n in decode if n == model.cfg.n_layers - 2]   # verify forwards: blocks [E, L)
    assert stats.rounds == (sum(rows) if strategy == "autoregressive" else sum(late))


def test_rows_of_different_lengths_end_and_leave_without_changing_the_text(model, expected):
    """max_new_tokens reached by rows at different rounds (ragged acceptance), one row finishing at
    its first token: every row's text is its own."""
    eos = expected[2][0]
    out, stats = generate(model, PROMPTS, strategy="self_speculative", exit_layer=3, draft_len=4, max_new_tokens=NEW,
                          eos_id=eos)
    assert out == [reference_greedy(model, p, NEW, eos=eos) for p in PROMPTS]
    assert out[2] == [eos]


def _count_syncs(monkeypatch):
    """Count the host reads of device values: tolist, item, bool, int, float of a tensor."""
    count = [0]
    for name in ("tolist", "item", "__bool__", "__int__", "__float__", "__index__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            count[0] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return count


@pytest.mark.parametrize("strategy", ["self_speculative", "autoregressive"])
def test_one_host_synchronisation_per_round(model, monkeypatch, strategy):
    for new in (NEW, 2 * NEW):
        count = _count_syncs(monkeypatch)
        out, stats = generate(model, PROMPTS, strategy=strategy, exit_layer=2, draft_len=3, max_new_tokens=new)
        rounds = len(stats.draft_lens) if strategy == "self_speculative" else stats.rounds // len(PROMPTS)
        monkeypatch.undo()
        if new == NEW:
            fixed = count[0] - rounds   # the prefill's, the outputs' reads
        else:
            assert count[0] - rounds == fixed   # the rest grows by exactly one read per round
        assert rounds > 3


def test_token_ids_outside_the_vocabulary_are_named(model):
    V = model.cfg.vocab_size
    with pytest.raises(ValueError, match=f"prompt 1 holds token id {V}, outside the model's vocabulary 0..{V - 1}"):
        generate(model, [[1, 2], [3, V]])
    with pytest.raises(ValueError, match="token id -1"):
        generate(model, [[-1]], strategy="autoregressive")
    with pytest.raises(ValueError, match=f"eos_id={V + 5}"):
        generate(model, [[1]], eos_id=V + 5)


def test_a_tiny_temperature_samples_the_argmax(model, expected):
    for strategy in ("self_speculative", "autoregressive"):
        out, _ = generate(model, PROMPTS, strategy=strategy, exit_layer=2, draft_len=3, max_new_tokens=NEW,
                          temperature=1e-45, top_p=0.9)
        assert out == expected
    with pytest.raises(ValueError, match="temperature=nan"):
        generate(model, PROMPTS, temperature=float("nan"))


@pytest.mark.parametrize("strategy", ["self_speculative", "autoregressive", "early_exit"])
def test_context_length_admits_exactly_the_positions_decoding_runs(strategy):
    """A prompt of P tokens and N new ones run positions 0..P+N-2: P + N - 1 = max_seq_len fits (the
    last token is never fed back; drafts past it are never committed), one more does not."""
    model = make_model()
    limit = model.cfg.max_seq_len
    prompt = list(range(1, 41)) * 3                     # 120 tokens
    n = limit - len(prompt) + 1
    kwargs = dict(strategy=strategy, exit_layer=2, draft_len=4)
    out, _ = generate(model, [prompt, prompt[:7]], max_new_tokens=n, **kwargs)
    exit_layer = 2 if strategy == "early_exit" else None
    assert out == [reference_greedy(model, p, n, exit_layer=exit_layer) for p in (prompt, prompt[:7])]
    with pytest.raises(ValueError) as err:
        generate(model, [prompt], max_new_tokens=n + 1, **kwargs)
    assert str(err.value) == (f"the longest prompt (120 tokens) + max_new_tokens={n + 1} needs {limit + 1} "
                              f"positions, the model allows {limit} (model.max_seq_len)")


def test_compiled_cache_tensors_are_static_addresses_also_after_rows_leave():
    cache = CompiledRegionKVCache([0, 1], 3, 8, 1, 4, dtype=torch.float32, device="cpu")
    cache.update(0, torch.randn(3, 1, 2, 4), torch.randn(3, 1, 2, 4))
    kept = cache.k[0][2].clone()
    pointer = cache.k[0].data_ptr()
    cache.select_rows(torch.tensor([2, 0]))
    assert cache.k[0].data_ptr() == pointer and cache.batch == 2
    torch.testing.assert_close(cache.k[0][0], kept)
    for tensors in (cache.k, cache.v, cache.lengths):
        for t in tensors.values():
            assert getattr(t, "_dynamo_static_input_type", None) is not None
