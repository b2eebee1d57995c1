"""`model.vocab_size=auto` (the default of every model in conf/model/): a model trained from scratch
takes its vocabulary from the data's tokenizer, so the model, `prepare --vocab-size` and the
tokenizer can never disagree.

    auto -> the manifest's vocab_size (sources share one tokenizer), rounded up to a multiple of
            parallel.tp (tensor parallelism shards the vocabulary; the extra rows are never indexed)

An explicit number is kept: one below the tokenizer's size is refused by pretrain.trainer.preflight
(naming both numbers and this override), one above it pads the vocabulary. A run that starts from
checkpoint.init_from has that model's vocabulary."""
from __future__ import annotations

import dataclasses

from pretrain.config import RunConfig
from pretrain.data.dataset import DataError, read_manifest
from pretrain.data.sources import source_list
from pretrain.model.config import VOCAB_AUTO


def data_vocab_size(data_cfg) -> int | None:
    """The tokenizer's vocabulary of the run's data (the largest over its sources); None when a
    manifest cannot be read (opening the data reports that, naming the key)."""
    try:
        return max(int(read_manifest(d)["vocab_size"]) for _, d, _ in source_list(data_cfg))
    except (DataError, OSError, ValueError, KeyError):
        return None


def padded_vocab(tokens: int, multiple: int) -> int:
    return -(-tokens // multiple) * multiple


def resolve_vocab_size(cfg: RunConfig) -> RunConfig:
    """cfg with model.vocab_size=auto replaced by the data's vocabulary (padded to parallel.tp)."""
    if cfg.model.vocab_size != VOCAB_AUTO:
        return cfg
    tokens = data_vocab_size(cfg.data)
    if tokens is None:
        return cfg
    model = dataclasses.replace(cfg.model, vocab_size=padded_vocab(tokens, max(1, cfg.parallel.tp)))
    return dataclasses.replace(cfg, model=model)
