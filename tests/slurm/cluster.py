"""A real Slurm cluster of two nodes on this one machine, for the tests of launch/slurm.sbatch.

    python tests/slurm/cluster.py up      # install the Debian packages if missing, configure, start
    python tests/slurm/cluster.py status  # sinfo / squeue
    python tests/slurm/cluster.py down    # stop what `up` started, restore /etc/hosts and slurm.conf

Needs root and Debian packages (slurmctld slurmd slurm-client munge; `apt-get` installs them).
Every node is a slurmd on 127.0.0.1 with its own port, started in its own UTS namespace so that
`hostname` inside a job says n1, n2, ... Two partitions share the nodes: `low` (the default;
preemptable: REQUEUE after GraceTime) and `high` (preempts `low`). All state, spool, pid and log
files live under one scratch directory; `down` removes it, ends only the daemons whose pid files
`up` wrote (munged only if `up` started it), and restores /etc/hosts and /etc/slurm/slurm.conf
exactly as they were (a record of what `up` changed is kept in the scratch directory).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
BINARIES = ("slurmctld", "slurmd", "sbatch", "munged")
SLURM_CONF = Path("/etc/slurm/slurm.conf")
HOSTS = Path("/etc/hosts")
HOSTS_TAG = "# layerskip slurm test cluster"
MUNGE_KEY = Path("/etc/munge/munge.key")
MUNGE_RUN = Path("/run/munge")
CTLD_PORT = 16817
FIRST_SLURMD_PORT = 16818


@dataclass(frozen=True)
class Cluster:
    scratch: Path = Path("/var/tmp/layerskip-slurm")
    nodes: int = 2
    grace_s: int = 30  # GraceTime of the preemptable partition
    # SlurmctldParameters=preempt_send_user_signal: the job's --signal also reaches a preempted job.
    # Slurm's default is without it (preemption then sends SIGTERM to every process of the step);
    # `set_user_signal_on_preemption` switches it on a running cluster.
    user_signal_on_preemption: bool = True

    @property
    def node_names(self) -> list[str]:
        return [f"n{i + 1}" for i in range(self.nodes)]

    @property
    def record(self) -> Path:
        return self.scratch / "changes.json"

    @property
    def log_dir(self) -> Path:
        return self.scratch / "log"


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, text=True, capture_output=True, **kwargs)


def require_root() -> None:
    if os.geteuid() != 0:
        raise SystemExit("the local Slurm cluster needs root (slurmd runs as root)")


def ensure_packages() -> None:
    """apt-get install the Debian packages unless their programs are there already."""
    if all(shutil.which(b) for b in BINARIES):
        return
    if not shutil.which("apt-get"):
        raise SystemExit(f"need the Debian packages {' '.join(PACKAGES)} (no apt-get here)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    run(["apt-get", "update", "-qq"], env=env, timeout=600)
    run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES], env=env, timeout=900)


def munge_works() -> bool:
    cred = subprocess.run(["munge", "-n"], capture_output=True)
    if cred.returncode != 0:
        return False
    return subprocess.run(["unmunge"], input=cred.stdout, capture_output=True).returncode == 0


def start_munge() -> bool:
    """Start munged as user munge unless one already answers; True when this call started it."""
    if munge_works():
        return False
    if not MUNGE_KEY.is_file():
        MUNGE_KEY.parent.mkdir(parents=True, exist_ok=True)
        MUNGE_KEY.write_bytes(os.urandom(1024))
        shutil.chown(MUNGE_KEY, "munge", "munge")
        MUNGE_KEY.chmod(0o400)
    MUNGE_RUN.mkdir(parents=True, exist_ok=True)
    shutil.chown(MUNGE_RUN, "munge", "munge")
    run(["runuser", "-u", "munge", "--", "munged"])
    wait_for(munge_works, 20, "munged to answer")
    return True


def node_hardware() -> dict[str, int]:
    """CPUs, sockets, cores and memory of this machine as slurmd sees them."""
    text = run(["slurmd", "-C"]).stdout
    fields = dict(re.findall(r"(\w+)=(\d+)", text))
    return {k: int(fields[k]) for k in ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket",
                                        "ThreadsPerCore", "RealMemory")}


def slurm_conf(c: Cluster, hw: dict[str, int]) -> str:
    s = c.scratch
    memory = hw["RealMemory"] // c.nodes
    node_lines = [
        f"NodeName={name} NodeAddr=127.0.0.1 Port={FIRST_SLURMD_PORT + i} CPUs={hw['CPUs']} "
        f"Boards={hw['Boards']} SocketsPerBoard={hw['SocketsPerBoard']} CoresPerSocket={hw['CoresPerSocket']} "
        f"ThreadsPerCore={hw['ThreadsPerCore']} RealMemory={memory} State=UNKNOWN"
        for i, name in enumerate(c.node_names)]
    nodes = ",".join(c.node_names)
    return "\n".join([
        "# Written by tests/slurm/cluster.py (a test cluster on one machine); `down` restores the previous file.",
        "ClusterName=layerskiptest",
        "SlurmctldHost=localhost",
        f"SlurmctldPort={CTLD_PORT}",
        "AuthType=auth/munge",
        # a requeued job may start again within seconds (the default credential life is minutes)
        "AuthInfo=cred_expire=10",
        "SlurmUser=slurm",
        f"StateSaveLocation={s}/state",
        f"SlurmdSpoolDir={s}/spool/%n",
        f"SlurmctldPidFile={s}/run/slurmctld.pid",
        f"SlurmdPidFile={s}/run/slurmd-%n.pid",
        f"SlurmctldLogFile={s}/log/slurmctld.log",
        f"SlurmdLogFile={s}/log/slurmd-%n.log",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "MpiDefault=none",
        "ReturnToService=2",
        "JobRequeue=1",
        "KillWait=5",
        "InactiveLimit=0",
        "MinJobAge=3600",
        "SchedulerParameters=bf_interval=5",
        "PreemptType=preempt/partition_prio",
        "PreemptMode=REQUEUE",
        # the job's --signal also reaches a preempted job, not only one at its time limit
        *(["SlurmctldParameters=preempt_send_user_signal"] if c.user_signal_on_preemption else []),
        *node_lines,
        f"PartitionName=low Nodes={nodes} Default=YES PriorityTier=1 PreemptMode=REQUEUE "
        f"GraceTime={c.grace_s} MaxTime=INFINITE State=UP",
        f"PartitionName=high Nodes={nodes} PriorityTier=10 PreemptMode=OFF MaxTime=INFINITE State=UP",
        ""])


def wait_for(predicate, timeout_s: float, what: str, interval: float = 0.5) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(interval)


def node_states() -> list[str]:
    proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True)
    return proc.stdout.split() if proc.returncode == 0 else []


def all_idle(c: Cluster) -> bool:
    states = node_states()
    # one line per node and partition
    return len(states) == 2 * c.nodes and all(s == "idle" for s in states)


def up(c: Cluster) -> None:
    require_root()
    if c.record.exists():
        raise SystemExit(f"{c.record} exists: a cluster is up already (run `down` first)")
    ensure_packages()
    try:
        start(c)
    except BaseException:
        down(c)
        raise


def start(c: Cluster) -> None:
    for sub in ("state", "spool", "run", "log"):
        (c.scratch / sub).mkdir(parents=True, exist_ok=True)
    for sub in ("state", "log"):
        shutil.chown(c.scratch / sub, "slurm", "slurm")
    changes: dict = {"conf_backup": None, "conf_written": False, "hosts_line": None, "munged": False}
    save = lambda: c.record.write_text(json.dumps(changes))  # noqa: E731
    save()
    changes["munged"] = start_munge()
    save()
    if SLURM_CONF.exists():
        backup = c.scratch / "slurm.conf.before"
        shutil.copy2(SLURM_CONF, backup)
        changes["conf_backup"] = str(backup)
    SLURM_CONF.parent.mkdir(parents=True, exist_ok=True)
    SLURM_CONF.write_text(slurm_conf(c, node_hardware()))
    changes["conf_written"] = True
    save()
    line = f"127.0.0.1 {' '.join(c.node_names)} {HOSTS_TAG}"
    with HOSTS.open("a") as f:
        f.write(line + "\n")
    changes["hosts_line"] = line
    save()
    run(["slurmctld"])
    for name in c.node_names:
        run(["unshare", "--uts", "sh", "-c", f"hostname {name} && exec slurmd -N {name}"])
    wait_for(lambda: all_idle(c), 60, f"nodes {c.node_names} to be idle (see {c.log_dir})")


def set_user_signal_on_preemption(c: Cluster, on: bool) -> Cluster:
    """Rewrite slurm.conf of the running cluster with or without preempt_send_user_signal and make
    slurmctld read it again; returns the cluster as now configured."""
    c = Cluster(scratch=c.scratch, nodes=c.nodes, grace_s=c.grace_s, user_signal_on_preemption=on)
    SLURM_CONF.write_text(slurm_conf(c, node_hardware()))
    run(["scontrol", "reconfigure"])
    wait_for(lambda: ("preempt_send_user_signal" in run(["scontrol", "show", "config"]).stdout) == on, 30,
             f"slurmctld to {'set' if on else 'drop'} preempt_send_user_signal")
    return c


def stop_daemon(pid_file: Path) -> None:
    if not pid_file.is_file():
        return
    try:
        pid = int(pid_file.read_text().split()[0])
    except (ValueError, IndexError):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)


def down(c: Cluster) -> None:
    """Undo `up`: cancel jobs, stop the daemons by their pid files, restore the system files."""
    require_root()
    if not c.record.exists():
        return
    changes = json.loads(c.record.read_text())
    subprocess.run(["scancel", "--full", "--user=root"], capture_output=True)
    for name in c.node_names:
        stop_daemon(c.scratch / "run" / f"slurmd-{name}.pid")
    stop_daemon(c.scratch / "run" / "slurmctld.pid")
    if changes.get("munged"):
        stop_daemon(MUNGE_RUN / "munged.pid")
    if changes.get("hosts_line"):
        lines = HOSTS.read_text().splitlines(keepends=True)
        HOSTS.write_text("".join(l for l in lines if l.rstrip("\n") != changes["hosts_line"]))
    if changes.get("conf_written"):
        if changes.get("conf_backup"):
            shutil.copy2(changes["conf_backup"], SLURM_CONF)
        else:
            SLURM_CONF.unlink(missing_ok=True)
    shutil.rmtree(c.scratch)


def status() -> str:
    return "\n".join(subprocess.run(cmd, capture_output=True, text=True).stdout
                     for cmd in (["sinfo"], ["squeue"]))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("action", choices=["up", "down", "status"])
    p.add_argument("--scratch", type=Path, default=Cluster.scratch)
    p.add_argument("--nodes", type=int, default=Cluster.nodes)
    p.add_argument("--grace", type=int, default=Cluster.grace_s, help="GraceTime of partition low, s")
    a = p.parse_args(argv)
    c = Cluster(scratch=a.scratch, nodes=a.nodes, grace_s=a.grace)
    if a.action == "up":
        up(c)
        print(status())
    elif a.action == "down":
        down(c)
    else:
        print(status())


if __name__ == "__main__":
    main(sys.argv[1:])
