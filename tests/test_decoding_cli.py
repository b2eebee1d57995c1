"""python -m pretrain.generate: prompts in, completions and one JSON object of statistics out."""
import json

import pytest
import torch
from builders import make_model, reference_greedy
from tokenizers import Tokenizer, models, pre_tokenizers

from pretrain import generate as cli

WORDS = ["<|endoftext|>"] + [f"w{i}" for i in range(63)]

pytestmark = pytest.mark.usefixtures("one_thread")


def ids(text):
    return [WORDS.index(w) for w in text.split()]


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="w1"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return str(path)


@pytest.fixture
def fake_checkpoint(monkeypatch, tokenizer_file):
    """The loader returns a small model in memory: no dependence on the checkpoint format."""
    model = make_model()
    monkeypatch.setattr(cli, "load_model", lambda path, device: (model, tokenizer_file))
    return model


def run(capsys, *argv):
    code = cli.main(["--checkpoint", "unused", *argv])
    out = capsys.readouterr()
    assert code == 0, out.err
    lines = out.out.strip().splitlines()
    return lines[:-1], json.loads(lines[-1])


def test_greedy_generation_prints_text_and_stats(capsys, fake_checkpoint, tmp_path):
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text(json.dumps({"prompt": "w5 w6 w7"}) + "\n\n" + json.dumps("w9") + "\n")
    text, report = run(capsys, "--prompt", "w1 w2 w3", "--prompts-file", str(prompts_file), "--strategy",
                       "self_speculative", "--exit-layer", "2",
                       "--draft-len", "3", "--max-new-tokens", "12", "--batch-size", "2", "--measure-speedup",
                       "--no-eos")
    assert report["prompts"] == 3 and report["strategy"] == "self_speculative"
    assert report["exit_layer"] == 2 and report["draft_len"] == 3
    assert report["generated_tokens"] == 36 and report["identical_to_autoregressive"] is True
    assert report["speedup"] > 0 and report["layer_evals_ratio"] > 0
    assert {"acceptance", "tokens_per_round", "layer_evals_per_token", "wall_s", "tokens_per_s"} <= set(report)
    expected = reference_greedy(fake_checkpoint, ids("w1 w2 w3"), 12)
    assert text[0] == "--- completion 0"
    assert text[1] == " ".join(["w1", "w2", "w3"] + [WORDS[t] for t in expected])
    assert text[4] == "--- completion 2" and text[5].startswith("w9 ")


def test_stop_strings_end_completions(capsys, fake_checkpoint):
    """--stop: each completion ends with the word completing the first stop string in its new text."""
    full = [WORDS[t] for t in reference_greedy(fake_checkpoint, ids("w1 w2 w3"), 12)]
    stop = " ".join(full[3:5])                    # two words, a few tokens in
    cut = next(k for k in range(1, 13) if stop in " ".join(full[:k]))
    assert cut < 12
    text, report = run(capsys, "--prompt", "w1 w2 w3", "--strategy", "self_speculative", "--exit-layer", "2",
                       "--draft-len", "4", "--max-new-tokens", "12", "--no-eos", "--stop", stop, "--stop", "zzz",
                       "--measure-speedup")
    assert text[1] == " ".join(["w1", "w2", "w3"] + full[:cut])
    assert report["generated_tokens"] == cut and report["identical_to_autoregressive"] is True


@pytest.mark.parametrize("extra", [["--strategy", "early_exit", "--exit-layer", "1"],
                                   ["--strategy", "autoregressive"],
                                   ["--strategy", "self_speculative", "--adaptive-draft", "--dynamic-exit",
                                    "--temperature", "0.8", "--top-k", "10",
                                    "--top-p", "0.9", "--seed", "3"]])
def test_strategies_and_options(capsys, fake_checkpoint, extra):
    text, report = run(capsys, "--prompt", "w1 w2", "--max-new-tokens", "6", *extra)
    assert len(text) == 2 and report["generated_tokens"] <= 6
    assert report["adaptive_draft"] == ("--adaptive-draft" in extra)


def test_auto_is_the_default_and_says_what_it_chose_and_why(capsys, fake_checkpoint):
    text, report = run(capsys, "--prompt", "w1 w2 w3", "--prompt", "w4", "--prompt", "w5 w6", "--max-new-tokens",
                       "12", "--exit-layer", "2", "--batch-size", "2", "--measure-speedup", "--no-eos")
    assert report["strategy"] == "auto" and report["identical_to_autoregressive"] is True
    assert len(report["auto"]) == 2                      # one decision per batch: 2 prompts, then 1
    first, last = report["auto"]
    assert [first["costs"]["batch"], last["costs"]["batch"]] == [2, 1]   # measured at each batch size
    assert report["chosen_strategy"] in {first["chosen"], "mixed"} and report["reason"] == last["reason"]
    for decision in report["auto"]:
        assert decision["exit_layer"] == 2 and decision["predicted_speedup"]["autoregressive"] == 1.0
        assert decision["positions_judged"] > 0 and 0 <= decision["acceptance"] <= 1
        costs = decision["costs"]   # the rest of a pass may be negative (calibrated); a plain step may not
        assert len(costs["block_s"]) == 9 and 6 * costs["block_s"][0] + costs["head_s"][0] + costs["step_s"] > 0
        assert decision["drafting_rounds"] + decision["autoregressive_steps"] > 0


