"""Data: prepare -> shards -> random access -> deterministic, resumable batches."""
import io
import json
import shutil

import numpy as np
import pytest
import webdataset as wds
from tokenizers import Tokenizer

from pretrain.data.dataset import DataError, PackedDataset
from pretrain.data.loader import GlobalBatchSampler, TrainBatches, rank_slice, validation_batches
from pretrain.data.prepare import main as prepare_main
from pretrain.data.prepare import prepare_dataset

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    for i in range(30):
        words = rng.choice(WORDS, size=200)
        (root / f"doc{i:02d}.txt").write_text(f"document {i}: " + " ".join(words) + "\n")
    with open(root / "extra.jsonl", "w") as f:
        for i in range(10):
            f.write(json.dumps({"text": f"json record {i} " + " ".join(rng.choice(WORDS, 50))}) + "\n")
    return root


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    prepare_dataset(out, inputs=[str(corpus)], vocab_size=300, seq_len=16, val_fraction=0.2,
                    samples_per_shard=50)
    return out


def test_manifest_and_shards(prepared):
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert manifest["seq_len"] == 16 and manifest["dtype"] == "uint16"
    train = manifest["splits"]["train"]
    assert len(train["shards"]) > 1 and sum(s["samples"] for s in train["shards"]) == train["samples"]
    assert train["tokens"] == train["samples"] * 17
    assert manifest["splits"]["val"]["documents"] >= 1
    assert train["documents"] + manifest["splits"]["val"]["documents"] == 40


def test_webdataset_reads_the_same_samples(prepared):
    ds = PackedDataset(prepared, "train")
    shard = sorted(prepared.glob("train-*.tar"))[1]
    first = json.loads((prepared / "manifest.json").read_text())["splits"]["train"]["shards"][1]["first_id"]
    for i, sample in enumerate(wds.WebDataset(str(shard), shardshuffle=False)):
        tokens = np.load(io.BytesIO(sample["tokens.npy"]))
        assert int(sample["__key__"]) == first + i
        assert np.array_equal(tokens.astype(np.int64), ds[first + i])


def test_packed_samples_decode_to_the_documents(corpus, tmp_path):
    """Consecutive samples are consecutive windows of doc0 EOS doc1 EOS ... (remainder dropped)."""
    files = sorted(corpus.glob("doc0*.txt"))[:3]
    prepare_dataset(tmp_path, inputs=[str(f) for f in files], vocab_size=300, seq_len=16, val_fraction=0.0)
    ds = PackedDataset(tmp_path, "train")
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    stream = np.concatenate([ds[i] for i in range(len(ds))]).tolist()
    expected = "<|endoftext|>".join(f.read_text() for f in files) + "<|endoftext|>"
    decoded = tok.decode(stream, skip_special_tokens=False)
    assert len(decoded) > len(expected) - 200 and expected.startswith(decoded)


def test_train_and_val_documents_are_disjoint(corpus, tmp_path):
    prepare_dataset(tmp_path, inputs=[str(corpus)], vocab_size=300, seq_len=8, val_fraction=0.3)
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    def doc_numbers(split):
        ds = PackedDataset(tmp_path, split)
        text = tok.decode(np.concatenate([ds[i] for i in range(len(ds))]).tolist(), skip_special_tokens=False)
        return {int(part.split(":")[0]) for part in text.split("document ")[1:] if part.split(":")[0].isdigit()}
    train, val = doc_numbers("train"), doc_numbers("val")
    assert val and train and not train & val


def test_given_tokenizer_is_used(prepared, corpus, tmp_path):
    prepare_dataset(tmp_path, inputs=[str(corpus / "extra.jsonl")], tokenizer_path=str(prepared / "tokenizer.json"),
                    seq_len=8, val_fraction=0.0)
    assert (tmp_path / "tokenizer.json").read_text() == (prepared / "tokenizer.json").read_text()
    ds = PackedDataset(tmp_path, "train")
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert tok.decode(np.concatenate([ds[0], ds[1]]).tolist()).startswith("json record 0")


def test_sampler_resumes_by_sample_id_and_covers_each_epoch(prepared):
    ds = PackedDataset(prepared, "train")
    uninterrupted = TrainBatches(ds, 8, seed=3)
    ids = [b["sample_ids"].tolist() for _, (_, b) in zip(range(12), uninterrupted)]
    resumed = TrainBatches(ds, 8, seed=3)
    resumed.load_state_dict({"next_step": 7, "seed": 3, "global_batch_size": 8})
    assert [(step, b["sample_ids"].tolist()) for _, (step, b) in zip(range(5), resumed)] == \
        list(zip(range(7, 12), ids[7:]))
    sampler = GlobalBatchSampler(len(ds), 8, seed=3)
    steps_per_epoch = -(-len(ds) // 8)
    stream = np.concatenate([sampler.sample_ids(s) for s in range(steps_per_epoch + 1)])
    assert sorted(stream[:len(ds)].tolist()) == list(range(len(ds)))
    assert not np.array_equal(stream[:8], GlobalBatchSampler(len(ds), 8, seed=4).sample_ids(0))


def test_data_parallel_slices_make_the_global_batch(prepared):
    ds = PackedDataset(prepared, "train")
    global_ids = GlobalBatchSampler(len(ds), 8, seed=0).sample_ids(5)
    for dp in (1, 2, 4):
        parts = [TrainBatches(ds, 8, 0, dp_rank=r, dp_size=dp).batch(5)["sample_ids"].numpy() for r in range(dp)]
        assert np.array_equal(np.concatenate(parts), global_ids)
    with pytest.raises(ValueError, match="not divisible"):
        rank_slice(global_ids, 0, 3)


def test_batch_tensors(prepared):
    ds = PackedDataset(prepared, "val")
    batch = next(validation_batches(ds, 2))
    assert batch["tokens"].shape == (2, 16) and batch["targets"].shape == (2, 16)
    assert np.array_equal(batch["targets"][0, :-1].numpy(), batch["tokens"][0, 1:].numpy())
    state = TrainBatches(ds, 2, 0).state_dict()
    with pytest.raises(ValueError, match="seed"):
        TrainBatches(ds, 2, 1).load_state_dict(state)


def test_errors_name_the_file(prepared, tmp_path):
    with pytest.raises(DataError, match="does not exist.*prepare"):
        PackedDataset(tmp_path / "nowhere")
    broken = tmp_path / "broken"
    shutil.copytree(prepared, broken)
    (broken / "train-000001.tar").unlink()
    with pytest.raises(DataError, match="train-000001.tar.*missing"):
        PackedDataset(broken)
    shutil.rmtree(broken)
    shutil.copytree(prepared, broken)
    shard = broken / "train-000000.tar"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(DataError, match="train-000000.tar.*truncated"):
        PackedDataset(broken)
    shard.write_bytes(b"\0" * (json.loads((broken / "manifest.json").read_text())["splits"]["train"]["shards"][0]["bytes"]))
    with pytest.raises(DataError, match="train-000000.tar"):
        PackedDataset(broken, verify=True)


def test_cli_default_stdlib_corpus(tmp_path, capsys):
    assert prepare_main(["--out", str(tmp_path), "--max-files", "5", "--vocab-size", "300", "--seq-len", "32"]) == 0
    assert "python standard library" in capsys.readouterr().out
    assert len(PackedDataset(tmp_path, "train")) > 0
    assert prepare_main(["--out", str(tmp_path / "x"), "--inputs", str(tmp_path / "missing.txt")]) == 2
