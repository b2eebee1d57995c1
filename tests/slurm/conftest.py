"""Fixtures of the Slurm suite: the local two-node cluster (started for the session and torn down
after it, unless one was up already), the same cluster as Slurm ships it (`default_preemption`),
the prepared data, and the single-process reference run."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cluster import Cluster, down, node_states, set_user_signal_on_preemption, up
from jobs import ROOT, RUN_ENABLED, overrides, train_losses


@pytest.fixture(scope="session")
def slurm_cluster():
    if not RUN_ENABLED:
        pytest.skip("LAYERSKIP_SLURM_TESTS=1 not set")
    if os.geteuid() != 0:
        pytest.fail("the Slurm suite needs root: it installs Debian packages and runs slurmd")
    cluster = Cluster()
    if cluster.record.exists() and not node_states():
        down(cluster)  # left by a session that died: its daemons are gone
    started = not cluster.record.exists()
    if started:
        up(cluster)
    yield cluster
    if started and os.environ.get("LAYERSKIP_SLURM_KEEP") != "1":
        down(cluster)


@pytest.fixture
def default_preemption(slurm_cluster):
    """The cluster as Slurm ships: no preempt_send_user_signal (preemption sends SIGTERM to every
    process of the step, W&B's service included, and no warning to the batch shell)."""
    set_user_signal_on_preemption(slurm_cluster, False)
    yield
    set_user_signal_on_preemption(slurm_cluster, True)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("slurm_data") / "stdlib"
    subprocess.run([sys.executable, "-m", "pretrain.data.prepare", "--out", str(out), "--max-files", "40",
                    "--vocab-size", "512", "--seq-len", "32"], check=True, capture_output=True, timeout=300,
                   cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"))
    return out


@pytest.fixture(scope="session")
def reference_losses(data_dir, tmp_path_factory) -> dict[int, float]:
    """The same training in one process, uninterrupted (the CLI, as a user runs it)."""
    run_dir = tmp_path_factory.mktemp("slurm_reference") / "run"
    proc = subprocess.run([sys.executable, "-m", "pretrain.train", *overrides(data_dir, run_dir)], cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", WANDB_MODE="disabled"),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return train_losses(run_dir)
