"""Tokenizers through the `tokenizers` library: train a byte-level BPE, or use a given tokenizer.json."""
from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

# Looked up in this order in a given tokenizer (unless its tokenizer_config.json names one).
EOS_CANDIDATES = ("</s>", "<|end_of_text|>", "<|endoftext|>", "<|eot_id|>")
TRAINED_EOS = "<|endoftext|>"


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE (every byte representable, exact decode) with TRAINED_EOS as its only
    special token, id 0."""
    if vocab_size < 257:
        raise ValueError(f"--vocab-size={vocab_size} is too small: a byte-level BPE needs 256 byte "
                         "tokens plus the end-of-text token")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[TRAINED_EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {path} does not exist")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # the library raises a bare Exception on bad JSON
        raise ValueError(f"{path} is not a Hugging Face tokenizers tokenizer.json: {err}") from None


def vocab_size_of(tokenizer: Tokenizer) -> int:
    """Enough ids for every token (added tokens included), even if the ids have gaps."""
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    return max(tokenizer.get_vocab_size(with_added_tokens=True), max(vocab.values(), default=-1) + 1)


def _configured_eos(tokenizer_path: str | Path | None) -> str | None:
    """The eos_token of a tokenizer_config.json next to the tokenizer file, if any."""
    if tokenizer_path is None:
        return None
    config = Path(tokenizer_path).with_name("tokenizer_config.json")
    try:
        eos = json.loads(config.read_text()).get("eos_token")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(eos, dict):  # the AddedToken form {"content": ...}
        eos = eos.get("content")
    return eos if isinstance(eos, str) else None


def eos_token_id(tokenizer: Tokenizer, source: str | Path = "tokenizer", token: str | None = None) -> int:
    """The end-of-text id: `token` if given, else the eos_token of a tokenizer_config.json next
    to `source` (when `source` is the tokenizer's path), else the first of EOS_CANDIDATES present."""
    if token is not None:
        token_id = tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{source} has no token {token!r} (given as the end-of-text token)")
        return token_id
    configured = _configured_eos(source) if Path(str(source)).is_file() else None
    for candidate in ((configured,) if configured else ()) + EOS_CANDIDATES:
        token_id = tokenizer.token_to_id(candidate)
        if token_id is not None:
            return token_id
    raise ValueError(f"{source} has none of the end-of-text tokens {', '.join(EOS_CANDIDATES)}; "
                     "name the one it uses with --eos-token")
