"""Downstream evaluation through lm-evaluation-harness (pretrain/downstream), offline on the local
tasks shipped in pretrain/downstream/tasks: the `layerskip` model against the harness's own HF
backend on an export of the same checkpoint, per-exit scores against an independent forward, every
decoding strategy against autoregressive decoding, both command lines, and bad input."""
import json
import math
import os

import pytest
import torch

pytest.importorskip("lm_eval")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from downstream_fixtures import LAYERS, MAX_LEN, build_checkpoints  # noqa: E402
from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from pretrain.downstream import LOCAL_TASKS, register  # noqa: E402
from pretrain.downstream.source import ModelSource  # noqa: E402
from pretrain.downstream.strategies import parse_strategy  # noqa: E402
from pretrain.downstream.sweep import run_sweep  # noqa: E402

TASKS = ["layerskip_tiny_mc", "layerskip_tiny_gen", "layerskip_tiny_ppl"]


@pytest.fixture(scope="module")
def checkpoints(prepared_data, tmp_path_factory, one_thread):
    return build_checkpoints(prepared_data, tmp_path_factory.mktemp("downstream"))


def _manager():
    return TaskManager(include_path=str(LOCAL_TASKS), include_defaults=False)


def _samples(model, model_args, limit=None):
    register()
    out = simple_evaluate(model=model, model_args=model_args, tasks=TASKS, task_manager=_manager(), limit=limit,
                          log_samples=True, bootstrap_iters=0, batch_size=3)
    return out["results"], out["samples"]


@pytest.fixture(scope="module")
def harness_runs(checkpoints):
    pytest.importorskip("accelerate")   # the harness's HF backend needs it (the dev extra has it)
    run, export = checkpoints
    ours = _samples("layerskip", f"checkpoint={run},device=cpu")
    hf = _samples("hf", f"pretrained={export},dtype=float32,device=cpu")
    return ours, hf


def test_loglikelihoods_match_the_harness_hf_backend(harness_runs):
    """Every request of the multiple-choice and rolling tasks: our last exit vs transformers on the
    export, 1e-4 relative; the same accuracies, and the same greedy strings."""
    (our_results, ours), (hf_results, hf) = harness_runs
    compared = 0
    for task in ("layerskip_tiny_mc", "layerskip_tiny_ppl"):
        assert len(ours[task]) == len(hf[task]) > 0
        for a, b in zip(sorted(ours[task], key=lambda s: s["doc_id"]), sorted(hf[task], key=lambda s: s["doc_id"])):
            for ra, rb in zip(a["resps"], b["resps"]):
                la, lb = (ra[0][0], rb[0][0]) if task == "layerskip_tiny_mc" else (ra[0], rb[0])
                assert math.isclose(la, lb, rel_tol=1e-4), (task, a["doc_id"], la, lb)
                if task == "layerskip_tiny_mc":
                    assert ra[0][1] == rb[0][1]
                compared += 1
    assert compared == 24 * 4 + 8
    assert our_results["layerskip_tiny_mc"]["acc,none"] == hf_results["layerskip_tiny_mc"]["acc,none"]
    assert our_results["layerskip_tiny_ppl"]["word_perplexity,none"] == pytest.approx(
        hf_results["layerskip_tiny_ppl"]["word_perplexity,none"], rel=1e-4)
    gen = lambda samples: [s["resps"][0][0] for s in sorted(samples["layerskip_tiny_gen"], key=lambda s: s["doc_id"])]  # noqa: E731
    assert gen(ours) == gen(hf)
    assert any(gen(ours)), "every generation empty: the comparison would be vacuous"


