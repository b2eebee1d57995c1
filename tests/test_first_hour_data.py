"""Data preparation edges a new user meets (issue 20 items 4 and 6): progress on long inputs; a BOS
added by the tokenizer's post-processor is recorded as bos_id; a part's summary explains its
validation count; a merged dataset's manifest is byte-identical to a single prepare's; a wrong
--text-field is not answered with --on-bad-record skip (which would drop every record)."""
import io
import json

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from pretrain.data import progress as progress_module
from pretrain.data.corpus import BadInputError, expand_inputs, read_documents
from pretrain.data.dataset import PackedDataset
from pretrain.data.prepare import main as prepare_main, merge_parts, prepare_dataset
from pretrain.data.progress import PrepareProgress

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    for i in range(12):
        (root / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(WORDS, 30 + i)) + "\n")
    return root


def word_tokenizer(directory, bos_template: bool):
    directory.mkdir()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos_template:  # how transformers 5 saves a Llama tokenizer: the post-processor adds <s>
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))  # no add_bos_token
    return directory


def stream(out):
    ds = PackedDataset(out, "train")
    return np.concatenate([ds[i] for i in range(len(ds))]).tolist()


def test_bos_added_by_the_post_processor_is_recorded(corpus, tmp_path):
    tok = word_tokenizer(tmp_path / "tok", bos_template=True)
    m = prepare_dataset(tmp_path / "out", inputs=[str(corpus)], tokenizer_path=tok, seq_len=8, val_fraction=0.0)
    assert m["bos_id"] == 1
    tokens = stream(tmp_path / "out")
    assert tokens[0] == 1 and all(tokens[i + 1] == 1 for i, t in enumerate(tokens[:-1]) if t == 2)
    off = prepare_dataset(tmp_path / "off", inputs=[str(corpus)], tokenizer_path=tok, seq_len=8, val_fraction=0.0,
                          add_special_tokens=False)
    assert off["bos_id"] is None and 1 not in stream(tmp_path / "off")
    plain = prepare_dataset(tmp_path / "plain", inputs=[str(corpus)], seq_len=8, val_fraction=0.0,
                            tokenizer_path=word_tokenizer(tmp_path / "tok2", bos_template=False))
    assert plain["bos_id"] is None and 1 not in stream(tmp_path / "plain")


def test_merged_manifest_is_byte_identical_and_parts_explain_their_validation_count(corpus, tmp_path, capsys):
    tok = word_tokenizer(tmp_path / "tok", bos_template=False)
    flags = ["--inputs", str(corpus), "--tokenizer", str(tok), "--seq-len", "8", "--val-fraction", "0.001"]
    assert prepare_main([*flags, "--out", str(tmp_path / "one")]) == 0
    for part in range(3):
        assert prepare_main([*flags, "--out", str(tmp_path / "three"), "--num-parts", "3", "--part", str(part)]) == 0
    out = capsys.readouterr().out
    # val 0.001: no document hashes into val; the merge holds one out, as the single prepare did
    assert out.count("0 validation (none of its documents hashes below --val-fraction 0.001") == 3
    merge_parts(tmp_path / "three")
    assert (tmp_path / "three" / "manifest.json").read_bytes() == (tmp_path / "one" / "manifest.json").read_bytes()
    assert json.loads((tmp_path / "one" / "manifest.json").read_text())["splits"]["val"]["documents"] == 1


def test_progress_lines_on_long_inputs(corpus, tmp_path, monkeypatch, capsys):
    now = [0.0]
    sink = io.StringIO()
    progress = PrepareProgress(every_s=10, out=sink, clock=lambda: now[0])
    progress.add(5, 1000, 300)
    now[0] = 4.0
    progress.add(5, 1000, 300)
    assert sink.getvalue() == ""  # a short preparation stays quiet
    now[0] = 10.0
    progress.add(10, 3_000_000, 1_000_000)
    assert sink.getvalue().splitlines() == ["prepare: 20 documents, 3.00MB of text, 1.0M tokens in 0m10s "
                                            "(300.20kB/s, 100.1k tokens/s)"]
    progress.finish()
    assert len(sink.getvalue().splitlines()) == 2
    monkeypatch.setattr(progress_module, "EVERY_S", 0.0)  # every batch: the real preparation reports
    m = prepare_dataset(tmp_path / "out", inputs=[str(corpus)], vocab_size=270, seq_len=8, val_fraction=0.0)
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and lines[-1].startswith(f"prepare: {m['splits']['train']['documents']} documents")
    assert "tokens/s" in lines[-1]


def test_a_wrong_text_field_suggests_the_field_not_skipping(tmp_path):
    first = tmp_path / "first.jsonl"
    first.write_text("".join(json.dumps({"body": f"text {i}", "id": i}) + "\n" for i in range(5)))
    with pytest.raises(BadInputError) as err:
        list(read_documents(expand_inputs([str(first)]), "text"))
    assert "did you mean --text-field body?" in str(err.value) and "--on-bad-record" not in str(err.value)
    later = tmp_path / "later.jsonl"  # one odd record among good ones: skipping it is the right advice
    later.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"body": "odd"}) + "\n")
    with pytest.raises(BadInputError, match="--on-bad-record skip"):
        list(read_documents(expand_inputs([str(later)]), "text"))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["a b", "c d"]}), tmp_path / "t.parquet")
    with pytest.raises(BadInputError) as err:
        list(read_documents(expand_inputs([str(tmp_path / "t.parquet")]), "text"))
    assert "did you mean --text-field content?" in str(err.value) and "--on-bad-record" not in str(err.value)
