"""Hugging Face Llama interop: logits (final and early exits) equal transformers' LlamaForCausalLM
in both directions; sharded, atomic, distributed (FSDP2 on gloo) saves; the CLI; clear errors."""
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

import pretrain.hf_interop.io as hf_io
from pretrain.hf_interop import (HFConfigError, hf_config_from_model_config, load_hf_checkpoint,
                                 model_config_from_hf, save_hf_checkpoint)
from pretrain.hf_interop.__main__ import main as cli
from pretrain.model import LayerSkipTransformer, ModelConfig

ROOT = Path(__file__).resolve().parents[1]
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32, "rope_theta": 500000.0}
ATOL, RTOL = 2e-5, 1e-4


def hf_model(tied=False, rope=None, **overrides):
    kwargs = dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  rms_norm_eps=1e-5, tie_word_embeddings=tied)
    if rope:
        kwargs["rope_parameters"] = dict(rope)
    else:
        kwargs["rope_theta"] = 10000.0
    kwargs.update(overrides)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**kwargs)).eval()
    with torch.no_grad():  # non-trivial norm weights, so that a swapped norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def our_model(tied=False, **overrides):
    kwargs = dict(vocab_size=200, dim=64, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=128,
                  tie_embeddings=tied)
    kwargs.update(overrides)
    torch.manual_seed(1)
    model = LayerSkipTransformer(ModelConfig(**kwargs)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def assert_same_logits(ours, hf, tokens):
    """Final logits and every early exit: ours at exit l == lm_head(norm(hidden_states[l]))."""
    with torch.no_grad():
        out = hf(input_ids=tokens, output_hidden_states=True)
        torch.testing.assert_close(ours.logits(tokens), out.logits, atol=ATOL, rtol=RTOL)
        for exit_layer in range(1, ours.num_layers):
            expected = hf.lm_head(hf.model.norm(out.hidden_states[exit_layer]))
            torch.testing.assert_close(ours.logits(tokens, exit_layer=exit_layer), expected, atol=ATOL, rtol=RTOL)


# --------------------------------------------------------------------------------------------
# HF -> ours


@pytest.mark.parametrize("tied, rope, seq", [(False, None, 24), (True, None, 24), (False, LLAMA3_ROPE, 100)],
                         ids=["untied", "tied", "llama3-rope"])
def test_import_matches_transformers(tmp_path, tied, rope, seq):
    hf = hf_model(tied, rope)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    assert ("lm_head.weight" in load_file(tmp_path / "model.safetensors")) != tied  # tied: HF omits it
    (tmp_path / "tokenizer.json").write_text("{}")
    ours, tokenizer = load_hf_checkpoint(tmp_path)
    assert tokenizer == str(tmp_path / "tokenizer.json")
    assert ours.cfg.tie_embeddings == tied
    assert (ours.output.weight is ours.tok_embeddings.weight) == tied
    assert all(p.requires_grad and p.device.type == "cpu" for p in ours.parameters())
    if rope:
        assert ours.cfg.rope_scaling_factor == 8.0 and ours.cfg.rope_theta == 500000.0
    tokens = torch.randint(0, 256, (2, seq))  # llama3: beyond original_max_position_embeddings=32
    assert_same_logits(ours.eval(), hf, tokens)


def test_import_bfloat16_matches_transformers_bfloat16(tmp_path):
    hf_model().save_pretrained(tmp_path)
    hf = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    ours, _ = load_hf_checkpoint(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    tokens = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(ours.eval().logits(tokens), hf(input_ids=tokens).logits, atol=2e-2, rtol=2e-2)


def test_legacy_config_layout_reads_the_same():
    """transformers 4.x config.json: top-level rope_theta, rope_scaling with `type`; defaults."""
    new = {"model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 160,
           "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
           "rope_parameters": dict(LLAMA3_ROPE)}
    legacy = {k: v for k, v in new.items() if k != "rope_parameters"}
    legacy["rope_theta"] = LLAMA3_ROPE["rope_theta"]
    legacy["rope_scaling"] = {"type": "llama3", **{k: v for k, v in LLAMA3_ROPE.items()
                                                   if k not in ("rope_type", "rope_theta")}}
    assert model_config_from_hf(new) == model_config_from_hf(legacy)
    cfg = model_config_from_hf(legacy)
    assert (cfg.rope_theta, cfg.rope_scaling_factor, cfg.rope_original_max_positions) == (500000.0, 8.0, 32)
    # LlamaConfig's defaults for omitted keys
    assert (cfg.norm_eps, cfg.max_seq_len, cfg.tie_embeddings) == (1e-6, 2048, False)
    # rope_scaling of the default type is no scaling
    plain = model_config_from_hf({**legacy, "rope_scaling": {"rope_type": "default"}})
    assert plain.rope_scaling_factor == 1.0


def test_import_is_strict_about_tensors(tmp_path):
    hf_model().save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    weights["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing: model\.layers\.1\.mlp\.up_proj\.weight.*"
                                         r"unexpected: model\.layers\.0\.self_attn\.q_proj\.bias"):
        load_hf_checkpoint(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    hf_model().save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "vocab_size": 300}))
    with pytest.raises(ValueError, match=r"wrong shape: lm_head\.weight \(256, 64\) "
                                         r"\(config\.json implies \(300, 64\)\), model\.embed_tokens"):
        load_hf_checkpoint(tmp_path)