def test_scores_at_every_exit_equal_an_independent_forward(checkpoints):
    """The sweep's shared forward (all exits at once, batches with right padding) gives, at every
    exit E, what model.logits(tokens, exit_layer=E) gives for one unpadded request."""
    from pretrain.downstream.lm import LayerSkipLM

    run, _ = checkpoints
    source = ModelSource.open(run, torch.device("cpu"))
    cache = {}
    texts = [("def main(", "):\n    pass"), ("import", " os"), ("x = [1, 2", ", 3]"), ("class A", "(object):")]
    for exit_layer in range(1, LAYERS + 1):
        lm = LayerSkipLM(source=source, exit_layer=exit_layer, exits=list(range(1, LAYERS + 1)), cache=cache,
                         batch_size=3)
        requests = [((c, x), *lm._encode_pair(c, x)) for c, x in texts]
        got = lm._loglikelihood_tokens(requests)
        for (_, ctx, cont), (ll, greedy) in zip(requests, got):
            tokens = torch.tensor([ctx + cont[:-1]])
            logp = torch.log_softmax(source.model.logits(tokens, exit_layer=exit_layer)[0, -len(cont):].double(), -1)
            want = logp.gather(1, torch.tensor(cont)[:, None]).sum().item()
            assert ll == pytest.approx(want, rel=1e-5, abs=1e-5)
            assert greedy == bool((logp.argmax(-1) == torch.tensor(cont)).all())
    assert len({k[0] for k in cache}) == LAYERS   # every exit filled by the first sweep's forwards


def test_strategy_sweep_greedy_speculative_strings_equal_autoregressive(checkpoints):
    """Every strategy on the generation task: the speculative ones reproduce the autoregressive
    metric (their strings are the same), report acceptance and a speedup; early exit is its own."""
    run, _ = checkpoints
    source = ModelSource.open(run, torch.device("cpu"))
    strategies = [parse_strategy(s, LAYERS) for s in ("self_speculative:1:3", "adaptive:2:4", "dynamic:1:2",
                                                       "early_exit:2")]
    result = run_sweep(source, ["layerskip_tiny_gen", "layerskip_tiny_mc"], [2, LAYERS], strategies,
                       limit=12, batch_size=4, progress=lambda line: None)
    rows = result["strategies"]
    assert list(rows) == ["autoregressive", "self_speculative:1:3", "adaptive:2:4", "dynamic:1:2", "early_exit:2"]
    base = rows["autoregressive"]["tasks"]["layerskip_tiny_gen"]["value"]
    for label in ("self_speculative:1:3", "adaptive:2:4", "dynamic:1:2"):
        assert rows[label]["tasks"]["layerskip_tiny_gen"]["value"] == base
        assert 0 < rows[label]["acceptance"] <= 1 and rows[label]["speedup"] > 0
    assert rows["autoregressive"]["speedup"] == 1.0 and rows["early_exit:2"]["acceptance"] is None
    # the exit sweep's generation at exit 2 is early_exit:2's
    assert result["exits"][2]["layerskip_tiny_gen"]["value"] == rows["early_exit:2"]["tasks"]["layerskip_tiny_gen"]["value"]


def test_speculative_strings_equal_autoregressive_per_request(checkpoints):
    from lm_eval.api.instance import Instance

    from pretrain.downstream.lm import LayerSkipLM

    run, _ = checkpoints
    source = ModelSource.open(run, torch.device("cpu"))
    prompts = ["def main(", "import os\nimport", "class Foo(object):\n    def __init__(self", "for i in range("]
    requests = [Instance("generate_until", {}, (p, {"until": ["\n\n"], "max_gen_toks": 20, "do_sample": False}), i,
                         metadata=("t", i, 1)) for i, p in enumerate(prompts)]
    outs = {spec: LayerSkipLM(source=source, strategy=spec, batch_size=3).generate_until(requests)
            for spec in ("autoregressive", "self_speculative:1:3", "self_speculative:2:5", "dynamic:1:2")}
    assert all(out == outs["autoregressive"] for out in outs.values()), outs
    assert sum(len(s) for s in outs["autoregressive"]) > 20


