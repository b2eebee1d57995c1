"""Data: prepare -> shards -> random access -> deterministic, resumable batches."""
import io
import itertools
import json
import pickle
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
import webdataset as wds
from tokenizers import Tokenizer, models, pre_tokenizers

from pretrain.data.corpus import stdlib_files
from pretrain.data.dataset import DataError, PackedDataset
from pretrain.data.loader import GlobalBatchSampler, TrainBatches, make_batch, rank_slice, validation_batches
from pretrain.data.prepare import main as prepare_main
from pretrain.data.prepare import prepare_dataset, split_documents
from pretrain.data.shards import file_sha256, token_dtype

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
EOT = "<|endoftext|>"


def doc_text(i, rng):
    return f"document {i}: " + " ".join(rng.choice(WORDS, size=200)) + "\n"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """30 text files and a JSONL file of 10 records."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    for i in range(30):
        (root / f"doc{i:02d}.txt").write_text(doc_text(i, rng))
    with open(root / "extra.jsonl", "w") as f:
        for i in range(10):
            f.write(json.dumps({"text": f"json record {i}: " + " ".join(rng.choice(WORDS, 50)) + "."}) + "\n")
    return root


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    prepare_dataset(out, inputs=[str(corpus)], vocab_size=300, seq_len=16, val_fraction=0.2,
                    samples_per_shard=50)
    return out


def read_manifest(path):
    return json.loads((path / "manifest.json").read_text())


def split_on_eos(tokens, eos_id):
    docs, current = [], []
    for t in tokens:
        if t == eos_id:
            docs.append(current)
            current = []
        else:
            current.append(t)
    return docs, current


# ----------------------------------------------------------------------------------- prepare


def test_manifest_describes_the_shards(prepared, corpus):
    m = read_manifest(prepared)
    tok = Tokenizer.from_file(str(prepared / m["tokenizer"]))
    assert m["format"] == 1 and m["seq_len"] == 16 and m["dtype"] == "uint16"
    assert m["vocab_size"] == tok.get_vocab_size() == 300
    assert m["eos_id"] == tok.token_to_id(EOT) and m["eos_token"] == EOT
    assert str(corpus) in m["source"]
    assert m["splits"]["train"]["documents"] + m["splits"]["val"]["documents"] == 40
    assert m["splits"]["val"]["documents"] >= 1
    for split in ("train", "val"):
        s = m["splits"][split]
        assert [sh["file"] for sh in s["shards"]] == [f"{split}-{i:06d}.tar" for i in range(len(s["shards"]))]
        assert sorted(p.name for p in prepared.glob(f"{split}-*.tar")) == [sh["file"] for sh in s["shards"]]
        assert sum(sh["samples"] for sh in s["shards"]) == s["samples"] > 0
        assert all(sh["samples"] == 50 for sh in s["shards"][:-1])
        assert s["tokens"] == s["samples"] * 17
        for sh in s["shards"]:
            assert sh["sha256"] == file_sha256(prepared / sh["file"])
            assert sh["bytes"] == (prepared / sh["file"]).stat().st_size
    assert len(m["splits"]["train"]["shards"]) > 1
    assert not list(prepared.glob("*.tmp"))
    ds = PackedDataset(prepared, "train", verify=True)
    assert (len(ds), ds.seq_len, ds.vocab_size, ds.eos_id) == \
        (m["splits"]["train"]["samples"], 16, 300, m["eos_id"])
    assert ds[0].dtype == np.int64 and ds[0].shape == (17,) and np.array_equal(ds[-1], ds[len(ds) - 1])
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_token_dtype():
    assert token_dtype(65535) == np.uint16 and token_dtype(65536) == np.uint32


def test_webdataset_reads_the_same_samples(prepared):
    ds = PackedDataset(prepared, "train")
    first = read_manifest(prepared)["splits"]["train"]["shards"][1]["first_id"]
    shard = str(prepared / "train-000001.tar")
    raw = list(wds.WebDataset(shard, shardshuffle=False))
    assert len(raw) == 50
    for i, sample in enumerate(raw):
        assert sample["__key__"] == f"{first + i:012d}"
        assert np.array_equal(np.load(io.BytesIO(sample["tokens.npy"])).astype(np.int64), ds[first + i])
    decoded = next(iter(wds.WebDataset(shard, shardshuffle=False).decode()))
    assert decoded["tokens.npy"].dtype == np.uint16 and np.array_equal(decoded["tokens.npy"], ds[first])


def test_packed_stream_decodes_to_the_documents(corpus, tmp_path):
    """The samples are consecutive windows of doc0 EOS doc1 EOS ...; every complete document
    decodes to its exact text; only a last partial window is dropped."""
    files = sorted(corpus.glob("doc0*.txt"))[:3]
    m = prepare_dataset(tmp_path, inputs=[str(f) for f in files], vocab_size=300, seq_len=16, val_fraction=0.0)
    ds = PackedDataset(tmp_path, "train")
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    stream = np.concatenate([ds[i] for i in range(len(ds))]).tolist()
    docs, tail = split_on_eos(stream, ds.eos_id)
    assert [tok.decode(d) for d in docs] == [f.read_text() for f in files[:len(docs)]]
    assert len(docs) >= 2 and m["splits"]["train"]["dropped_tokens"] < 17
    assert len(stream) + m["splits"]["train"]["dropped_tokens"] == m["splits"]["train"]["encoded_tokens"]
    if len(docs) < len(files):
        assert files[len(docs)].read_text().startswith(tok.decode(tail))
    assert m["splits"]["val"]["samples"] == 0 and m["splits"]["val"]["shards"] == []
    assert len(PackedDataset(tmp_path, "val")) == 0


def test_train_and_val_documents_are_disjoint_and_the_split_is_stable(corpus, prepared, tmp_path):
    tok = Tokenizer.from_file(str(prepared / "tokenizer.json"))

    def doc_numbers(split):
        ds = PackedDataset(prepared, split)
        text = tok.decode(np.concatenate([ds[i] for i in range(len(ds))]).tolist(), skip_special_tokens=False)
        return {part.split(":")[0] for part in text.split(EOT) if part.startswith(("document ", "json record "))}

    train, val = doc_numbers("train"), doc_numbers("val")
    assert val and train and not train & val
    # The split hashes names relative to the input, so a copy elsewhere gives identical shards.
    copy = tmp_path / "elsewhere" / corpus.name
    shutil.copytree(corpus, copy)
    again = prepare_dataset(tmp_path / "again", inputs=[str(copy)], vocab_size=300, seq_len=16,
                            val_fraction=0.2, samples_per_shard=50)
    original = read_manifest(prepared)
    for split in ("train", "val"):
        assert [s["sha256"] for s in again["splits"][split]["shards"]] == \
            [s["sha256"] for s in original["splits"][split]["shards"]]


def test_at_least_one_validation_document():
    from pretrain.data.corpus import Document
    docs = [Document(f"d{i}", "x") for i in range(3)]
    train, val = split_documents(docs, 1e-9)
    assert len(val) == 1 and len(train) == 2
    assert split_documents(docs[:1], 0.5)[1] in ([], docs[:1]) and split_documents(docs, 0.0)[1] == []


def test_given_tokenizer_is_used(prepared, corpus, tmp_path):
    m = prepare_dataset(tmp_path, inputs=[str(corpus / "extra.jsonl")],
                        tokenizer_path=str(prepared / "tokenizer.json"), seq_len=8, val_fraction=0.0)
    assert (tmp_path / "tokenizer.json").read_bytes() == (prepared / "tokenizer.json").read_bytes()
    assert m["vocab_size"] == 300 and m["eos_id"] == read_manifest(prepared)["eos_id"]
    ds = PackedDataset(tmp_path, "train")
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    docs, _ = split_on_eos(np.concatenate([ds[i] for i in range(len(ds))]).tolist(), ds.eos_id)
    records = [json.loads(line)["text"] for line in (corpus / "extra.jsonl").read_text().splitlines()]
    assert len(docs) >= 5 and [tok.decode(d) for d in docs] == records[:len(docs)]


def test_eos_of_a_given_tokenizer(tmp_path, corpus):
    def save(vocab, name):
        tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.save(str(tmp_path / name))
        return tmp_path / name

    text = [str(corpus / "doc00.txt")]
    plain = save({"[UNK]": 0, "document": 1}, "plain.json")
    with pytest.raises(ValueError, match="plain.json has none of the end-of-text tokens.*--eos-token"):
        prepare_dataset(tmp_path / "a", inputs=text, tokenizer_path=plain, seq_len=4, val_fraction=0.0)
    m = prepare_dataset(tmp_path / "a", inputs=text, tokenizer_path=plain, eos_token="document", seq_len=4,
                        val_fraction=0.0)
    assert m["eos_id"] == 1
    both = save({"[UNK]": 0, EOT: 1, "</s>": 2}, "tokenizer.json")
    assert prepare_dataset(tmp_path / "b", inputs=text, tokenizer_path=both, seq_len=4,
                           val_fraction=0.0)["eos_id"] == 2
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": EOT}}))
    assert prepare_dataset(tmp_path / "c", inputs=text, tokenizer_path=both, seq_len=4,
                           val_fraction=0.0)["eos_id"] == 1


def test_directory_glob_skips_other_and_binary_files(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.md").write_text("markdown one " * 30)
    (src / "sub" / "b.md").write_text("markdown two " * 30)
    (src / "c.txt").write_text("plain text " * 30)
    (src / "d.md").write_bytes(b"\0\1\2binary" * 10)
    m = prepare_dataset(tmp_path / "out", inputs=[str(src)], pattern="*.md", vocab_size=280, seq_len=8,
                        val_fraction=0.0)
    assert m["splits"]["train"]["documents"] == 2
    ds = PackedDataset(tmp_path / "out")
    text = Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json")).decode(
        np.concatenate([ds[i] for i in range(len(ds))]).tolist())
    assert "markdown one" in text and "markdown two" in text and "plain" not in text


# ------------------------------------------------------------------------------- batches


def test_sampler_epochs_cover_every_sample_once():
    n, b = 23, 7  # batches straddle epochs
    sampler = GlobalBatchSampler(n, b, seed=5)
    stream = np.concatenate([sampler.sample_ids(s) for s in range(4 * n // b + 1)])
    for epoch in range(4):
        chunk = stream[epoch * n:(epoch + 1) * n]
        assert sorted(chunk.tolist()) == list(range(n))
        assert np.array_equal(chunk, np.random.default_rng([5, epoch]).permutation(n))
    assert not np.array_equal(stream[:n], stream[n:2 * n])
    assert not np.array_equal(sampler.sample_ids(0), GlobalBatchSampler(n, b, seed=6).sample_ids(0))
    assert np.array_equal(GlobalBatchSampler(n, b, seed=5).sample_ids(9), sampler.sample_ids(9))  # pure


def take(batches, n):
    return [(step, b["sample_ids"].tolist()) for step, b in itertools.islice(batches, n)]


def test_resumption_by_sample_id(prepared):
    ds = PackedDataset(prepared, "train")
    uninterrupted = TrainBatches(ds, 8, seed=3)
    seen = take(uninterrupted, 12)
    assert [s for s, _ in seen] == list(range(12))
    sampler = GlobalBatchSampler(len(ds), 8, seed=3)
    assert [sampler.sample_ids(k).tolist() for k in range(7, 12)] == [ids for _, ids in seen[7:]]
    # state_dict after 7 steps -> a fresh loader continues identically
    first = TrainBatches(ds, 8, seed=3)
    it = iter(first)
    for _ in range(7):
        next(it)
    state = json.loads(json.dumps(first.state_dict()))
    assert state["next_step"] == 7
    for resumed in (TrainBatches(ds, 8, seed=3), TrainBatches(ds, 8, seed=3, prefetch=2)):
        resumed.load_state_dict(state)
        assert take(resumed, 5) == seen[7:]
        assert resumed.state_dict()["next_step"] == 12
    assert take(TrainBatches(ds, 8, seed=3, start_step=7), 5) == seen[7:]


def test_loader_state_rejects_another_seed_or_batch(prepared):
    ds = PackedDataset(prepared, "train")
    state = TrainBatches(ds, 8, seed=0).state_dict()
    with pytest.raises(ValueError, match="seed=0 but this run has seed=1"):
        TrainBatches(ds, 8, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="global_batch_size"):
        TrainBatches(ds, 4, seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match="num_samples"):
        TrainBatches(ds, 8, seed=0).load_state_dict({**state, "num_samples": len(ds) + 1})


def test_prefetch_gives_the_same_batches_and_follows_the_state(prepared):
    ds = PackedDataset(prepared, "train")
    plain, ahead = iter(TrainBatches(ds, 8, seed=1)), TrainBatches(ds, 8, seed=1, prefetch=3)
    it = iter(ahead)
    for _ in range(6):
        (s1, b1), (s2, b2) = next(plain), next(it)
        assert s1 == s2 and all(np.array_equal(b1[k], b2[k]) for k in b1)
    ahead.load_state_dict({"next_step": 2})
    step, batch = next(it)
    assert step == 2 and np.array_equal(batch["sample_ids"], GlobalBatchSampler(len(ds), 8, 1).sample_ids(2))
    it.close()

    class Broken:
        def __len__(self):
            return 10

        def get_many(self, ids):
            raise DataError("shard broken.tar is cut short")

    with pytest.raises(DataError, match="broken.tar"):
        next(iter(TrainBatches(Broken(), 2, 0, prefetch=2)))


def test_data_parallel_slices_make_the_global_batch(prepared):
    ds = PackedDataset(prepared, "train")
    for step in (0, 5, 40):
        global_ids = GlobalBatchSampler(len(ds), 8, seed=0).sample_ids(step)
        for dp in (1, 2, 4):
            parts = [TrainBatches(ds, 8, 0, dp_rank=r, dp_size=dp).batch(step) for r in range(dp)]
            assert all(p["tokens"].shape == (8 // dp, 16) for p in parts)
            assert np.array_equal(np.concatenate([p["sample_ids"].numpy() for p in parts]), global_ids)
            assert np.array_equal(np.concatenate([p["tokens"].numpy() for p in parts]),
                                  make_batch(ds, global_ids)["tokens"].numpy())
    with pytest.raises(ValueError, match="not divisible"):
        rank_slice(global_ids, 0, 3)
    with pytest.raises(ValueError, match="not divisible"):
        TrainBatches(ds, 8, 0, dp_rank=0, dp_size=3)


def test_batch_tensors_and_validation_order(prepared):
    ds = PackedDataset(prepared, "val")
    batch = make_batch(ds, [2, 0])
    assert batch["tokens"].dtype == batch["targets"].dtype == batch["sample_ids"].dtype == torch.int64
    assert batch["tokens"].shape == batch["targets"].shape == (2, 16) and batch["sample_ids"].tolist() == [2, 0]
    assert np.array_equal(batch["tokens"][0].numpy(), ds[2][:-1])
    assert np.array_equal(batch["targets"][0].numpy(), ds[2][1:])
    batches = list(validation_batches(ds, 3))
    assert np.array_equal(np.concatenate([b["sample_ids"].numpy() for b in batches]), np.arange(len(ds)))
    assert [len(b["sample_ids"]) for b in batches][:-1] == [3] * (len(batches) - 1)
    assert len(list(validation_batches(ds, 3, max_batches=2))) == 2
    assert all(len(b["sample_ids"]) == 3 for b in validation_batches(ds, 3, drop_last=True))
    again = list(validation_batches(ds, 3))
    assert all(np.array_equal(a["tokens"], b["tokens"]) for a, b in zip(batches, again))


def test_dataset_pickles(prepared):
    ds = PackedDataset(prepared, "train")
    _ = ds[3]
    copy = pickle.loads(pickle.dumps(ds))
    assert np.array_equal(copy[3], ds[3]) and len(copy) == len(ds)


# -------------------------------------------------------------------------------- errors


def test_errors_name_the_file(prepared, tmp_path):
    with pytest.raises(DataError, match="nowhere does not exist.*python -m pretrain.data.prepare"):
        PackedDataset(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty/manifest.json is missing.*python -m pretrain.data.prepare"):
        PackedDataset(tmp_path / "empty")
    with pytest.raises(DataError, match="no split 'test'"):
        PackedDataset(prepared, "test")

    def broken():
        target = tmp_path / "broken"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(prepared, target)
        return target, read_manifest(target)

    d, _ = broken()
    (d / "train-000001.tar").unlink()
    with pytest.raises(DataError, match="shard .*train-000001.tar listed in .*manifest.json is missing"):
        PackedDataset(d)

    d, _ = broken()
    shard = d / "train-000000.tar"
    shard.write_bytes(shard.read_bytes()[:3000])
    with pytest.raises(DataError, match="train-000000.tar has 3000 bytes.*truncated"):
        PackedDataset(d)

    # Truncated and the manifest's size adjusted: the tar scan itself notices.
    d, m = broken()
    shard = d / "train-000000.tar"
    shard.write_bytes(shard.read_bytes()[:3000])
    m["splits"]["train"]["shards"][0]["bytes"] = 3000
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match="train-000000.tar.*(truncated|samples)"):
        PackedDataset(d)

    # Same size, different content: only the checksum tells.
    d, _ = broken()
    shard = d / "train-000001.tar"
    raw = bytearray(shard.read_bytes())
    raw[512 + 128 + 10] ^= 0xFF  # inside the first sample's token data (after tar and .npy headers)
    shard.write_bytes(bytes(raw))
    PackedDataset(d)
    with pytest.raises(DataError, match="train-000001.tar fails its sha256 check"):
        PackedDataset(d, verify=True)

    # Zeroed shard: not a tar of the expected members.
    d, m = broken()
    shard = d / "train-000000.tar"
    shard.write_bytes(b"\0" * m["splits"]["train"]["shards"][0]["bytes"])
    with pytest.raises(DataError, match="train-000000.tar holds 0 samples"):
        PackedDataset(d)

    # Right size, wrong member names.
    d, m = broken()
    shard = d / "val-000000.tar"
    with tarfile.open(shard) as tar:
        members = [(mem.name, tar.extractfile(mem).read()) for mem in tar]
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i, (name, data) in enumerate(members):
            info = tarfile.TarInfo(f"{i + 1000:012d}.tokens.npy" if i == 1 else name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(DataError, match=r"val-000000.tar: member 1 is '000000001001.tokens.npy', "
                                        r"expected a file '000000000001.tokens.npy'"):
        PackedDataset(d, "val")

    # Sample count in the manifest disagrees with the shard.
    d, m = broken()
    m["splits"]["val"]["shards"][0]["samples"] += 1
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match=r"val-000000.tar holds \d+ samples, manifest.json says"):
        PackedDataset(d, "val")

    d, m = broken()
    (d / "manifest.json").write_text(json.dumps({**m, "format": 99}))
    with pytest.raises(DataError, match="manifest.json has format 99"):
        PackedDataset(d)


def test_prepare_errors(tmp_path, corpus):
    with pytest.raises(FileNotFoundError, match="missing.txt does not exist"):
        prepare_dataset(tmp_path / "x", inputs=[str(tmp_path / "missing.txt")])
    with pytest.raises(ValueError, match="fewer than seq_len"):
        prepare_dataset(tmp_path / "x", inputs=[str(corpus / "doc00.txt")], vocab_size=300, seq_len=100000)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:1.*'text'.*--text-field"):
        prepare_dataset(tmp_path / "x", inputs=[str(bad)])
    assert prepare_main(["--out", str(tmp_path / "x"), "--inputs", str(tmp_path / "missing.txt")]) == 2
    m = prepare_dataset(tmp_path / "y", inputs=[str(bad)], jsonl_field="body", vocab_size=260, seq_len=1,
                        val_fraction=0.0)
    assert m["splits"]["train"]["documents"] == 1


# ----------------------------------------------------------------------------------- CLI


def test_cli_default_stdlib_corpus(tmp_path, capsys):
    files = stdlib_files()
    assert files and not any("site-packages" in f.name or "/test/" in f.name for f in files)
    assert [f.name for f in files] == sorted(f.name for f in files)
    names = {f.name for f in files}
    # the gencodec.py tables are left out, the hand-written codecs and the package stay
    assert not {"stdlib/encodings/cp1252.py", "stdlib/encodings/iso8859_2.py"} & names
    assert {"stdlib/encodings/__init__.py", "stdlib/encodings/utf_8.py", "stdlib/encodings/latin_1.py"} <= names
    assert prepare_main(["--out", str(tmp_path), "--max-files", "5", "--vocab-size", "300",
                         "--seq-len", "32"]) == 0
    out = capsys.readouterr().out
    assert "standard library" in out and "train:" in out and "val:" in out
    m = read_manifest(tmp_path)
    assert m["splits"]["train"]["documents"] + m["splits"]["val"]["documents"] == 5
    assert m["settings"]["max_files"] == 5 and "first 5 files" in m["source"]
    ds = PackedDataset(tmp_path, "train")
    assert len(ds) > 0 and ds.seq_len == 32


def test_cli_help():
    result = subprocess.run([sys.executable, "-m", "pretrain.data.prepare", "--help"], capture_output=True,
                            text=True, timeout=60, check=True)
    for flag in ("--out", "--inputs", "--glob", "--jsonl-field", "--tokenizer", "--vocab-size", "--seq-len",
                 "--val-fraction", "--samples-per-shard", "--max-files", "--max-bytes", "--include-tests"):
        assert flag in result.stdout
