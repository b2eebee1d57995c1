"""Tokenizers through the `tokenizers` library: train a byte-level BPE, or use a given tokenizer:
a tokenizer.json file or a Hugging Face model/tokenizer directory holding one (its
tokenizer_config.json names the EOS and BOS tokens, as continual pretraining needs)."""
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


def tokenizer_file(path: str | Path) -> Path:
    """The tokenizer.json named by `path`: the file itself, or the one inside a directory (a
    Hugging Face model or tokenizer directory, or a prepared dataset)."""
    path = Path(path)
    if path.is_dir():
        inside = path / "tokenizer.json"
        if not inside.is_file():
            raise FileNotFoundError(f"tokenizer directory {path} has no tokenizer.json (a slow-only "
                                    "tokenizer must be converted and saved with save_pretrained first)")
        return inside
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {path} does not exist")
    return path


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = tokenizer_file(path)
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # the library raises a bare Exception on bad JSON
        raise ValueError(f"{path} is not a Hugging Face tokenizers tokenizer.json: {err}") from None


def vocab_size_of(tokenizer: Tokenizer) -> int:
    """Enough ids for every token (added tokens included), even if the ids have gaps."""
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    return max(tokenizer.get_vocab_size(with_added_tokens=True), max(vocab.values(), default=-1) + 1)


def tokenizer_config(tokenizer_path: str | Path | None) -> dict:
    """The tokenizer_config.json next to the tokenizer file (or in the directory), {} if none."""
    if tokenizer_path is None:
        return {}
    path = Path(tokenizer_path)
    config = path / "tokenizer_config.json" if path.is_dir() else path.with_name("tokenizer_config.json")
    try:
        content = json.loads(config.read_text())
    except (OSError, ValueError):
        return {}
    return content if isinstance(content, dict) else {}


def _configured_token(tokenizer_path: str | Path | None, key: str) -> str | None:
    """A token named in tokenizer_config.json (`eos_token`, `bos_token`), if any."""
    token = tokenizer_config(tokenizer_path).get(key)
    if isinstance(token, dict):  # the AddedToken form {"content": ...}
        token = token.get("content")
    return token if isinstance(token, str) else None


def bos_token_id(tokenizer: Tokenizer, source: str | Path | None) -> int | None:
    """The BOS id to put before every document: tokenizer_config.json's bos_token when it also
    says add_bos_token: true (Llama-style configs whose tokenizer.json post-processor may not add
    it); None otherwise (the post-processor, if any, decides)."""
    config = tokenizer_config(source)
    token = _configured_token(source, "bos_token")
    if not token or config.get("add_bos_token") is not True:
        return None
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise ValueError(f"{source}: tokenizer_config.json names bos_token {token!r}, which the tokenizer lacks")
    return token_id


def eos_token_id(tokenizer: Tokenizer, source: str | Path = "tokenizer", token: str | None = None) -> int:
    """The end-of-text id: `token` if given, else the eos_token of a tokenizer_config.json next
    to `source` (when `source` is the tokenizer's path), else the first of EOS_CANDIDATES present."""
    if token is not None:
        token_id = tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{source} has no token {token!r} (given as the end-of-text token)")
        return token_id
    configured = _configured_token(source, "eos_token") if Path(str(source)).exists() else None
    for candidate in ((configured,) if configured else ()) + EOS_CANDIDATES:
        token_id = tokenizer.token_to_id(candidate)
        if token_id is not None:
            return token_id
    raise ValueError(f"{source} has none of the end-of-text tokens {', '.join(EOS_CANDIDATES)}; "
                     "name the one it uses with --eos-token")


def post_processor_bos_id(tokenizer: Tokenizer) -> int | None:
    """The BOS a tokenizer's post-processor puts before every text (e.g. a TemplateProcessing
    "<s> $A", as transformers 5 writes Llama tokenizers without add_bos_token), found by encoding a
    probe with and without special tokens; None when it adds nothing in front."""
    for probe in ("a", "the", "x y"):
        plain = tokenizer.encode(probe, add_special_tokens=False).ids
        special = tokenizer.encode(probe, add_special_tokens=True).ids
        if plain:
            if len(special) > len(plain) and special[1:1 + len(plain)] == plain:
                return special[0]
            return None
    return None
