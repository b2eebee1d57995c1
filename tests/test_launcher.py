"""launch/torchrun.sh as a user runs it (issue 17 item 6, issue 20 item 2): it finds the
repository's .venv without an activated environment; two launches on one machine with the default
rendezvous do not meet; the launcher exits with the workers' 75 (not 1 with a traceback), also when
it is the one signalled (SIGHUP: the terminal closed)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN_SH = ROOT / "launch" / "torchrun.sh"
# the repository's .venv (make setup); a test run from another venv names it, as a user would
VENV = ROOT / ".venv" if (ROOT / ".venv" / "bin" / "python").exists() else Path(sys.prefix)


def env(**extra) -> dict:
    """No venv on PATH and no PYTHON: the script must find the repository's .venv itself."""
    out = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "RDZV_", "SLURM_"))}
    out.update(PATH="/usr/bin:/bin", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "tests" / "parallel_scripts"),
               **extra)
    if VENV != ROOT / ".venv":
        out["LAYERSKIP_VENV"] = str(VENV)
    out.pop("WORLD_SIZE", None)
    return out


def launch(tmp_path, **extra) -> subprocess.Popen:
    return subprocess.Popen([str(TORCHRUN_SH), "--nproc", "1", "--module", "exit_worker"], cwd=tmp_path,
                            env=env(**extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def worker_line(out: str) -> dict:
    return json.loads(next(l for l in out.splitlines() if l.startswith("WORKER {"))[len("WORKER "):])


def test_two_default_launches_on_one_machine_do_not_meet_and_use_the_venv(tmp_path):
    procs = [launch(tmp_path, WORKER_SLEEP="4") for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    workers = [worker_line(out) for out, _ in outs]
    assert [w["world_size"] for w in workers] == ["1", "1"]            # each its own world
    assert workers[0]["run_id"] != workers[1]["run_id"]
    assert all(os.path.realpath(w["python"]) == os.path.realpath(VENV / "bin" / "python") for w in workers)


def test_workers_exit_75_reaches_the_caller(tmp_path):
    proc = launch(tmp_path, WORKER_EXIT="75")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-3000:]
    assert "Traceback" not in err and "workers exited 75 (checkpoint written" in err, err[-3000:]


def test_sighup_to_the_launcher_reaches_the_workers_and_75_comes_back(tmp_path):
    ready = tmp_path / "ready"
    proc = launch(tmp_path, WORKER_READY=str(ready))
    deadline = time.monotonic() + 120
    while not ready.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.1)
    proc.send_signal(signal.SIGHUP)  # closing the terminal: torchrun itself is signalled
    out, err = proc.communicate(timeout=120)
    assert "WORKER got SIGHUP" in out
    assert proc.returncode == 75, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert "all 1 workers of this node left with exit code 75" in err


def test_exit_code_after_a_signal_is_the_workers_only_when_all_agree(tmp_path):
    from pretrain.operations.launcher import exit_code_after_signal, recorded_codes

    for name, code in (("0-0", "75"), ("0-1", "75"), ("1-0", "0"), ("1-1", "0"), ("junk", "x")):
        (tmp_path / name).write_text(code)
    assert sorted(recorded_codes(tmp_path)) == [0, 0]  # the newest round (restart 1) only
    term = int(signal.SIGTERM)
    assert exit_code_after_signal(term, [75, 75], 2)[0] == 75
    assert exit_code_after_signal(term, [75], None)[0] == 75
    for codes, nproc in (([75], 2), ([75, 76], 2), ([], None)):  # one was killed, or they disagree
        assert exit_code_after_signal(term, codes, nproc)[0] == 1  # below 75/76: srun reports the highest