def test_measured_costs_steer_the_dynamic_exit(capsys, fake_checkpoint):
    text, report = run(capsys, "--prompt", "w1 w2 w3", "--max-new-tokens", "10", "--strategy", "self_speculative",
                       "--dynamic-exit",
                       "--max-draft-len", "3", "--measure-costs", "--measure-speedup", "--no-eos")
    costs = report["decode_costs"]
    # γ from 1 to max(draft_len 4 (the default), max_draft_len 3), verified on γ+1 positions
    assert len(costs["block_s"]) == len(costs["head_s"]) == 5
    assert min(costs["block_s"]) > 0 and report["identical_to_autoregressive"] is True
    with pytest.raises(SystemExit) as err:
        cli.main(["--checkpoint", "unused", "--prompt", "w1", "--measure-costs"])
    assert err.value.code == 2 and "add --dynamic-exit" in capsys.readouterr().err


def test_errors_are_reported(capsys, fake_checkpoint, tmp_path):
    assert cli.main(["--checkpoint", "x"]) == 2
    assert "at least one --prompt" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"other": 1}\n')
    assert cli.main(["--checkpoint", "x", "--prompts-file", str(bad)]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err
    assert cli.main(["--checkpoint", "x", "--prompt", "w1", "--exit-layer", "9"]) == 2
    assert "exit_layer=9" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--strategy", "fastest"], "error: --strategy=fastest is not one of auto, autoregressive, early_exit, "
                                "self_speculative"),
    (["--adaptive-draft"], "error: --adaptive-draft and --dynamic-exit need --strategy self_speculative (not auto)"),
    (["--min-speedup", "0"], "error: --min-speedup=0.0 must be a finite number > 0"),
    (["--exit-layer", "0"], "error: --exit-layer=0 must be >= 1"),
    (["--strategy", "autoregressive", "--exit-layer", "0"], "error: --exit-layer=0 must be >= 1"),
    (["--draft-len", "0"], "error: --draft-len=0 must be >= 1"),
    (["--temperature", "nan"], "error: --temperature=nan must be a finite number >= 0 (0 = greedy)"),
    (["--temperature", "-0.5"], "error: --temperature=-0.5 must be a finite number >= 0 (0 = greedy)"),
    (["--top-p", "nan"], "error: --top-p=nan must be in (0, 1]"),
    (["--stop", ""], "error: --stop needs a non-empty string, got ['']"),
])
def test_bad_numbers_are_one_line_errors(capsys, fake_checkpoint, flags, message):
    """Given values are used as given or refused, never silently replaced by defaults."""
    assert cli.main(["--checkpoint", "x", "--prompt", "w1", *flags]) == 2
    err = capsys.readouterr().err
    assert err.strip() == message


def test_token_ids_outside_the_vocabulary_are_one_line_errors(capsys, fake_checkpoint, monkeypatch):
    monkeypatch.setattr(cli, "read_prompts", lambda args: ["w1"])
    from tokenizers import Tokenizer

    monkeypatch.setattr(Tokenizer, "encode", lambda self, text: type("E", (), {"ids": [3, 64]})())
    assert cli.main(["--checkpoint", "x", "--prompt", "w1"]) == 2
    assert capsys.readouterr().err.strip() == "error: prompt 0 holds token id 64, outside the model's vocabulary 0..63"


def test_hugging_face_directory(capsys, tokenizer_file, tmp_path):
    from pretrain import hf_interop as hf
    model = make_model()
    hf.save_hf_checkpoint(model, tmp_path / "hf", tokenizer_file=tokenizer_file, eos_token_id=0)
    code = cli.main(["--checkpoint", str(tmp_path / "hf"), "--prompt", "w1 w2 w3", "--max-new-tokens", "8",
                     "--exit-layer", "2", "--no-eos", "--device", "cpu"])
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0
    with torch.no_grad():
        expected = reference_greedy(model, ids("w1 w2 w3"), 8)
    assert out[1] == " ".join(["w1", "w2", "w3"] + [WORDS[t] for t in expected])


def test_tensor_parallel_under_torchrun_prints_the_single_process_output(capsys, tokenizer_file, tmp_path):
    """torchrun with 2 processes: the model is sharded TP=2 and only rank 0 prints the same
    completions and acceptance as one process."""
    from parallel_scripts.launch import torchrun_stdout

    from pretrain import hf_interop as hf
    hf.save_hf_checkpoint(make_model(), tmp_path / "hf", tokenizer_file=tokenizer_file, eos_token_id=0)
    argv = ["--checkpoint", str(tmp_path / "hf"), "--prompt", "w1 w2 w3", "--prompt", "w7", "--max-new-tokens",
            "10", "--strategy", "self_speculative", "--exit-layer", "2", "--draft-len", "3", "--no-eos", "--device",
            "cpu"]
    assert cli.main(argv) == 0
    single = capsys.readouterr().out.strip().splitlines()
    parallel = torchrun_stdout(2, ["-m", "pretrain.generate", *argv]).strip().splitlines()
    assert parallel[:-1] == single[:-1]                     # text, printed once
    got, expected = json.loads(parallel[-1]), json.loads(single[-1])
    for key in ("generated_tokens", "accepted", "drafted", "layer_evals_per_token"):
        assert got[key] == expected[key], key
    # the dynamic exit steered by measured costs: every rank uses rank 0's timings, so all choose the
    # same (E, γ) each round (diverging choices would desynchronise the collectives) and the text is exact
    steered = torchrun_stdout(2, ["-m", "pretrain.generate", *argv, "--dynamic-exit", "--max-draft-len", "4",
                                  "--measure-costs"]).strip().splitlines()
    assert steered[:-1] == single[:-1]
    assert len(json.loads(steered[-1])["decode_costs"]["block_s"]) == 5
