"""make gpu-check: the whole script on the CPU at toy sizes (what `make gpu-check DRY_RUN=1` runs), so
it cannot rot before a GPU is at hand; a failing or slow part is reported and the next one runs;
the device the `device`-marked tests run on."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import gpu_check
from bench.gpu_check import Part, identical_tokens, part_timeout, run_all
from device_plugin import DEVICE_ENV, MARKER, chosen_device
from pretrain.device import select_device

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "bench" / "results" / "gpu_check.md"


def test_makefile_target_runs_the_dry_run():
    if shutil.which("make") is None:
        pytest.skip("no make here")
    shown = subprocess.run(["make", "-n", "--no-print-directory", "gpu-check", "DRY_RUN=1",
                            "GPU_CHECK_ARGS=--work-dir W"], cwd=ROOT, capture_output=True, text=True).stdout
    assert re.search(r"-m bench\.gpu_check --dry-run --work-dir W$", shown, re.M), shown


def test_dry_run_writes_the_summary(tmp_path):
    before = COMMITTED.read_bytes() if COMMITTED.exists() else None
    out, work = tmp_path / "summary.md", tmp_path / "work"
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--dry-run", "--work-dir", str(work),
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**gpu_check.os.environ, "PYTHONPATH": str(ROOT)})
    text = out.read_text()
    assert proc.returncode == 0, text + proc.stderr[-2000:]
    assert "CPU dry run" in text and "no number here is a GPU result" in text
    rows = {m[0]: m[1] for m in re.findall(r"^\| (a|b|c\d|m|p) \| [^|]+ \| ([^|]+) \|", text, re.M)}
    assert rows == {k: "passed" for k in ("a", "b", "c1", "c2", "c3", "c4", "c5", "m", "p")}, text
    assert re.search(r"^\| m \|.*tp2: loss rel [0-9.e+-]+, [1-9]\d* graphs", text, re.M)   # compiled vs eager
    assert re.search(r"^\| a \|.*\| \d+ passed", text, re.M)               # the pytest count
    assert re.search(r"^\| b \|.*layerskip/plain \d", text, re.M)          # bench.mfu's numbers
    assert re.search(r"^\| c3 \|.*identical", text, re.M) and re.search(r"^\| c4 \|.*identical", text, re.M)
    for command in ("LAYERSKIP_TEST_DEVICE=cpu python -m pytest -m device", "python -m bench.mfu",
                    "python -m pretrain.train", "--compile reduce-overhead"):
        assert command in text
    for result in ("b/mfu.json", "c3/decoding_speedup.json", "c4/decoding_speedup.json", "m/compiled_layout.json"):
        assert (work / "results" / result).is_file()
    assert (work / "gpu_check.md").read_text() == text
    assert re.search(r"^\| p \| [^|]+ \| passed \|.*predicted [\d.]+ GiB, tracked", text, re.M)   # pretrain.plan
    assert (COMMITTED.read_bytes() if COMMITTED.exists() else None) == before   # committed results untouched


def test_a_failing_part_is_reported_and_the_next_ones_run(tmp_path):
    (tmp_path / "logs").mkdir()
    parts = [Part("x", "fails", 30, ["-c", "import sys; print('boom'); sys.exit(3)"]),
             Part("y", "too slow", 1, ["-c", "import time; time.sleep(30)"]),
             Part("z", "needs what is not there", 30, ["-c", "pass"], needs=tmp_path / "nothing"),
             Part("w", "fine", 30, ["-c", "print('ok')"]),
             Part("v", "after the budget", 30, ["-c", "pass"])]
    total = run_all(parts, budget_s=10, work=tmp_path, dry_run=True)
    assert [p.status for p in parts] == ["FAILED (exit 3)", "TIMEOUT after 1 s", "skipped: nothing missing",
                                         "passed", parts[4].status]
    assert "boom" in parts[0].result and (tmp_path / "logs" / "w.log").read_text() == "ok\n"
    assert total < 10


def test_part_time_limits():
    assert part_timeout(60, remaining_s=480, reserved_s=420) == 60      # on schedule: its own budget
    assert part_timeout(60, remaining_s=480, reserved_s=300) == 180     # earlier parts left time over
    assert part_timeout(60, remaining_s=30, reserved_s=300) == 30       # never past the overall budget


def test_refuses_without_an_accelerator_or_over_an_existing_directory(tmp_path, capsys):
    with pytest.raises(SystemExit):
        gpu_check.main(["--device", "cpu", "--work-dir", str(tmp_path / "new")])
    assert "no accelerator" in capsys.readouterr().err and not (tmp_path / "new").exists()
    with pytest.raises(SystemExit):
        gpu_check.main(["--dry-run", "--work-dir", str(tmp_path)])
    assert "exists" in capsys.readouterr().err


def test_device_tests_run_where_the_environment_says(monkeypatch, request):
    monkeypatch.delenv(DEVICE_ENV, raising=False)
    assert chosen_device() == torch.device("cpu")              # make test: unchanged, on the CPU
    monkeypatch.setenv(DEVICE_ENV, "auto")
    assert chosen_device() == select_device("auto")
    assert request.node.get_closest_marker(MARKER) is None     # no device fixture: not marked


def test_tests_taking_the_device_fixture_are_marked(device, request):
    assert request.node.get_closest_marker(MARKER) is not None
    assert torch.ones(2, device=device).sum().item() == 2


def test_identical_tokens_needs_a_configuration_both_decoding_runs_compared(tmp_path):
    def write(key, rows):
        (tmp_path / "results" / key).mkdir(parents=True, exist_ok=True)
        hf = [{"exit_layer": e, "draft_len": g, "identical_tokens": ok} for e, g, ok in rows]
        (tmp_path / "results" / key / "decoding_speedup.json").write_text(json.dumps({"hf": hf}))

    assert identical_tokens(tmp_path)[0].startswith("skipped")
    write("c3", [(2, 4, True), (3, 2, True)])
    write("c4", [(2, 4, True), (6, 4, True)])
    assert identical_tokens(tmp_path) == ("passed", "eager = reduce-overhead = transformers at E=2 γ=4")
    write("c4", [(3, 4, True)])                                   # nothing in common: unproven
    assert identical_tokens(tmp_path)[0] == "FAILED"
    write("c4", [(2, 4, True), (6, 4, False)])
    status, line = identical_tokens(tmp_path)
    assert status == "FAILED" and "transformers differs: c4 E=6 γ=4" in line
