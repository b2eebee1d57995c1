"""custom_dataset of the tasks in this folder: `dataset_path: json` with `dataset_kwargs.data_files`
relative to this folder (the harness would resolve them against the working directory), so the
tasks run from anywhere and offline."""
from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def load(data_files: dict, **_metadata) -> datasets.DatasetDict:
    return datasets.load_dataset("json", data_files={split: str(HERE / name) for split, name in data_files.items()})
