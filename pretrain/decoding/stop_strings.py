"""Stop strings: a row ends with the token that completes the first of `strings` in its new text,
as it ends with EOS, whatever the strategy (a round that committed tokens past it is cut back).

Checked on the host, in each round's one synchronisation (Sequences.settle), on the text of a row's
last new tokens: `window` of them plus what one round can commit, so that a string that spans a
round's tokens and earlier ones is seen. `window` is a string's length in tokens plus 2, as
lm-evaluation-harness sizes its own check (a string's tokens in context can differ from its tokens
alone). Only new tokens are decoded: a stop string in the prompt stops nothing.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class StopStrings:
    strings: tuple[str, ...]
    decode: Callable[[list[int]], str]    # token ids -> text
    window: int                           # new tokens a check decodes, beyond one round's

    def __post_init__(self):
        _check(self.strings)
        if self.window < 1:
            raise ValueError(f"stop strings: window={self.window} must be >= 1")

    @classmethod
    def of(cls, strings: Sequence[str], encode: Callable[[str], list[int]],
           decode: Callable[[list[int]], str]) -> "StopStrings":
        """Stop strings of a tokenizer (encode without special tokens; decode)."""
        strings = tuple(strings)
        _check(strings)
        return cls(strings, decode, max(len(encode(s)) for s in strings) + 2)

    def tokens_to_keep(self, tail: list[int]) -> int | None:
        """None if the text of `tail` holds no stop string; else the shortest prefix of `tail`
        whose text holds one (the row ends with that prefix's last token)."""
        if not any(s in self.decode(tail) for s in self.strings):
            return None
        return next(k for k in range(1, len(tail) + 1) if any(s in self.decode(tail[:k]) for s in self.strings))


def _check(strings: tuple) -> None:
    if not strings or any(not isinstance(s, str) or not s for s in strings):
        raise ValueError(f"stop strings must be non-empty strings, got {list(strings)!r}")