def test_generation_stops_at_the_tasks_stop_strings(checkpoints):
    """generate_until ends each row at its `until` string instead of max_gen_toks later: the strings
    are those of decoding to max_gen_toks and cutting the text, with fewer tokens decoded."""
    from lm_eval.api.instance import Instance

    from pretrain.decoding import generate
    from pretrain.downstream.lm import LayerSkipLM

    run, _ = checkpoints
    source = ModelSource.open(run, torch.device("cpu"))
    prompts = ["def main(", "import os\nimport", "class Foo(object):\n    def __init__(self", "for i in range("]
    lm = LayerSkipLM(source=source, strategy="self_speculative:1:3", batch_size=2)
    full, _ = generate(source.model, [lm.tok_encode(p) for p in prompts], strategy="autoregressive",
                       max_new_tokens=24, eos_id=lm.eot_token_id)
    texts = [lm.tok_decode(tokens) for tokens in full]
    until = texts[1][4:6]                                      # a string the model writes, a few tokens in
    assert until.strip() and sum(until in t for t in texts) >= 1
    requests = [Instance("generate_until", {}, (p, {"until": [until], "max_gen_toks": 24, "do_sample": False}), i,
                         metadata=("t", i, 1)) for i, p in enumerate(prompts)]
    out = lm.generate_until(requests)
    assert out == [t.split(until)[0] for t in texts]
    assert lm.decode_stats.generated < sum(map(len, full))


