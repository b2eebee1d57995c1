"""What `python -m pretrain.eval` evaluates and on which data, decided before the model is loaded;
every problem is one line (EvalInputError, exit 2), never a traceback from the data reader.

- the checkpoint: a run directory (its newest checkpoint) or one checkpoint; its training step is
  named (trainer_state.json) in what is printed and in eval.json;
- the data: --data-dir, else the run's own data.dir / data.sources. A run made by
  `hf_interop import` has no data of its own (its config holds only the defaults): it needs
  --data-dir, data prepared with the model's tokenizer;
- the data's vocabulary must fit the model's.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from pretrain.checkpoint.inference import resolve_checkpoint
from pretrain.checkpoint.store import TRAINER_STATE
from pretrain.data.dataset import DataError, PackedDataset
from pretrain.data.sources import source_list, validation_sets


class EvalInputError(ValueError):
    """A checkpoint or data directory that cannot be evaluated; the message is one line."""


@dataclass
class EvalTarget:
    checkpoint: Path
    step: int | None              # optimizer steps done (None: not recorded)
    imported_from: str | None     # the Hugging Face directory of an imported run

    @property
    def run_dir(self) -> Path:
        return self.checkpoint.parent.parent

    def describe(self) -> str:
        if self.imported_from:
            return f"{self.checkpoint} (imported from {self.imported_from}, no training step)"
        return f"{self.checkpoint} (step {self.step})" if self.step is not None else str(self.checkpoint)


def eval_target(path: str) -> EvalTarget:
    try:
        ckpt = resolve_checkpoint(path)
    except FileNotFoundError as err:
        hint = ""
        if (Path(path) / "config.json").is_file():
            hint = (f"; it is a Hugging Face model directory: import it first (python -m pretrain.hf_interop import "
                    f"--hf {path} --out runs/NAME), then evaluate runs/NAME with --data-dir")
        raise EvalInputError(f"{err}{hint}") from None
    try:
        state = json.loads((ckpt / TRAINER_STATE).read_text())
    except (OSError, ValueError):
        state = {}
    step = state.get("step") if isinstance(state.get("step"), int) else None
    return EvalTarget(ckpt, step, state.get("source") if state.get("data", 0) is None else None)


def validation_data(target: EvalTarget, data_dir: str | None, model_vocab: int
                    ) -> PackedDataset | dict[str, PackedDataset]:
    """The validation split(s) to evaluate on, checked against the model's vocabulary."""
    if data_dir is None and target.imported_from:
        raise EvalInputError(f"{target.run_dir} was imported from {target.imported_from} and has no data of its own: "
                             f"pass --data-dir DIR, data prepared with its tokenizer (python -m pretrain.data.prepare "
                             f"--tokenizer {target.imported_from} --out DIR ...)")
    try:
        if data_dir is not None:
            val, where = PackedDataset(data_dir, "val"), f"--data-dir {data_dir}"
            vocab = val.vocab_size
        else:
            data = OmegaConf.load(target.checkpoint / "config.yaml").data
            where = "the run's data (" + ", ".join(d for _, d, _ in source_list(data)) + "; or pass --data-dir)"
            val = validation_sets(data)
            vocab = max(ds.vocab_size for ds in val.values())
    except (DataError, FileNotFoundError, OSError) as err:
        raise EvalInputError(f"{'--data-dir ' + data_dir if data_dir else 'the run' + chr(39) + 's data'}: "
                             f"{str(err).splitlines()[0]}" + ("" if data_dir else "; pass --data-dir DIR")) from None
    if vocab > model_vocab:
        raise EvalInputError(f"{where}: its tokenizer has {vocab} tokens but the model has {model_vocab}; use data "
                             f"prepared with the model's tokenizer")
    return val
