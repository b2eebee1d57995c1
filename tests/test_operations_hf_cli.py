"""hf_interop export/import never destroy what they did not write: a non-empty --out that is not
an earlier export is refused (exit 2, one line, nothing changed) unless --overwrite, and --out may
never be (or contain) the input."""
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def run(*argv):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "pretrain.hf_interop", *map(str, argv)], capture_output=True,
                          text=True, timeout=300, env=env)


def tree(path):
    return {str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(Path(path).rglob("*")) if f.is_file()}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    out = tmp_path_factory.mktemp("hf") / "src"
    model.save_pretrained(out)
    return out


def refused(proc, *words):
    assert proc.returncode == 2, proc.stderr
    lines = [l for l in proc.stderr.strip().splitlines() if "Warning" not in l and l.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_export_refuses_a_foreign_directory_and_replaces_an_earlier_export(hf_dir, tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("precious")
    before = tree(foreign)
    refused(run("export", "--hf-in", hf_dir, "--out", foreign), "is not empty", "--overwrite")
    assert tree(foreign) == before
    out = tmp_path / "export"
    assert run("export", "--hf-in", hf_dir, "--out", out).returncode == 0
    assert run("export", "--hf-in", hf_dir, "--out", out, "--dtype", "bfloat16").returncode == 0  # ours: replaced
    assert '"bfloat16"' in (out / "config.json").read_text()
    assert run("export", "--hf-in", hf_dir, "--out", foreign, "--overwrite").returncode == 0
    assert not (foreign / "notes.txt").exists() and (foreign / "config.json").is_file()


def test_export_never_deletes_its_input(hf_dir, tmp_path):
    run_dir = tmp_path / "run"
    assert run("import", "--hf", hf_dir, "--out", run_dir).returncode == 0
    before = tree(run_dir)
    for out in (run_dir, tmp_path):   # the input itself, and a directory that contains it
        refused(run("export", "--checkpoint", run_dir, "--out", out, "--overwrite"), "would replace the input")
    assert tree(run_dir) == before
    src_before = tree(hf_dir)
    refused(run("export", "--hf-in", hf_dir, "--out", hf_dir, "--overwrite"), "would replace the input")
    assert tree(hf_dir) == src_before


def test_import_refuses_an_existing_run_unless_overwrite(hf_dir, tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "step_00000050").mkdir(parents=True)
    (run_dir / "checkpoints" / "step_00000050" / "trainer_state.json").write_text('{"step": 50}')
    before = tree(run_dir)
    refused(run("import", "--hf", hf_dir, "--out", run_dir), "is not empty", "--overwrite")
    assert tree(run_dir) == before
    refused(run("import", "--hf", hf_dir, "--out", hf_dir.parent, "--overwrite"), "would replace the input")
    proc = run("import", "--hf", hf_dir, "--out", run_dir, "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000000"]
    assert "run_dir: " + str(run_dir) in (run_dir / "checkpoints" / "step_00000000" / "config.yaml").read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # no temporary leftovers
