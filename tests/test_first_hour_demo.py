"""`make demo` as a new user types it, in a fresh copy of the repository (issue 20 item 1), at toy
sizes through DEMO_DATA_FLAGS / DEMO_ARGS: the first run trains and ends with one summary line
whose `pretrain.generate` command works as printed; typed again it starts the finished demo over
(a file the user put in the run directory stays); after an interruption it resumes; over a run
it did not start it refuses with one line and changes nothing. The per-exit table appears once."""
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA_FLAGS = "--max-files 12 --vocab-size 300 --seq-len 32 --val-fraction 0.1"
ARGS = ("model=tiny train.steps=4 train.seq_len=32 train.global_batch_size=4 train.micro_batch_size=2 "
        "eval.batches=1 eval.batch_size=2 eval.decode_prompts=0 logging.wandb.mode=disabled "
        "logging.progress_bar=false logging.every=2")


@pytest.fixture(scope="module")
def fresh_clone(tmp_path_factory):
    """The repository's files (tracked and new, as `git clone` would give them) in a new directory,
    with the venv `make setup` would have made."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    dest = tmp_path_factory.mktemp("clone")
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.split("\n")
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file() and not src.is_symlink():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    (dest / ".venv").symlink_to(Path(sys.executable).parents[1])
    return dest


def make_demo(clone: Path, args: str = ARGS) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(clone), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    # -o: the venv counts as made (make setup would install into it)
    return subprocess.run(["make", "-s", "-o", ".venv/.installed", "demo", f"DEMO_DATA_FLAGS={DATA_FLAGS}",
                           f"DEMO_ARGS={args}"], cwd=clone, env=env, capture_output=True, text=True, timeout=600)


def test_make_demo_works_every_time_it_is_typed(fresh_clone):
    run_dir = fresh_clone / "runs" / "demo"
    first = make_demo(fresh_clone)
    assert first.returncode == 0, first.stdout + first.stderr
    lines = first.stdout.strip().splitlines()
    assert "demo: a new run in runs/demo (4 steps)" in lines
    assert first.stdout.count("best self-speculative config") == 1  # the per-exit table once
    assert first.stdout.count("run runs/demo: starts from scratch") == 1  # the start-up summary
    assert lines[-1].startswith("demo done: steps 0->4 of 4 in ") and "run dir runs/demo" in lines[-1]
    command = shlex.split(lines[-1].split("try: ", 1)[1])
    assert command[:3] == [".venv/bin/python", "-m", "pretrain.generate"]
    generated = subprocess.run([*command, "--max-new-tokens", "4"], cwd=fresh_clone, capture_output=True, text=True,
                               timeout=300, env={**os.environ, "PYTHONPATH": str(fresh_clone)})
    assert generated.returncode == 0, generated.stderr



def demo_in_process(clone: Path, monkeypatch, capsys, args: str = ARGS) -> tuple[int, str]:
    """pretrain.demo as make demo runs it, in this process (the start-up of a new one costs
    seconds): (exit code, stdout)."""
    from pretrain.demo import main

    monkeypatch.chdir(clone)
    capsys.readouterr()
    try:
        main(args.split())
        code = 0
    except SystemExit as leave:
        code = leave.code
    return code, capsys.readouterr().out


def test_make_demo_again_starts_over_resumes_or_refuses(fresh_clone, monkeypatch, capsys):
    run_dir = fresh_clone / "runs" / "demo"
    if not (run_dir / "eval.json").is_file():  # the first test made it; alone, make it here
        assert make_demo(fresh_clone).returncode == 0
    (run_dir / "my_notes.txt").write_text("mine")
    code, out = demo_in_process(fresh_clone, monkeypatch, capsys)
    assert code == 0 and out.startswith("demo: runs/demo holds a finished demo (4 steps); starting over"), out
    assert "demo done: steps 0->4 of 4" in out and out.count("best self-speculative config") == 1
    assert (run_dir / "my_notes.txt").read_text() == "mine"

    # interrupted (as by Ctrl-C: a checkpoint at step 2, no final evaluation): the demo resumes
    code, out = demo_in_process(fresh_clone, monkeypatch, capsys, ARGS + " train.stop_at_step=2")
    assert code == 0 and "demo paused (`make demo` continues from step 2)" in out, out
    code, out = demo_in_process(fresh_clone, monkeypatch, capsys)
    assert code == 0 and out.startswith("demo: resuming the interrupted demo in runs/demo from step 2 of 4"), out
    assert "demo done: steps 2->4 of 4" in out and "run runs/demo: resumes from " in out

    # a run the demo did not start (other overrides recorded): refused with one line, nothing touched
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    code, out = demo_in_process(fresh_clone, monkeypatch, capsys, ARGS.replace("train.steps=4", "train.steps=5"))
    assert code == 2 and out.count("\n") == 1 and "the demo did not start" in out
    assert "pretrain.train preset=demo model=tiny train.steps=4" in out  # how to resume it
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_plan_demo_reads_the_run_directory_only(tmp_path):
    """A run the old Makefile started (preset=demo checkpoint.resume=none) is the demo's; one with no
    recorded overrides is not; per-invocation keys do not make another run."""
    from pretrain.demo import plan_demo

    run_dir = tmp_path / "demo"
    assert plan_demo(run_dir, ["preset=demo"], 300).action == "new"
    (run_dir / "checkpoints" / "step_00000050").mkdir(parents=True)
    refused = plan_demo(run_dir, ["preset=demo"], 300)
    assert refused.action == "refuse" and "its overrides are not recorded" in refused.message
    (run_dir / "hydra").mkdir()
    (run_dir / "hydra" / "overrides.yaml").write_text("- preset=demo\n- checkpoint.resume=none\n")
    resumed = plan_demo(run_dir, ["preset=demo"], 300)
    assert (resumed.action, resumed.step) == ("resume", 50)
    assert plan_demo(run_dir, ["preset=demo", "train.stop_at_step=10"], 300).action == "resume"
    (run_dir / "eval.json").write_text(json.dumps({"step": 299}))
    assert plan_demo(run_dir, ["preset=demo"], 300).action == "restart"
    assert plan_demo(run_dir, ["preset=demo", "train.steps=600"], 600).action == "refuse"
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoints", "eval.json", "hydra"]  # nothing written
