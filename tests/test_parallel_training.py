"""The real trainer entry (pretrain.trainer.loop.train) under parallel layouts, on prepared stdlib
data, against the single-process trainer: same losses at every step (DP2 / TP2 / PP2), checkpoints
that reshard (TP2×PP2 -> one process; DP2 -> DP4 -> DP2 with the data position kept), the
multi-node launcher (two torchrun "nodes" over loopback running the Hydra CLI, sharing one run
directory), and Hugging Face export of a checkpoint written under TP2×PP2."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from parallel_scripts.launch import ROOT, child_env, free_port, torchrun
from pretrain.config import to_run_config
from pretrain.trainer.loop import train

STEPS = 6
BASE = ["model=tiny", "train.seq_len=32", "train.global_batch_size=8", "train.micro_batch_size=2",
        "optim.lr=3e-3", "optim.warmup_steps=2", "logging.every=1", "logging.progress_bar=false",
        "logging.wandb.mode=disabled", "eval.batches=1", "eval.batch_size=4", "eval.decode_prompts=0",
        "layerskip.layer_dropout.p_max=0.5", "layerskip.early_exit.rotation_period=2",
        "train.device=cpu", f"train.steps={STEPS}"]


def overrides(data_dir, run_dir, *extra) -> list[str]:
    return BASE + [f"data.dir={data_dir}", f"run_dir={run_dir}", *extra]


def run_config(*args):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return to_run_config(compose(config_name="config", overrides=overrides(*args)))


def job(name, data_dir, run_dir, *extra) -> str:
    return f"{name}:" + ",".join(overrides(data_dir, run_dir, *extra))


def close(a: dict, b: dict, rtol=1e-5) -> bool:
    return sorted(a) == sorted(b) and all(abs(a[k] - b[k]) <= rtol * abs(b[k]) for k in b)


def metrics_losses(run_dir) -> dict:
    rows = [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {str(r["step"]): r["loss"] for r in rows if r["kind"] == "train"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, prepared_data):
    """All launches of this module, in dependency order; the tests check their parts."""
    tmp = tmp_path_factory.mktemp("ptrain")
    data = prepared_data
    out = {"tmp": tmp, "data": data}
    reference = train(run_config(data, tmp / "single", "train.peak_flops=1e12"))["losses"]
    out["single"] = {str(k): v for k, v in reference.items()}
    two = torchrun(2, "train_entry.py", [job("dp2", data, tmp / "dp2", "parallel.dp_shard=2"),
                   job("tp2", data, tmp / "tp2", "parallel.tp=2"),
                   job("pp2", data, tmp / "pp2", "parallel.pp=2", "parallel.pp_schedule=1F1B"),
                   job("dp2_part", data, tmp / "reshard_dp", "parallel.dp_shard=2", "train.stop_at_step=2")])
    four = torchrun(4, "train_entry.py", [job("tp2pp2_part", data, tmp / "reshard_tppp", "parallel.pp=2",
                                              "parallel.tp=2", "train.stop_at_step=3"),
                    job("dp4_part", data, tmp / "reshard_dp", "parallel.dp_shard=4", "train.stop_at_step=4")],
                    timeout=300)
    out.update({r["job"]: r["losses"] for r in two + four})
    out["tppp_then_single"] = {str(k): v for k, v in train(run_config(data, tmp / "reshard_tppp"))["losses"].items()}
    return out


def test_trainer_entry_matches_single_process(runs):
    for name in ("dp2", "tp2", "pp2"):
        assert close(runs[name], runs["single"]), (name, runs[name], runs["single"])
    first = json.loads((runs["tmp"] / "single" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["tflops_per_s"] > 0 and 0 < first["mfu"] < 1  # train.peak_flops set: MFU logged
    for name in ("dp2", "tp2", "pp2"):
        run_dir = runs["tmp"] / name
        assert "mfu" not in json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
        assert (run_dir / "eval.json").is_file()  # evaluated on the model gathered on rank 0
        assert (run_dir / "checkpoints" / f"step_{STEPS:08d}").is_dir()


def test_checkpoint_from_tp2_pp2_resumes_in_one_process(runs):
    part, rest = runs["tp2pp2_part"], runs["tppp_then_single"]
    assert sorted(part) == ["0", "1", "2"] and sorted(rest) == ["3", "4", "5"]
    assert close({**part, **rest}, runs["single"])


def test_dp2_to_dp4_and_back_over_two_launcher_nodes(runs):
    """DP2 for 2 steps, DP4 for 2 more, then launch/torchrun.sh as two 'nodes' (c10d rendezvous
    on 127.0.0.1) with DP2 through the Hydra CLI for the rest: one run directory, same losses."""
    run_dir = runs["tmp"] / "reshard_dp"
    assert sorted(runs["dp2_part"]) == ["0", "1"] and sorted(runs["dp4_part"]) == ["2", "3"]
    port = free_port()
    env = dict(child_env(), PYTHON=sys.executable)
    cli = overrides(runs["data"], run_dir, "parallel.dp_shard=2")
    nodes = [subprocess.Popen(["bash", str(ROOT / "launch" / "torchrun.sh"), "--nproc", "1", "--nnodes", "2",
                               "--node-rank", str(rank), "--endpoint", f"127.0.0.1:{port}",
                               "--run-id", f"test{port}", "--", *cli],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in (0, 1)]
    logs = [n.communicate(timeout=240)[0] for n in nodes]
    assert all(n.returncode == 0 for n in nodes), "\n".join(l[-3000:] for l in logs)
    assert close(metrics_losses(run_dir), runs["single"])
    assert (run_dir / "hydra" / "overrides.yaml").is_file() and not (ROOT / "outputs").exists()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir())[-1] == f"step_{STEPS:08d}"


def test_hf_export_from_a_tp2_pp2_checkpoint(runs, tmp_path):
    """The distributed checkpoint loads into one process (DCP reshards) and exports to the HF layout."""
    from pretrain.model_loading import load_model
    from pretrain.hf_interop import load_hf_checkpoint, save_hf_checkpoint

    ckpt = runs["tmp"] / "reshard_tppp" / "checkpoints" / "step_00000003"
    model, _ = load_model(ckpt)
    save_hf_checkpoint(model, tmp_path / "hf")
    back, _ = load_hf_checkpoint(tmp_path / "hf")
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(back.logits(tokens), model.logits(tokens))