def test_pretrain_eval_tasks_writes_table_eval_json_and_figure(checkpoints, capsys):
    from pretrain.eval import main

    run, _ = checkpoints
    (run / "eval.json").write_text(json.dumps({"exits": {"1": {"loss": 1.0}}, "step": 3}))
    args = ["--checkpoint", str(run), "--tasks", "layerskip_tiny_mc,layerskip_tiny_gen", "--exits", "1,all",
            "--limit", "6", "--strategies", "self_speculative:1:2", "--plot", "--wandb", "offline"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "W&B tables: " in out and list(run.glob("wandb/offline-run-*"))
    assert "layerskip_tiny_mc (acc)" in out and "self_speculative:1:2" in out and "4 (last)" in out
    saved = json.loads((run / "eval.json").read_text())
    assert saved["step"] == 3 and saved["exits"] == {"1": {"loss": 1.0}}   # the other keys kept
    downstream = saved["downstream"]
    assert set(downstream["exits"]) == {"1", "4"}
    mc = downstream["exits"]["4"]["layerskip_tiny_mc"]
    assert mc["metric"] == "acc,none" and 0 <= mc["value"] <= 1
    assert mc["stderr"] == pytest.approx(math.sqrt(mc["value"] * (1 - mc["value"]) / (6 - 1)))  # sample std / √n
    assert (run / "plots" / "downstream.png").stat().st_size > 1000
    from pretrain.downstream.report import table_rows

    rows = table_rows(downstream)   # the W&B table: one row per exit and task
    assert [(r[0], r[1]) for r in rows] == [(e, t) for e in (1, 4) for t in ("layerskip_tiny_gen", "layerskip_tiny_mc")]
    assert rows[-1][3:] == [mc["value"], mc["stderr"]]


@pytest.mark.parametrize("args, message", [
    (["--exits", "0,2"], "exit '0' is not in 1..4"),
    (["--exits", "5"], "exit '5' is not in 1..4"),
    (["--strategies", "self_speculative:4:2"], "draft exit 4 must be in 1..3"),
    (["--strategies", "medusa"], "unknown strategy 'medusa'"),
    (["--include-path", "/nonexistent/tasks"], "is not a directory"),
])
def test_bad_input_one_line_exit_2_before_loading(checkpoints, capsys, monkeypatch, args, message):
    from pretrain.downstream import source as source_module
    from pretrain.eval import main

    monkeypatch.setattr(source_module, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    run, _ = checkpoints
    assert main(["--checkpoint", str(run), "--tasks", "layerskip_tiny_mc", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err, err


def test_task_needing_more_context_than_the_model_has(checkpoints, capsys, monkeypatch, tmp_path):
    """A generation task asking for more new tokens than the model has positions, and a multiple-choice
    task with a context longer than them: one line, exit 2, no model loaded; --truncate accepts the latter."""
    from pretrain.downstream import source as source_module
    from pretrain.eval import main

    run, _ = checkpoints
    for name, text in (("long_gen", (LOCAL_TASKS / "layerskip_tiny_gen.yaml").read_text()
                        .replace("max_gen_toks: 12", f"max_gen_toks: {MAX_LEN + 1}")),
                       ("long_mc", (LOCAL_TASKS / "layerskip_tiny_mc.yaml").read_text()
                        .replace('doc_to_text: query', 'doc_to_text: "{{query * 60}}"'))):
        (tmp_path / f"{name}.yaml").write_text(text.replace("task: layerskip_tiny_", f"task: {name}_")
                                               .replace("!function local_json.load", "!function loader.load"))
    (tmp_path / "loader.py").write_text((LOCAL_TASKS / "local_json.py").read_text().replace(
        'HERE = Path(__file__).resolve().parent', f'HERE = Path({str(LOCAL_TASKS)!r})'))
    loaded = []
    real = source_module.load_model
    monkeypatch.setattr(source_module, "load_model", lambda *a, **k: loaded.append(1) or real(*a, **k))
    common = ["--checkpoint", str(run), "--include-path", str(tmp_path), "--limit", "4", "--wandb", "disabled",
              "--out", str(tmp_path / "eval.json")]
    assert main([*common, "--tasks", "long_gen_gen"]) == 2
    assert "max_gen_toks=65 new tokens do not fit the model's 64 positions" in capsys.readouterr().err
    assert main([*common, "--tasks", "long_mc_mc"]) == 2
    err = capsys.readouterr().err
    assert "task long_mc_mc: a request needs" in err and "--truncate" in err and not loaded
    assert main([*common, "--tasks", "long_mc_mc", "--truncate"]) == 0 and loaded


def test_eval_tasks_during_training_match_the_saved_checkpoint(prepared_data, tmp_path, one_thread):
    """eval.tasks runs the tasks at every exit at the final evaluation: eval.json's "downstream" and
    the metrics.jsonl record equal a sweep over the saved final checkpoint."""
    from test_trainer_loop import read_metrics, run_config

    from pretrain.trainer.loop import train

    run_dir = tmp_path / "run"
    train(run_config(prepared_data, run_dir, "train.steps=2", "eval.tasks=[layerskip_tiny_mc]", "eval.tasks_limit=6",
                     "eval.decode_prompts=0"))
    saved = json.loads((run_dir / "eval.json").read_text())["downstream"]
    source = ModelSource.open(run_dir, torch.device("cpu"))
    L = source.num_layers
    assert sorted(map(int, saved["exits"])) == list(range(1, L + 1))
    again = run_sweep(source, ["layerskip_tiny_mc"], list(range(1, L + 1)), limit=6, progress=lambda line: None)
    [record] = read_metrics(run_dir, kind="downstream")
    for e in range(1, L + 1):
        value = again["exits"][e]["layerskip_tiny_mc"]["value"]
        assert saved["exits"][str(e)]["layerskip_tiny_mc"]["value"] == value
        assert record[f"exit_{e}"]["layerskip_tiny_mc"] == value


def test_next_line_task_records_come_from_held_out_source_files(prepared_data, tmp_path, capsys):
    """Every record's context + true next line is a passage of a standard-library file; file distractors
    are other lines of that file, shuffled ones the same words reordered; --out is never overwritten."""
    from pretrain.data.corpus import stdlib_files
    from pretrain.downstream.next_line_task import main as build_main

    assert build_main(["--data-dir", str(prepared_data), "--out", str(tmp_path / "file"), "--records", "12"]) == 0
    assert build_main(["--data-dir", str(prepared_data), "--out", str(tmp_path / "shuffle"), "--records", "12",
                       "--distractors", "shuffle", "--name", "shuffled"]) == 0
    sources = [f.path.read_text() for f in stdlib_files()[:40]]   # what prepared_data was built from (--max-files 40)
    for kind in ("file", "shuffle"):
        records = [json.loads(line) for line in (tmp_path / kind / "records.jsonl").read_text().splitlines()]
        assert len(records) == 12
        for r in records:
            assert r["choices"][r["gold"]] == r["answer"] and len({c.strip() for c in r["choices"]}) == 4
            assert r["prompt"] + r["target"] == r["query"] + r["answer"] and not r["target"].startswith("  ")
            passage = r["query"] + r["answer"] + "\n"
            files = [s for s in sources if passage in s]
            assert files, passage
            for i, choice in enumerate(r["choices"]):
                if i == r["gold"]:
                    continue
                if kind == "file":
                    assert any(choice in s.split("\n") for s in files)
                else:
                    assert sorted(choice.split()) == sorted(r["answer"].split())
    assert "task: shuffled\n" in (tmp_path / "shuffle" / "shuffled.yaml").read_text()
    assert build_main(["--data-dir", str(prepared_data), "--out", str(tmp_path / "file")]) == 2
    assert "exists and is not empty" in capsys.readouterr().err


def test_task_whose_data_cannot_be_read_one_line_exit_2(checkpoints, tmp_path, capsys):
    """A task YAML pointing at a missing local copy (as a hub task without access): one line, exit 2."""
    from pretrain.eval import main

    (tmp_path / "gone.yaml").write_text((LOCAL_TASKS / "layerskip_tiny_mc.yaml").read_text()
                                        .replace("task: layerskip_tiny_mc", "task: gone")
                                        .replace("custom_dataset: !function local_json.load\n", "")
                                        .replace("test: tiny_mc.jsonl", f"test: {tmp_path / 'missing.jsonl'}"))
    run, _ = checkpoints
    assert main(["--checkpoint", str(run), "--tasks", "gone", "--include-path", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot load the data of task(s) gone: ") and "\n" not in err, err


def test_registering_keeps_the_harness_models():
    """The wrapper registers `layerskip` first thing in a fresh process: the harness's own models
    (hf, dummy, ...) must stay available (it fills its registry only when that is empty)."""
    import subprocess
    import sys

    code = ("from pretrain.downstream import register; register(); from lm_eval.api.registry import get_model; "
            "print(get_model('dummy').__name__, get_model('layerskip').__name__)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.stdout.split() == ["DummyLM", "LayerSkipLM"], proc.stderr[-2000:]


def test_startup_hook_makes_the_plain_harness_find_layerskip(tmp_path):
    """The .pth line `make setup` installs: in a fresh interpreter that processes it, the harness's
    own lookup finds `layerskip` beside its models, and nothing of ours (nor torch) is imported
    before the harness asks; a site directory without the file does not know the name."""
    import subprocess
    import sys

    from pretrain.downstream.harness_hook import PTH_FILE, main as hook_main

    assert hook_main(["install", str(tmp_path)]) == 0 and (tmp_path / PTH_FILE).is_file()
    probe = ("import site, sys; site.addsitedir(sys.argv[1]); before = 'torch' in sys.modules or 'pretrain' in sys.modules; "
             "from lm_eval.api.registry import get_model; names = []\n"
             "for n in ('hf', 'layerskip'):\n"
             "    try: names.append(get_model(n).__name__)\n"
             "    except ValueError: names.append('missing')\n"
             "print(before, *names)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    # -S: no site-packages .pth at start-up (make setup installs the same file there); the path is PYTHONPATH
    hooked = subprocess.run([sys.executable, "-S", "-c", probe, str(tmp_path)], capture_output=True, text=True,
                            timeout=300, env=env)
    assert hooked.stdout.split() == ["False", "HFLM", "LayerSkipLM"], hooked.stderr[-2000:]
    assert hook_main(["remove", str(tmp_path)]) == 0 and not (tmp_path / PTH_FILE).exists()
    plain = subprocess.run([sys.executable, "-S", "-c", probe, str(tmp_path)], capture_output=True, text=True,
                           timeout=300, env=env)
    assert plain.stdout.split() == ["False", "HFLM", "missing"], plain.stderr[-2000:]
