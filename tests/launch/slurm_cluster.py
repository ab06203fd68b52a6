"""A one-node Slurm cluster on 127.0.0.1 for tests (Debian's slurm-wlm and munge packages).

    cluster = SlurmCluster.start()          # or the `slurm_cluster` fixture (tests/launch/conftest.py)
    cluster.run(["sbatch", "--wait", "job.sh"])   # any Slurm command, run with cluster.env
    cluster.stop()

Everything lives in one temporary directory: slurm.conf (`cluster.conf`), munged's key and socket,
the daemons' state, spool, pid and log files. munged runs as the munge user; slurmctld and slurmd
run as root (slurmd starts jobs as their submitter), so starting needs root. Ports are free ones
picked at start, so clusters can run side by side (one per pytest-xdist worker). The node is the
machine's short host name at NodeAddr=127.0.0.1 with max(2, CPU cores) CPUs. A requeued job starts
again after `requeue_delay_s` (Slurm's AuthInfo cred_expire). `stop` cancels the jobs and ends the
three daemons by the process ids started here.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from typing import Optional, Sequence

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "squeue", "scontrol", "scancel", "sinfo")
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
INSTALL_HINT = "apt-get install slurmctld slurmd slurm-client munge"


class ClusterUnavailable(RuntimeError):
    """The cluster cannot run here, or did not start (the message says why)."""


def unavailable() -> Optional[str]:
    """Why no cluster can start on this machine, or None."""
    missing = [b for b in (*DAEMONS, *CLIENTS, "setpriv") if shutil.which(b, path=SEARCH_PATH) is None]
    if missing:
        return f"Slurm/munge programs not found: {' '.join(missing)} ({INSTALL_HINT})"
    if os.geteuid() != 0:
        return "a Slurm test cluster needs root (slurmd starts jobs as their user)"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "no munge user (install the munge package)"
    return None


def free_ports(n: int) -> list[int]:
    """n distinct ports free on 127.0.0.1 right now."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def slurm_conf(root: pathlib.Path, host: str, cpus: int, ports: Sequence[int], requeue_delay_s: int) -> str:
    """slurm.conf of the one-node cluster whose files live under root."""
    return "\n".join([
        "ClusterName=dpotest",
        f"SlurmctldHost={host}(127.0.0.1)",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={root / 'munge' / 'munge.socket'},cred_expire={requeue_delay_s}",
        f"MailProg={shutil.which('true') or '/bin/true'}",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/none",
        "MpiDefault=none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU",
        "SlurmdParameters=config_overrides",
        "SchedulerParameters=sched_interval=1,bf_interval=1",
        "MinJobAge=4",
        "KillWait=5",
        "ReturnToService=2",
        f"SlurmctldPort={ports[0]}",
        f"SlurmdPort={ports[1]}",
        f"StateSaveLocation={root / 'state'}",
        f"SlurmdSpoolDir={root / 'spool'}",
        f"SlurmctldPidFile={root / 'slurmctld.pid'}",
        f"SlurmdPidFile={root / 'slurmd.pid'}",
        f"SlurmctldLogFile={root / 'slurmctld.log'}",
        f"SlurmdLogFile={root / 'slurmd.log'}",
        f"NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN",
        f"PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP",
        "",
    ])


