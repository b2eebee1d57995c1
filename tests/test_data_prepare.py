"""prepare at scale: streaming equals the in-memory statement, any number of workers and parts gives
the same shards, every input format reads the same documents, bad input is named or counted, and
--out is never lost."""
import gzip
import json
import shutil

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from pretrain.data.corpus import BadInputError, BadRecords, expand_inputs, read_documents
from pretrain.data.dataset import PackedDataset
from pretrain.data.outdir import OutputError
from pretrain.data.prepare import main as prepare_main
from pretrain.data.prepare import merge_parts, prepare_dataset, split_documents
from pretrain.data.tokenizer import train_bpe
from pretrain.data.tokenizer_choice import bpe_sample

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def texts(n, seed=0, words=40):
    rng = np.random.default_rng(seed)
    return [f"doc {i}: " + " ".join(rng.choice(WORDS, size=words)) + "\n" for i in range(n)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Text files in a directory, and the same kind of text as JSON lines in several files."""
    root = tmp_path_factory.mktemp("corpus")
    (root / "dir").mkdir()
    for i, t in enumerate(texts(12)):
        (root / "dir" / f"d{i:02d}.txt").write_text(t)
    (root / "lines").mkdir()
    all_texts = texts(60, seed=1)
    for f in range(4):
        with open(root / "lines" / f"part{f}.jsonl", "w") as out:
            for t in all_texts[f * 15:(f + 1) * 15]:
                out.write(json.dumps({"text": t, "id": 1}) + "\n")
    return root


@pytest.fixture(scope="module")
def tokenizer_dir(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    prepare_dataset(out, inputs=[str(corpus / "lines")], vocab_size=300, tokenizer_only=True)
    return out


def in_memory_samples(docs, tokenizer, eos_id, seq_len):
    """The reference: every document of a split encoded, EOS after each, one stream, windows of seq_len+1."""
    stream = [t for d in docs for t in tokenizer.encode(d.text).ids + [eos_id]]
    n = len(stream) // (seq_len + 1)
    return np.asarray(stream[:n * (seq_len + 1)], dtype=np.int64).reshape(n, seq_len + 1)


def all_samples(path, split):
    ds = PackedDataset(path, split)
    return ds.get_many(range(len(ds)))


def shard_sums(path):
    m = json.loads((path / "manifest.json").read_text())
    return {s: [x["sha256"] for x in m["splits"][s]["shards"]] for s in ("train", "val")}


@pytest.mark.parametrize("workers", [1, 2])
def test_streaming_equals_the_in_memory_path(corpus, tmp_path, workers):
    out = tmp_path / "out"
    m = prepare_dataset(out, inputs=[str(corpus / "lines"), str(corpus / "dir")], vocab_size=300, seq_len=16,
                        val_fraction=0.1, samples_per_shard=20, workers=workers)
    docs = [d for d in read_documents(expand_inputs([str(corpus / "lines"), str(corpus / "dir")]))]
    train, val = split_documents(docs, 0.1)
    reference = train_bpe([d.text for d in train], 300)  # the whole train split fits the sample
    assert (out / "tokenizer.json").read_text() == reference.to_str(pretty=True)
    eos = reference.token_to_id("<|endoftext|>")
    for split, split_docs in (("train", train), ("val", val)):
        assert np.array_equal(all_samples(out, split), in_memory_samples(split_docs, reference, eos, 16))
        assert m["splits"][split]["documents"] == len(split_docs)
    assert len(m["splits"]["train"]["shards"]) > 1


def test_workers_and_parts_give_the_same_dataset(corpus, tokenizer_dir, tmp_path):
    inputs = [str(corpus / "lines"), str(corpus / "dir")]
    kw = dict(tokenizer_path=tokenizer_dir, seq_len=8, samples_per_shard=30)
    for val_fraction in (0.1, 1e-9):  # 1e-9: the fallback moves one document to val across parts
        one = prepare_dataset(tmp_path / f"one{val_fraction}", inputs=inputs, val_fraction=val_fraction, **kw)
        if val_fraction < 1e-6:
            assert one["splits"]["val"]["documents"] == 1
        for n in (2, 3, 5):
            out = tmp_path / f"parts{n}-{val_fraction}"
            for part in reversed(range(n)):
                prepare_dataset(out, inputs=inputs, val_fraction=val_fraction, num_parts=n, part=part,
                                workers=2 if part == 0 else 1, **kw)
            merged = merge_parts(out)
            assert shard_sums(out) == shard_sums(tmp_path / f"one{val_fraction}")
            assert merged["splits"] == one["splits"]
            assert (out / "tokenizer.json").read_bytes() == (tmp_path / f"one{val_fraction}" / "tokenizer.json").read_bytes()


def test_parts_cli_with_slurm_array_index_and_merge_errors(corpus, tokenizer_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    args = ["--inputs", str(corpus / "lines"), "--out", str(out), "--tokenizer", str(tokenizer_dir),
            "--seq-len", "8", "--num-parts", "3"]
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    assert prepare_main(args) == 0
    assert (out / "parts" / "part-00001-of-00003" / "part.json").is_file()
    assert prepare_main(["--out", str(out), "--merge"]) == 2
    assert "missing part-00000-of-00003, part-00002-of-00003" in capsys.readouterr().err
    for part in ("0", "2"):
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", part)
        assert prepare_main(args) == 0
    assert prepare_main(["--out", str(out), "--merge"]) == 0
    assert len(PackedDataset(out)) > 0
    with pytest.raises(ValueError, match="--part needs --tokenizer"):
        prepare_dataset(tmp_path / "x", inputs=[str(corpus / "lines")], num_parts=2, part=0)


def write_formats(root, records):
    """The same records as .jsonl, .jsonl.gz, .jsonl.zst and .parquet (field `body`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard
    lines = "".join(json.dumps({"body": t}) + "\n" for t in records).encode()
    (root / "c.jsonl").write_bytes(lines)
    (root / "c.jsonl.gz").write_bytes(gzip.compress(lines))
    (root / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    pq.write_table(pa.table({"body": records, "n": list(range(len(records)))}), root / "c.parquet", row_group_size=7)
    return ["c.jsonl", "c.jsonl.gz", "c.jsonl.zst", "c.parquet"]


def test_every_format_reads_the_same_documents(tmp_path):
    records = texts(25, seed=3) + ["unicode: é ü 日本 \u2028 end"]
    names = write_formats(tmp_path, records)
    (tmp_path / "dir").mkdir()
    for i, t in enumerate(records):
        (tmp_path / "dir" / f"{i:03d}.txt").write_text(t)
    for name in names:
        docs = list(read_documents(expand_inputs([str(tmp_path / name)]), "body"))
        assert [d.text for d in docs] == records, name
        assert [d.name for d in docs] == [f"{name}:{i}" for i in range(1, len(records) + 1)]
    assert [d.text for d in read_documents(expand_inputs([str(tmp_path / "dir")]))] == records
    m = prepare_dataset(tmp_path / "out", inputs=[str(tmp_path / "c.parquet")], text_field="body", vocab_size=280,
                        seq_len=8, val_fraction=0.0)
    assert m["splits"]["train"]["documents"] == len(records)
    with pytest.raises(BadInputError, match=r"c.parquet: no column 'text' \(it has \['body', 'n'\]\)"):
        list(read_documents(expand_inputs([str(tmp_path / "c.parquet")]), "text"))


def test_bad_records_are_named_or_counted(tmp_path):
    bad = tmp_path / "bad.jsonl"
    good = json.dumps({"text": "fine text " * 20})
    bad.write_bytes("\n".join([good, "{not json", json.dumps({"body": 1}), json.dumps({"text": 5}),
                               good]).encode() + b"\n" + b'{"text": "caf\xe9"}\n' + good.encode() + b"\n")
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"line one\nline two caf\xe9\n")
    cases = [(bad, "bad.jsonl:2: not a JSON object"), (latin, r"latin.txt:2: not UTF-8 text")]
    for path, message in cases:
        with pytest.raises(BadInputError, match=message):
            list(read_documents(expand_inputs([str(path)])))
    counted = BadRecords("skip")
    docs = list(read_documents(expand_inputs([str(bad), str(latin)]), bad=counted))
    assert len(docs) == 3 and all(d.text.startswith("fine") for d in docs)
    assert counted.counts == {"invalid_json": 1, "missing_field": 1, "not_a_string": 1, "not_utf8": 2}
    trunc = tmp_path / "t.jsonl.gz"
    trunc.write_bytes(gzip.compress((good + "\n").encode() * 50)[:-30])
    with pytest.raises(BadInputError, match=r"t.jsonl.gz:\d+: cannot be read past here"):
        list(read_documents(expand_inputs([str(trunc)])))
    # the CLI: one line naming file and line, exit 2; with skip, counted in the manifest
    assert prepare_main(["--inputs", str(bad), "--out", str(tmp_path / "o"), "--vocab-size", "270"]) == 2
    m = prepare_dataset(tmp_path / "o", inputs=[str(bad), str(latin)], on_bad_record="skip", vocab_size=270,
                        seq_len=4, val_fraction=0.0)
    assert m["bad_records"]["skipped"] == counted.counts and m["splits"]["train"]["documents"] == 3
    assert "bad.jsonl:2" in m["bad_records"]["examples"][0]


def test_hugging_face_tokenizer_directory_with_bos(tmp_path, corpus):
    hf = tmp_path / "hf_model"
    hf.mkdir()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS + ["doc"])}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(hf / "tokenizer.json"))
    (hf / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "bos_token": {"content": "<s>"},
                                                          "add_bos_token": True}))
    (hf / "config.json").write_text("{}")
    m = prepare_dataset(tmp_path / "out", inputs=[str(corpus / "dir")], tokenizer_path=hf, seq_len=8,
                        val_fraction=0.0)
    assert m["eos_id"] == 2 and m["bos_id"] == 1 and (tmp_path / "out" / "tokenizer_config.json").is_file()
    stream = all_samples(tmp_path / "out", "train").reshape(-1).tolist()
    assert stream[0] == 1 and stream.count(1) >= 10
    assert all(stream[i + 1] == 1 for i, t in enumerate(stream[:-1]) if t == 2)  # every EOS followed by BOS


