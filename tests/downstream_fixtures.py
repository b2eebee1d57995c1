"""The checkpoints the downstream-evaluation tests run on (tests/test_downstream*.py)."""
import os

from builders import make_model

from pretrain.hf_interop import save_hf_checkpoint
from pretrain.hf_interop.__main__ import main as hf_cli

LAYERS, MAX_LEN = 4, 64   # the perplexity documents need several windows of 64 tokens


def build_checkpoints(prepared_data, root):
    """(our run directory, its HF export): a model whose early exits often agree with the last,
    imported as checkpoint step 0 and exported again with `python -m pretrain.hf_interop export`.
    The datasets cache goes under `root` (the tests stay offline and leave nothing behind)."""
    from tokenizers import Tokenizer

    os.environ["HF_DATASETS_CACHE"] = str(root / "datasets")
    vocab = Tokenizer.from_file(str(prepared_data / "tokenizer.json")).get_vocab_size()
    model = make_model(vocab=vocab, layers=LAYERS, max_seq_len=MAX_LEN, scale=0.3, embed_scale=4.0)
    save_hf_checkpoint(model, root / "source_hf", tokenizer_file=prepared_data / "tokenizer.json", eos_token_id=0)
    assert hf_cli(["import", "--hf", str(root / "source_hf"), "--out", str(root / "run")]) == 0
    assert hf_cli(["export", "--checkpoint", str(root / "run"), "--out", str(root / "export")]) == 0
    return root / "run", root / "export"
