"""Stop strings: every strategy ends a row with the token that completes the first stop string in
its new text (a stop string in the prompt stops nothing), strings that span tokens included; the
reference is each row's full greedy text cut where the string first appears, found independently."""
import pytest
from builders import PROMPTS, make_model, reference_greedy

from pretrain.decoding import StopStrings, generate
from schedules.speedup import DecodeCosts

pytestmark = pytest.mark.usefixtures("one_thread")

NEW = 24
LETTERS = "abcde"


def two_letters(ids: list[int]) -> str:
    """A toy tokenizer: token t is two letters, so a string of two letters can span two tokens."""
    return "".join(LETTERS[t % 5] + LETTERS[t // 5 % 5] for t in ids)


def encode(text: str) -> list[int]:
    return [LETTERS.index(text[i]) + 5 * LETTERS.index(text[i + 1]) for i in range(0, len(text) - 1, 2)]


def cut_at_first(tokens: list[int], strings: tuple[str, ...]) -> list[int]:
    for k in range(1, len(tokens) + 1):
        if any(s in two_letters(tokens[:k]) for s in strings):
            return tokens[:k]
    return tokens


@pytest.fixture(scope="module")
def model():
    return make_model(scale=0.01, embed_scale=20)    # an exit that agrees: drafts commit past the string


@pytest.mark.parametrize("strategy", ["autoregressive", "self_speculative", "auto", "early_exit"])
def test_rows_end_with_the_token_completing_a_stop_string(model, strategy):
    exit_layer = 2
    full = [reference_greedy(model, p, NEW, exit_layer=exit_layer if strategy == "early_exit" else None)
            for p in PROMPTS]
    # a string spanning two tokens (odd offset) of row 1's text, a few tokens in
    text = two_letters(full[1])
    strings = (text[7:10],)
    expected = [cut_at_first(row, strings) for row in full]
    assert len(expected[1]) < NEW                               # the case is not vacuous: row 1 stops early
    stop = StopStrings.of(strings, encode, two_letters)
    kwargs = {"costs": DecodeCosts.layer_count(9)} if strategy == "auto" else {"draft_len": 4}
    out, stats = generate(model, PROMPTS, strategy=strategy, exit_layer=exit_layer, max_new_tokens=NEW, stop=stop,
                          **kwargs)
    assert out == expected
    assert stats.generated == sum(map(len, expected))
    if strategy == "self_speculative":
        assert stats.accepted > 0


def test_a_stop_string_in_the_prompt_stops_nothing(model):
    """The prompt's last two tokens' text, absent from the new text: a check that saw the prompt
    would stop at the first new token."""
    cases = [(p, reference_greedy(model, p, 8)) for p in ([7, 8, 9], [20, 21, 22], [30, 3, 17], [44, 45, 46])]
    prompt, full = next((p, f) for p, f in cases if two_letters(p)[-4:] not in two_letters(f))
    out, _ = generate(model, [prompt], strategy="autoregressive", max_new_tokens=8,
                      stop=StopStrings.of((two_letters(prompt)[-4:],), encode, two_letters))
    assert out == [full]


def test_bad_stop_strings_are_refused(model):
    with pytest.raises(ValueError, match="non-empty strings"):
        StopStrings.of([], encode, two_letters)
    with pytest.raises(ValueError, match="non-empty strings"):
        StopStrings.of(["ab", ""], encode, two_letters)
    with pytest.raises(TypeError, match="stop must be a StopStrings"):
        generate(model, PROMPTS, strategy="autoregressive", stop="\n\n")


@pytest.mark.parametrize("strategy", ["autoregressive", "self_speculative"])
def test_sampled_rows_end_where_their_text_first_holds_a_stop_string(model, strategy):
    """Sampling: each row's text holds a stop string only with its last token (or never, running to
    max_new_tokens)."""
    strings = ("ab", "ca")
    out, _ = generate(model, PROMPTS * 4, strategy=strategy, exit_layer=2, draft_len=3, max_new_tokens=NEW,
                      temperature=1.0, seed=5, stop=StopStrings.of(strings, encode, two_letters))
    stopped = 0
    for row in out:
        holds = [any(s in two_letters(row[:k]) for s in strings) for k in range(1, len(row) + 1)]
        assert not any(holds[:-1])
        assert holds[-1] or len(row) == NEW
        stopped += holds[-1]
    assert stopped >= 4
