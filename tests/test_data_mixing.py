"""Mixing prepared datasets by weight: realised proportions, determinism, small sources by their own
epochs, exact and resharded resume, tokens per source, per-source eval; and the data-safety checks
on load (checksums, vocabulary)."""
import json
import shutil

import numpy as np
import pytest
import torch

from pretrain.config import ConfigError
from pretrain.data.dataset import DataError, PackedDataset
from pretrain.data.loader import TrainBatches
from pretrain.data.mixture import BLOCK, MixedDataset, MixtureSampler, block_counts
from pretrain.data.prepare import prepare_dataset
from pretrain.data.sources import open_split, source_list, validation_sets

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def write_corpus(root, n, seed):
    root.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        (root / f"d{i:03d}.txt").write_text(f"{seed} doc {i} " + " ".join(rng.choice(WORDS, 60)) + "\n")
    return root


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Three datasets with one tokenizer: a (large), b (medium), c (small, a few samples)."""
    root = tmp_path_factory.mktemp("mix")
    a = root / "a"
    prepare_dataset(a, inputs=[str(write_corpus(root / "ca", 30, 1))], vocab_size=300, seq_len=8, val_fraction=0.1,
                    samples_per_shard=100)
    for name, n, seed in (("b", 12, 2), ("c", 2, 3)):
        prepare_dataset(root / name, inputs=[str(write_corpus(root / f"c{name}", n, seed))], tokenizer_path=a,
                        seq_len=8, val_fraction=0.3)
    return root


class Cfg:
    def __init__(self, root, weights, names=(None, None, None)):
        class S:
            def __init__(self, d, w, n):
                self.dir, self.weight, self.name = d, w, n
        self.dir = "unused"
        self.sources = [S(str(root / d), w, n) for d, w, n in zip("abc", weights, names)]


def test_block_counts_are_the_weights():
    c = block_counts([0.7, 0.2, 0.1])
    assert c.sum() == BLOCK and np.all(np.abs(c / BLOCK - [0.7, 0.2, 0.1]) <= 1 / BLOCK)
    assert list(block_counts([1, 1, 1], block=10)) == [4, 3, 3]
    with pytest.raises(ValueError, match="below 1/"):
        block_counts([1.0, 1e-9])
    with pytest.raises(ValueError, match="finite and > 0"):
        block_counts([1.0, 0.0])


def test_realised_proportions_match_the_weights():
    weights = [0.7, 0.2, 0.1]
    sampler = MixtureSampler([1000, 300, 7], weights, global_batch_size=64, seed=3)
    offsets = np.array([0, 1000, 1300, 1307])
    ids = np.concatenate([sampler.sample_ids(s) for s in range(2 * BLOCK // 64)])  # two whole blocks
    source = np.searchsorted(offsets, ids, side="right") - 1
    counts = np.bincount(source, minlength=3)
    assert list(counts) == list(2 * block_counts(weights))
    assert np.all(np.abs(counts / len(ids) - weights) <= 1 / BLOCK)
    for prefix in (100, 1000, 5000, 2 * BLOCK):  # any prefix: within one block's count of w·prefix
        got = np.bincount(source[:prefix], minlength=3)
        assert list(got) == list(sampler.source_counts(prefix))
        assert np.all(np.abs(got - np.asarray(weights) * prefix) <= 4 * np.sqrt(prefix) + 2)


def test_small_source_is_revisited_by_its_own_epochs_and_order_is_pure():
    sampler = MixtureSampler([500, 6], [0.5, 0.5], global_batch_size=10, seed=0)
    ids = np.concatenate([sampler.sample_ids(s) for s in range(30)])
    small = ids[ids >= 500] - 500
    for epoch in range(len(small) // 6):
        assert sorted(small[epoch * 6:(epoch + 1) * 6]) == list(range(6))  # each epoch: every sample once
    big = ids[ids < 500]
    assert len(set(big.tolist())) == len(big)  # the large source is still in its first epoch
    again = MixtureSampler([500, 6], [0.5, 0.5], global_batch_size=10, seed=0)
    for step in (29, 3, 17, 0):  # any order, fresh object: the same ids
        assert np.array_equal(again.sample_ids(step), ids[step * 10:(step + 1) * 10])
    other = MixtureSampler([500, 6], [0.5, 0.5], global_batch_size=10, seed=1)
    assert not np.array_equal(other.sample_ids(0), ids[:10])


def test_mixed_dataset_reads_each_source_and_names_it(sources):
    mixed = open_split(Cfg(sources, [0.6, 0.3, 0.1], names=("web", None, None)), "train")
    assert isinstance(mixed, MixedDataset) and mixed.source_names == ["web", "b", "c"]
    parts = [PackedDataset(sources / d) for d in "abc"]
    assert len(mixed) == sum(len(p) for p in parts)
    ids = np.arange(len(mixed))
    assert np.array_equal(mixed.get_many(ids), np.concatenate([p.get_many(range(len(p))) for p in parts]))
    expected = np.repeat([0, 1, 2], [len(p) for p in parts])
    assert torch.equal(mixed.source_of(torch.as_tensor(ids)), torch.as_tensor(expected))
    assert list(validation_sets(Cfg(sources, [1, 1, 1]))) == ["a", "b", "c"]
    single = type("C", (), {"dir": str(sources / "a"), "sources": []})()
    assert source_list(single) == [("a", str(sources / "a"), 1.0)] and isinstance(open_split(single), PackedDataset)


def test_exact_and_resharded_resume_with_mixing(sources):
    data = open_split(Cfg(sources, [0.5, 0.3, 0.2]), "train")
    full = TrainBatches(data, global_batch_size=8, seed=5)
    run = [next(iter_) for iter_ in [iter(full)] for _ in range(12)]
    state = None
    resumed_parts = {}
    for dp_size in (1, 2, 4):
        ranks = []
        for rank in range(dp_size):
            b = TrainBatches(data, 8, 5, dp_rank=rank, dp_size=dp_size, prefetch=2 if rank else 0)
            state = {**full.state_dict(), "next_step": 7}
            b.load_state_dict(state)
            it = iter(b)
            ranks.append([next(it) for _ in range(5)])
        resumed_parts[dp_size] = ranks
        for k in range(5):
            step, batch = run[7 + k]
            assert all(r[k][0] == step for r in ranks)
            for key in ("tokens", "targets", "sample_ids"):
                assert torch.equal(torch.cat([r[k][1][key] for r in ranks]), batch[key])
    with pytest.raises(ValueError, match="sources="):
        TrainBatches(open_split(Cfg(sources, [0.4, 0.4, 0.2]), "train"), 8, 5).load_state_dict(state)


def test_tokens_seen_per_source(sources):
    data = open_split(Cfg(sources, [0.5, 0.3, 0.2]), "train")
    b = TrainBatches(data, 8, 0)
    ids = torch.cat([b.batch(s)["sample_ids"] for s in range(40)])
    counts = torch.bincount(data.source_of(ids), minlength=3) * data.seq_len
    assert b.tokens_seen(40) == dict(zip(["a", "b", "c"], counts.tolist()))
    single = TrainBatches(PackedDataset(sources / "a"), 8, 0)
    assert single.tokens_seen(3) == {"a": 3 * 8 * 8}


def test_sources_must_share_the_tokenizer(sources, tmp_path):
    prepare_dataset(tmp_path / "other", inputs=[str(sources / "cb")], vocab_size=290, seq_len=8)
    with pytest.raises(DataError, match=r"data sources .*a and .*other differ in tokenizer.json.*--tokenizer"):
        MixedDataset([PackedDataset(sources / "a"), PackedDataset(tmp_path / "other")])
    prepare_dataset(tmp_path / "longer", inputs=[str(sources / "cb")], tokenizer_path=sources / "a", seq_len=16)
    with pytest.raises(DataError, match="differ in seq_len: 8 vs 16"):
        MixedDataset([PackedDataset(sources / "a"), PackedDataset(tmp_path / "longer")])


def test_config_sources_parse_and_validate(sources):
    from hydra import compose, initialize_config_dir
    from pathlib import Path
    from pretrain.config import to_run_config
    conf = str(Path(__file__).resolve().parents[1] / "conf")

    def cfg(*overrides):
        with initialize_config_dir(config_dir=conf, version_base="1.3"):
            return to_run_config(compose(config_name="config", overrides=list(overrides)))

    c = cfg(f"data.sources=[{{dir: {sources / 'a'}, weight: 0.7}}, {{dir: {sources / 'b'}, weight: 0.3, name: code}}]")
    assert [(s.weight, s.name) for s in c.data.sources] == [(0.7, None), (0.3, "code")]
    assert [n for n, _, _ in source_list(c.data)] == ["a", "code"]
    with pytest.raises(ConfigError, match=r"data.sources\[1\].weight=0.0"):
        cfg("data.sources=[{dir: x, weight: 1}, {dir: y, weight: 0}]")
    with pytest.raises(ConfigError, match=r"data.sources\[0\].dir=''"):
        cfg("data.sources=[{weight: 1}]")
    with pytest.raises(ConfigError, match=r"data.sources\[1\].name='s'.*unique"):
        cfg("data.sources=[{dir: x, name: s}, {dir: y, name: s}]")


def test_per_source_evaluation_is_consistent(sources):
    from pretrain.config import EvalConfig
    from pretrain.evaluation.evaluate import evaluate
    from pretrain.model import LayerSkipTransformer, ModelConfig
    torch.manual_seed(0)
    model = LayerSkipTransformer(ModelConfig(vocab_size=300, dim=32, n_layers=2, n_heads=2, n_kv_heads=1,
                                             ffn_dim=64, max_seq_len=32))
    sets = validation_sets(Cfg(sources, [1, 1, 1]))
    cfg = EvalConfig(batches=2, batch_size=2, decode_prompts=0)
    result = evaluate(model, sets, torch.device("cpu"), cfg)
    assert sorted(result["sources"]) == ["a", "b", "c"]
    for name, ds in sets.items():
        alone = evaluate(model, ds, torch.device("cpu"), cfg)
        assert result["sources"][name][2]["loss"] == pytest.approx(alone["exits"][2]["loss"])
    tokens = {n: min(len(d), 4) * 8 for n, d in sets.items()}
    expected = sum(result["sources"][n][1]["loss"] * tokens[n] for n in sets) / sum(tokens.values())
    assert result["exits"][1]["loss"] == pytest.approx(expected)


def test_flipped_bytes_and_understated_vocabulary_are_named(sources, tmp_path):
    d = tmp_path / "copy"
    shutil.copytree(sources / "a", d)
    m = json.loads((d / "manifest.json").read_text())
    shard = d / m["splits"]["train"]["shards"][-1]["file"]
    raw = bytearray(shard.read_bytes())
    raw[512 + 128 + 3] ^= 0x01
    shard.write_bytes(bytes(raw))
    ds = PackedDataset(d)  # opening reads headers only
    ds[0]  # another shard: fine
    last = len(ds) - 1
    with pytest.raises(DataError, match=f"shard {shard} fails its sha256 check"):
        ds[last]
    with pytest.raises(DataError, match="fails its sha256 check"):
        TrainBatches(ds, len(ds), 0).batch(0)
    d2 = tmp_path / "vocab"
    shutil.copytree(sources / "a", d2)
    m["vocab_size"] = 40
    (d2 / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match=r"token id \d+ >= the vocab_size 40 of .*manifest.json: the manifest "
                                        "understates the vocabulary"):
        PackedDataset(d2).get_many(range(8))


def test_training_on_mixed_sources_logs_tokens_and_evaluates_per_source(sources, tmp_path):
    from pathlib import Path
    from hydra import compose, initialize_config_dir
    from pretrain.config import to_run_config
    from pretrain.trainer.loop import train
    conf = str(Path(__file__).resolve().parents[1] / "conf")
    mix = f"data.sources=[{{dir: {sources / 'a'}, weight: 0.6}}, {{dir: {sources / 'b'}, weight: 0.4, name: code}}]"
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        cfg = to_run_config(compose(config_name="config", overrides=[
            "model=tiny", "model.vocab_size=300", mix, f"run_dir={tmp_path / 'run'}", "train.seq_len=8",
            "train.steps=4", "train.global_batch_size=8", "train.micro_batch_size=8", "logging.every=1",
            "logging.progress_bar=false", "logging.wandb.mode=disabled", "eval.batches=1", "eval.batch_size=2",
            "eval.decode_prompts=0"]))
    train(cfg)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "train"]
    data = open_split(Cfg(sources, [0.6, 0.4]), "train")
    expected = TrainBatches(data, 8, cfg.train.seed).tokens_seen(4)
    assert steps[-1]["tokens_seen"] == {"a": expected["a"], "code": expected["b"]}
    assert sum(steps[-1]["tokens_seen"].values()) == 4 * 8 * 8
    evaluation = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert sorted(evaluation["sources"]) == ["a", "code"]
    assert len(evaluation["sources"]["code"]) == cfg.model.n_layers