def test_bpe_is_trained_on_a_bounded_sample_spread_over_the_corpus(corpus, tmp_path):
    files = expand_inputs([str(corpus / "lines")])
    sample = bpe_sample(files, "text", 1500, 0.0, None, "error")
    all_texts = [d.text for d in read_documents(files)]
    size = sum(len(t.encode()) for t in sample)
    assert 0 < size < 1500 + max(len(t) for t in all_texts)
    positions = [all_texts.index(t) for t in sample]
    assert positions != list(range(len(sample))) and max(positions) > len(all_texts) // 2
    m = prepare_dataset(tmp_path / "o", inputs=[str(corpus / "lines")], vocab_size=280, seq_len=8,
                        tokenizer_sample_bytes=1500)
    assert f"{len(sample)} training documents ({size:,} bytes" in m["tokenizer_source"]


def test_out_is_never_lost(corpus, tokenizer_dir, tmp_path):
    out = tmp_path / "out"
    kw = dict(tokenizer_path=tokenizer_dir, seq_len=8, val_fraction=0.1)
    prepare_dataset(out, inputs=[str(corpus / "lines")], **kw)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n")
    with pytest.raises(BadInputError):
        prepare_dataset(out, inputs=[str(corpus / "dir"), str(bad)], **kw)
    with pytest.raises(ValueError, match="fewer than seq_len"):
        prepare_dataset(out, inputs=[str(corpus / "dir")], tokenizer_path=tokenizer_dir, seq_len=10 ** 6)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # a directory that is not a dataset of ours: refused, unless --overwrite
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="not a dataset written by prepare.*notes.txt.*--overwrite"):
        prepare_dataset(user, inputs=[str(corpus / "dir")], **kw)
    assert prepare_main(["--inputs", str(corpus / "dir"), "--out", str(user), "--tokenizer", str(tokenizer_dir)]) == 2
    assert (user / "notes.txt").read_text() == "mine"
    prepare_dataset(user, inputs=[str(corpus / "dir")], overwrite=True, **kw)
    assert not (user / "notes.txt").exists() and len(PackedDataset(user)) > 0
    # the input inside --out: refused even with --overwrite
    inside = tmp_path / "inside"
    shutil.copytree(corpus / "dir", inside / "texts")
    with pytest.raises(OutputError, match="lies inside --out"):
        prepare_dataset(inside, inputs=[str(inside / "texts")], overwrite=True, **kw)
    assert len(list((inside / "texts").iterdir())) == 12
    # our own dataset is replaced without --overwrite, and only ours: nothing left from the old one
    prepare_dataset(out, inputs=[str(corpus / "dir")], **{**kw, "val_fraction": 0.0})
    assert not (out / "val-000000.tar").exists() or json.loads((out / "manifest.json").read_text())["splits"]["val"]["shards"]
    assert not [p for p in out.iterdir() if p.name.startswith(".prepare-staging")]
    with pytest.raises(ValueError, match="holds a dataset; --tokenizer-only would replace"):
        prepare_dataset(out, inputs=[str(corpus / "dir")], vocab_size=280, tokenizer_only=True)
    prepare_dataset(tokenizer_dir, inputs=[str(corpus / "lines")], vocab_size=300, tokenizer_only=True)  # rerun: fine


@pytest.mark.parametrize("count,dtype", [(7, np.uint16), (50, np.uint32)])
def test_shard_writer_writes_what_tarfile_writes(tmp_path, count, dtype):
    import io
    import tarfile
    from pretrain.data.shards import ShardWriter, npy_bytes
    rows = np.random.default_rng(0).integers(0, 60000, (count, 13))
    writer = ShardWriter(tmp_path, "train", 1000, dtype, 13)
    for row in rows:
        writer.add(row)
    writer.finish()
    with tarfile.open(tmp_path / "reference.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for i, row in enumerate(rows):
            data = npy_bytes(row.astype(dtype))
            info = tarfile.TarInfo(f"{i:012d}.tokens.npy")
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    assert (tmp_path / "train-000000.tar").read_bytes() == (tmp_path / "reference.tar").read_bytes()
