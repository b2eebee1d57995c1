"""The datasets a run reads, from its `data` config: one `data.dir`, or `data.sources` mixed by weight."""
from __future__ import annotations

from pathlib import Path

from pretrain.data.dataset import PackedDataset
from pretrain.data.mixture import MixedDataset, source_names


def source_list(data_cfg) -> list[tuple[str, str, float]]:
    """(name, dir, weight) of every source: data.sources when set, else data.dir."""
    sources = list(getattr(data_cfg, "sources", None) or [])
    if not sources:
        return [(Path(data_cfg.dir).name or str(data_cfg.dir), str(data_cfg.dir), 1.0)]
    names = source_names([s.dir for s in sources], [s.name for s in sources])
    return [(n, str(s.dir), float(s.weight)) for n, s in zip(names, sources)]


def open_split(data_cfg, split: str = "train"):
    """A PackedDataset for one source; a MixedDataset (same tokenizer checked) for several."""
    sources = source_list(data_cfg)
    if len(sources) == 1:
        return PackedDataset(sources[0][1], split)
    return MixedDataset([PackedDataset(d, split) for _, d, _ in sources], [w for _, _, w in sources],
                        [n for n, _, _ in sources])


def validation_sets(data_cfg) -> dict[str, PackedDataset]:
    """Each source's validation split by name (one entry for a single source)."""
    return {name: PackedDataset(d, "val") for name, d, _ in source_list(data_cfg)}