# --------------------------------------------------------------------------------------------
# ours -> HF


@pytest.mark.parametrize("tied, scaled", [(False, False), (True, False), (False, True)],
                         ids=["untied", "tied", "llama3-rope"])
def test_export_loads_in_transformers(tmp_path, tied, scaled):
    rope = dict(rope_scaling_factor=8.0, rope_original_max_positions=32, rope_theta=500000.0) if scaled else {}
    ours = our_model(tied, **rope)
    out = save_hf_checkpoint(ours, tmp_path / "hf", eos_token_id=0, bos_token_id=1)
    assert out == tmp_path / "hf"
    names = set(load_file(out / "model.safetensors"))
    assert ("lm_head.weight" in names) != tied
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["torch_dtype"] == "float32"
    assert json.loads((out / "generation_config.json").read_text()) == {"bos_token_id": 1, "eos_token_id": 0}
    hf = LlamaForCausalLM.from_pretrained(out).eval()
    assert hf.config.tie_word_embeddings == tied and hf.config.eos_token_id == 0
    assert_same_logits(ours, hf, torch.randint(0, 200, (2, 100 if scaled else 24)))
    back, tokenizer = load_hf_checkpoint(out)
    assert tokenizer is None and back.cfg == ours.cfg
    assert back.state_dict().keys() == ours.state_dict().keys()
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, back.state_dict()[name]), name


def test_export_bfloat16_with_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer

    words = ["<eos>", "<bos>"] + [f"w{i}" for i in range(20)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    ours = our_model(vocab_size=len(words))
    out = save_hf_checkpoint(ours, tmp_path / "hf", tokenizer_file=tmp_path / "tokenizer.json",
                             eos_token_id=0, bos_token_id=1, dtype=torch.bfloat16)
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    hf_tok = AutoTokenizer.from_pretrained(out)
    assert hf_tok("w3 w7")["input_ids"] == [5, 9]
    assert (hf_tok.eos_token, hf_tok.eos_token_id, hf_tok.bos_token_id) == ("<eos>", 0, 1)
    back, tokenizer = load_hf_checkpoint(out, dtype=torch.bfloat16)
    assert tokenizer == str(out / "tokenizer.json")
    assert torch.equal(back.tok_embeddings.weight, ours.tok_embeddings.weight.to(torch.bfloat16))


def test_sharded_export_round_trips(tmp_path):
    ours = our_model(vocab_size=100, dim=32, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=64, max_seq_len=16)
    save_hf_checkpoint(ours, tmp_path / "hf", max_shard_bytes=20_000)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and not (tmp_path / "hf" / "model.safetensors").exists()
    assert all((tmp_path / "hf" / s).is_file() for s in shards)
    back, _ = load_hf_checkpoint(tmp_path / "hf")
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens = torch.randint(0, 100, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(back.logits(tokens), ours.logits(tokens), atol=0, rtol=0)
        torch.testing.assert_close(hf(input_ids=tokens).logits, ours.logits(tokens), atol=ATOL, rtol=RTOL)
    (tmp_path / "hf" / sorted(shards)[-1]).unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors.index.json is missing"):
        load_hf_checkpoint(tmp_path / "hf")


def test_save_replaces_atomically(tmp_path, monkeypatch):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    small = our_model(vocab_size=50, dim=32, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=32, max_seq_len=8)
    save_hf_checkpoint(small, out)
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temporary or old directories left
    before = (out / "model.safetensors").read_bytes()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(hf_io, "_write_shards", fail)
    with pytest.raises(OSError, match="disk full"):
        save_hf_checkpoint(our_model(), out)
    assert (out / "model.safetensors").read_bytes() == before  # the previous export is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


FSDP_SCRIPT = textwrap.dedent("""
    import sys
    import torch, torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    sys.path.insert(0, sys.argv[2])
    from pretrain.hf_interop import save_hf_checkpoint
    from pretrain.model import LayerSkipTransformer, ModelConfig

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (2,))
    torch.manual_seed(0)
    model = LayerSkipTransformer(ModelConfig(vocab_size=96, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                             ffn_dim=64, max_seq_len=16, tie_embeddings=True))
    for block in model.layers.values():
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    assert isinstance(model.tok_embeddings.weight, DTensor)
    assert model.tok_embeddings.weight.to_local().shape[0] == 48
    save_hf_checkpoint(model, sys.argv[1], max_shard_bytes=20_000)
    import os
    assert os.path.isfile(os.path.join(sys.argv[1], "config.json"))  # in place on every rank on return
    dist.barrier()  # no rank leaves while a peer's last collective is in flight
    dist.destroy_process_group()
""")


def test_save_gathers_fsdp_dtensors_and_rank0_writes(tmp_path):
    script = tmp_path / "save_fsdp.py"
    script.write_text(FSDP_SCRIPT)
    out = tmp_path / "hf"
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), str(out), str(ROOT)], env={**env, "RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    logs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(logs)
    torch.manual_seed(0)
    reference = LayerSkipTransformer(ModelConfig(vocab_size=96, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                                 ffn_dim=64, max_seq_len=16, tie_embeddings=True))
    back, _ = load_hf_checkpoint(out)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(tensor, back.state_dict()[name]), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "save_fsdp.py"]


