"""Everything a run checks before it does any work or writes anything: the values (pretrain.config),
the shape of the model it starts from, the parallel layout against the launched job, the prepared
data against the model. A failure raises ConfigError naming the key; the run directory is
untouched. Which checkpoint to resume from is chosen once the process group exists, by
pretrain.operations (the newest one that loads, under the run lock)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from pretrain.config import ConfigError, RunConfig, check_layout, validate
from pretrain.data.dataset import DataError, PackedDataset
from pretrain.data.mixture import MixedDataset
from pretrain.data.sources import open_split, source_list, validation_sets
from pretrain.device import select_device
from pretrain.hf_interop import HFConfigError
from pretrain.checkpoint.layout import list_checkpoints
from pretrain.model_loading import model_config_at
from pretrain.trainer.vocab import resolve_vocab_size
from parallel.dims import ParallelDims
from parallel.mesh import local_rank


@dataclass
class CheckedRun:
    cfg: RunConfig                  # with the model shape of checkpoint.init_from when set
    dims: ParallelDims
    train_data: PackedDataset | MixedDataset
    val_data: dict[str, PackedDataset]        # validation split per source name


def init_model_config(cfg: RunConfig) -> RunConfig:
    """cfg with model = the shape of checkpoint.init_from (continual pretraining), else cfg."""
    src = cfg.checkpoint.init_from
    if not src:
        return cfg
    try:
        shape = model_config_at(src)
    except (FileNotFoundError, HFConfigError) as err:
        raise ConfigError(f"checkpoint.init_from={src!r}: {err}") from None
    cfg = dataclasses.replace(cfg, model=shape)
    validate(cfg)
    return cfg


def open_data(cfg: RunConfig) -> tuple[PackedDataset | MixedDataset, dict[str, PackedDataset]]:
    """The training stream (one dataset, or data.sources mixed by weight) and each source's
    validation split by name, checked against the model and train.seq_len."""
    key = "data.sources" if cfg.data.sources else f"data.dir={cfg.data.dir!r}"
    try:
        train, val = open_split(cfg.data, "train"), validation_sets(cfg.data)
    except (DataError, FileNotFoundError, ValueError) as err:
        raise ConfigError(f"{key}: {err}") from None
    if train.seq_len != cfg.train.seq_len:
        raise ConfigError(f"train.seq_len={cfg.train.seq_len} but the data in {key} was packed with "
                          f"seq_len={train.seq_len}; re-run prepare or set train.seq_len")
    if train.vocab_size > cfg.model.vocab_size:
        if cfg.checkpoint.init_from:
            raise ConfigError(f"{key}: its tokenizer has {train.vocab_size} tokens but the initial model of "
                              f"checkpoint.init_from={cfg.checkpoint.init_from!r} has {cfg.model.vocab_size}; "
                              f"use data prepared with that model's tokenizer")
        raise ConfigError(f"{key}: its tokenizer has {train.vocab_size} tokens but model.vocab_size="
                          f"{cfg.model.vocab_size}; drop that override (model.vocab_size=auto, the default, "
                          f"takes the tokenizer's {train.vocab_size}) or set it to at least {train.vocab_size}")
    if len(train) == 0 or not any(len(v) for v in val.values()):
        raise ConfigError(f"{key}: the {'train' if len(train) == 0 else 'validation'} split is empty")
    return train, val


def tokenizer_vocabulary(path: Path) -> dict[str, int] | None:
    """token -> id of a tokenizer.json (None when there is none)."""
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path)).get_vocab(with_added_tokens=True)
    except Exception as err:  # the tokenizers library raises a bare Exception on a bad file
        raise ConfigError(f"{path}: not a readable tokenizer.json ({err})") from None


def differing_token_ids(ours: dict[str, int], theirs: dict[str, int]) -> int:
    """How many tokens two vocabularies map differently (or only `ours` has)."""
    return sum(1 for t, i in theirs.items() if ours.get(t) != i) + len(set(ours) - set(theirs))


def check_tokenizers(cfg: RunConfig) -> None:
    """The data's tokenizer is the one the run was trained with (when it resumes from checkpoints)
    and the one of the initial model (checkpoint.init_from, when it has a tokenizer.json): the same
    token ids, or the model would read other tokens than it learnt."""
    data_dir = Path(source_list(cfg.data)[0][1])
    data_vocab = tokenizer_vocabulary(data_dir / "tokenizer.json")
    if data_vocab is None:
        return
    others = []
    if cfg.checkpoint.resume != "none" and list_checkpoints(Path(cfg.run_dir)):
        others.append(("checkpoint.resume", "the run's", Path(cfg.run_dir) / "tokenizer.json"))
    if cfg.checkpoint.init_from:
        others.append(("checkpoint.init_from", "the initial model's", Path(cfg.checkpoint.init_from) / "tokenizer.json"))
    for key, whose, path in others:
        vocab = tokenizer_vocabulary(path)
        if vocab is not None and vocab != data_vocab:
            differ = differing_token_ids(vocab, data_vocab)
            raise ConfigError(f"{key}: the data's tokenizer ({data_dir / 'tokenizer.json'}) differs from {whose} "
                              f"({path}) in {differ} token ids; prepare the data with that tokenizer "
                              f"(pretrain.data.prepare --tokenizer {path.parent})")


def check_run(cfg: RunConfig, world_size: int) -> CheckedRun:
    cfg = resolve_vocab_size(init_model_config(cfg))
    dims = check_layout(cfg, world_size)
    try:
        dims.device = select_device(cfg.train.device, local_rank())
    except (ValueError, RuntimeError) as err:
        raise ConfigError(f"train.device={cfg.train.device!r}: {err}") from None
    train, val = open_data(cfg)
    check_tokenizers(cfg)
    return CheckedRun(cfg, dims, train, val)