@dataclasses.dataclass
class SlurmCluster:
    """A running cluster: `env` runs Slurm commands against it (SLURM_CONF, no inherited SLURM_*)."""

    root: pathlib.Path
    conf: pathlib.Path
    host: str
    cpus: int
    env: dict
    procs: dict = dataclasses.field(default_factory=dict)  # daemon name -> Popen

    @classmethod
    def start(cls, *, requeue_delay_s: int = 5, timeout_s: float = 30.0,
              parent: Optional[str] = None) -> "SlurmCluster":
        """Start munged, slurmctld and slurmd in a new temporary directory (under `parent`, default
        the system's) and wait until the node is idle; raises ClusterUnavailable."""
        reason = unavailable()
        if reason:
            raise ClusterUnavailable(reason)
        root = pathlib.Path(tempfile.mkdtemp(prefix="slurm-", dir=parent))
        root.chmod(0o755)  # munged (the munge user) reaches its socket through it
        host = socket.gethostname().split(".")[0]
        conf = root / "slurm.conf"
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        cluster = cls(root, conf, host, max(2, os.cpu_count() or 1), {**env, "SLURM_CONF": str(conf)})
        try:
            for sub in ("state", "spool"):
                (root / sub).mkdir()
            conf.write_text(slurm_conf(root, host, cluster.cpus, free_ports(2), requeue_delay_s))
            cluster._start_munged(timeout_s)
            cluster._spawn("slurmctld", "-D", "-c", "-f", str(conf))
            cluster._spawn("slurmd", "-D", "-c", "-N", host, "-f", str(conf))
            cluster._wait_idle(timeout_s)
        except BaseException as e:
            logs = cluster.logs()
            cluster.stop()
            if isinstance(e, ClusterUnavailable):
                raise ClusterUnavailable(f"{e}\n{logs}") from None
            raise
        return cluster

    def _spawn(self, daemon: str, *args: str, user: Optional[str] = None) -> None:
        """Run a daemon in the foreground of its own session; it gets SIGTERM should this process die."""
        as_user = [f"--reuid={user}", f"--regid={user}", "--init-groups"] if user else []
        argv = [shutil.which("setpriv", path=SEARCH_PATH), *as_user, "--pdeathsig=TERM",
                shutil.which(daemon, path=SEARCH_PATH), *args]
        with open(self.root / f"{daemon}.out", "wb") as out:
            self.procs[daemon] = subprocess.Popen(  # pylint: disable=consider-using-with
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def _start_munged(self, timeout_s: float) -> None:
        """munged as the munge user, with a fresh key and its socket under root/munge."""
        munge = pwd.getpwnam("munge")
        home = self.root / "munge"
        home.mkdir()
        home.chmod(0o755)  # munged wants its socket's directory open to everyone
        key = home / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        for path in (home, key):
            os.chown(path, munge.pw_uid, munge.pw_gid)
        sock = home / "munge.socket"
        self._spawn("munged", "-F", f"--socket={sock}", f"--key-file={key}", f"--pid-file={home / 'munged.pid'}",
                    f"--log-file={home / 'munged.log'}", f"--seed-file={home / 'munged.seed'}", user="munge")
        self._wait_for(lambda: sock.exists(), timeout_s, "munged did not create its socket")

    def _wait_idle(self, timeout_s: float) -> None:
        def idle():
            out = self.run(["sinfo", "--noheader", "--nodes", self.host, "--format=%T"], timeout=10)
            return out.returncode == 0 and out.stdout.strip() == "idle"
        self._wait_for(idle, timeout_s, f"node {self.host} did not become idle")

    def _wait_for(self, ready, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            dead = [name for name, p in self.procs.items() if p.poll() is not None]
            if dead:
                raise ClusterUnavailable(f"{what}: {', '.join(dead)} exited")
            if time.monotonic() > deadline:
                raise ClusterUnavailable(f"{what} within {timeout_s:.0f} s")
            time.sleep(0.1)

    def run(self, argv: Sequence[str], *, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
        """A command against this cluster (text output captured unless kwargs say otherwise)."""
        kwargs = {"capture_output": True, "text": True, "check": False, **kwargs}
        return subprocess.run(list(argv), env={**self.env, **kwargs.pop("env", {})}, timeout=timeout, **kwargs)

    def jobs(self) -> list[str]:
        """Ids of the jobs the controller still lists (pending, running, recently ended)."""
        out = self.run(["squeue", "--noheader", "--format=%i"], timeout=10)
        return out.stdout.split() if out.returncode == 0 else []

    def logs(self, lines: int = 15) -> str:
        """The last lines of each daemon's output and log file (for failure messages)."""
        parts = []
        for path in sorted([*self.root.glob("*.out"), *self.root.glob("*.log"), *self.root.glob("munge/*.log")]):
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path.name}\n" + "\n".join(tail))
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel every job, end the daemons started here (by process id) and remove the directory."""
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            self._cancel_jobs()
        for name in reversed(list(self.procs)):
            proc = self.procs[name]
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)

    def _cancel_jobs(self, timeout_s: float = 15.0) -> None:
        jobs = self.jobs()
        if jobs:
            self.run(["scancel", *jobs], timeout=10)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self._steps_running():
            time.sleep(0.2)

    def _steps_running(self) -> bool:
        """Whether a job step still runs: each keeps a socket HOST_JOB.STEP in the spool directory."""
        return any(p.name.startswith(f"{self.host}_") for p in (self.root / "spool").iterdir())

    def __enter__(self) -> "SlurmCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