def test_save_refuses_a_partial_model(tmp_path):
    model = our_model()
    del model.layers["1"]  # as a pipeline stage holds only some blocks
    with pytest.raises(ValueError, match=r"lacks parameters layers\.1\.attention\.wq\.weight.*consolidate"):
        save_hf_checkpoint(model, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_hf_config_extra_keys():
    cfg = ModelConfig(vocab_size=100, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64)
    config = hf_config_from_model_config(cfg, dtype=torch.bfloat16, eos_token_id=[1, 2], pad_token_id=0)
    assert (config["torch_dtype"], config["eos_token_id"], config["pad_token_id"]) == ("bfloat16", [1, 2], 0)
    assert model_config_from_hf(config) == cfg


# --------------------------------------------------------------------------------------------
# CLI


def test_cli_export_round_trip_and_import(tmp_path, capsys):
    hf = hf_model(tied=True)
    hf.save_pretrained(tmp_path / "src")
    assert cli(["export", "--hf-in", str(tmp_path / "src"), "--out", str(tmp_path / "copy"),
                "--max-shard-size", "30000"]) == 0
    assert json.loads(capsys.readouterr().out)["exported"] == str(tmp_path / "copy")
    assert (tmp_path / "copy" / "model.safetensors.index.json").is_file()
    copy = LlamaForCausalLM.from_pretrained(tmp_path / "copy").eval()
    assert copy.config.eos_token_id == hf.config.eos_token_id
    tokens = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(copy(input_ids=tokens).logits, hf(input_ids=tokens).logits, atol=0, rtol=0)

    from pretrain.model_loading import load_model

    assert cli(["import", "--hf", str(tmp_path / "src"), "--out", str(tmp_path / "run")]) == 0
    assert "checkpoint" in json.loads(capsys.readouterr().out)
    run_model, _ = load_model(tmp_path / "run")
    with torch.no_grad():
        torch.testing.assert_close(run_model.logits(tokens), hf(input_ids=tokens).logits, atol=ATOL, rtol=RTOL)
    # and back out of our run directory
    assert cli(["export", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "out"),
                "--dtype", "bfloat16"]) == 0
    assert json.loads(capsys.readouterr().out)["dtype"] == "bfloat16"
    exported = LlamaForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert exported.config.tie_word_embeddings
    for name, tensor in hf.state_dict().items():
        assert torch.equal(exported.state_dict()[name], tensor.to(torch.bfloat16).float()), name


def test_cli_reports_errors(tmp_path, capsys):
    assert cli(["export", "--hf-in", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli(["export", "--out", str(tmp_path / "o")])  # no source


# --------------------------------------------------------------------------------------------
# errors


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing does not exist"):
        load_hf_checkpoint(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty/config\.json is missing"):
        load_hf_checkpoint(tmp_path / "empty")
    hf = hf_model()
    hf.config.save_pretrained(tmp_path / "no_weights")
    with pytest.raises(FileNotFoundError, match=r"no_weights has no weights: expected model\.safetensors"):
        load_hf_checkpoint(tmp_path / "no_weights")
    (tmp_path / "bad_json").mkdir()
    (tmp_path / "bad_json" / "config.json").write_text("{")
    with pytest.raises(ValueError, match=r"bad_json/config\.json is not valid JSON"):
        load_hf_checkpoint(tmp_path / "bad_json")
    hf.config.attention_bias = True
    hf.config.save_pretrained(tmp_path / "bias")
    with pytest.raises(HFConfigError, match="config.json attention_bias=true"):
        load_hf_checkpoint(tmp_path / "bias")


@pytest.mark.parametrize("change, key", [
    ({"mlp_bias": True}, "mlp_bias"),
    ({"model_type": "mistral"}, "model_type"),
    ({"head_dim": 32}, "head_dim"),
    ({"num_attention_heads": 5}, "num_attention_heads"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling.rope_type"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}}, "rope_parameters.rope_type"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 1e4}}, "low_freq_factor"),
    ({"vocab_size": None}, "vocab_size"),
])
def test_unsupported_config_names_the_key(change, key):
    base = {"model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 160,
            "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2}
    with pytest.raises(HFConfigError, match=key):
        model_config_from_hf({**base, **change})
