"""A throw-away single-node SLURM cluster for tests (Debian's slurm-wlm and munge)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

CONF = """ClusterName=bidsdenoise-test
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=localhost NodeAddr=127.0.0.1 CPUs=2 RealMemory=8000 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def available() -> str | None:
    """None if a cluster can be started here, else why not."""
    for tool in ("slurmctld", "slurmd", "munged", "sbatch", "squeue", "sinfo"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            return f"{tool} is not installed"
    if os.geteuid() != 0:
        return "starting slurmd needs root"
    if not Path("/etc/munge/munge.key").exists():
        return "no munge key"
    return None


class Cluster:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.conf = self.root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self.pids = []

    def start(self, timeout=60):
        for folder in ("state", "spool"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(CONF.format(root=self.root, ctld_port=_free_port(), d_port=_free_port()))
        self._start_munge()
        subprocess.run(["/usr/sbin/slurmctld", "-f", str(self.conf)], env=self.env, check=True, timeout=30)
        subprocess.run(["/usr/sbin/slurmd", "-N", "localhost", "-f", str(self.conf)], env=self.env, check=True,
                       timeout=30)
        for name in ("slurmctld.pid", "slurmd.pid"):
            self._remember(self.root / name)
        deadline = time.time() + timeout
        while time.time() < deadline:
            state = subprocess.run(["sinfo", "-h", "-o", "%T"], env=self.env, capture_output=True, text=True)
            if state.stdout.strip() in ("idle", "mixed"):
                return self
            time.sleep(0.3)
        raise RuntimeError(f"SLURM node never became idle: {state.stdout} {state.stderr}")

    def _start_munge(self):
        running = subprocess.run(["pgrep", "-x", "munged"], capture_output=True)
        if running.returncode == 0:
            return  # a munged is already serving the default socket
        for folder in ("/run/munge", "/var/log/munge", "/var/lib/munge"):
            Path(folder).mkdir(parents=True, exist_ok=True)
            shutil.chown(folder, "munge", "munge")
        pidfile = Path("/run/munge/munged.pid")
        subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged", "--force"], check=True, timeout=30)
        for _ in range(50):
            if pidfile.exists():
                self._remember(pidfile)
                return
            time.sleep(0.1)

    def _remember(self, pidfile: Path):
        for _ in range(50):
            if pidfile.exists() and pidfile.read_text().strip():
                self.pids.append(int(pidfile.read_text().split()[0]))
                return
            time.sleep(0.1)

    def wait_for_jobs(self, timeout=600):
        """Wait until no job is queued or running."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            queue = subprocess.run(["squeue", "-h"], env=self.env, capture_output=True, text=True)
            if queue.returncode == 0 and not queue.stdout.strip():
                return
            time.sleep(1)
        raise TimeoutError("SLURM jobs did not finish in time")

    def stop(self):
        for pid in reversed(self.pids):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
        for pid in self.pids:
            for _ in range(50):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
