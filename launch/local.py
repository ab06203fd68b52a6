"""Several dpo_jax processes on this machine, one program as on a cluster (CPU devices by default).

  python -m launch.local --processes=2 --devices_per_process=2 [--port=P] [--grace_s=60] \
      -- --config=configs/synthetic.py --workdir=/tmp/run [--config.key=value ...]

Starts `--processes` copies of `python -m dpo_jax.main ARGS` (ARGS: everything after `--`), process
i with JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT (a free port unless --port; the coordinator listens on
127.0.0.1 only), JAX_NUM_PROCESSES=N, JAX_PROCESS_ID=i (read by
dpo_jax.multihost.maybe_initialize_distributed), XLA_FLAGS with
--xla_force_host_platform_device_count=D (replacing any such flag already there), and
JAX_PLATFORMS=cpu unless it is set. The processes write to this terminal as they are (their logs
carry their process index).

SIGTERM and SIGINT are passed on to every process (a run saves a checkpoint and exits 75). Once a
process has exited with a non-zero status the others get --grace_s seconds to exit too, then they
are killed. Exit status: 0 when every process exited 0; 75 (preempted: run the same command again to
resume) when every non-zero status is 75; else the first other status, in exit order (128+N for a
process killed by signal N). Each process's status is reported on stderr.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Optional, Sequence

from dpo_jax import multihost

PREEMPTED = multihost.PREEMPTED_EXIT  # dpo_jax.main: checkpoint saved, run the same command again to resume
HOST = "127.0.0.1"
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
FORWARDED = (signal.SIGTERM, signal.SIGINT)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def with_device_count(xla_flags: str, devices: int) -> str:
    """XLA_FLAGS with `devices` host-platform devices (any earlier count removed)."""
    kept = [f for f in xla_flags.split() if f.split("=", 1)[0] != DEVICE_COUNT_FLAG]
    return " ".join([*kept, f"{DEVICE_COUNT_FLAG}={devices}"])


def process_env(base: dict, index: int, processes: int, devices: int, port: int) -> dict:
    """The environment of process `index` of `processes`."""
    env = dict(base)
    env.update(JAX_COORDINATOR_ADDRESS=f"{HOST}:{port}", JAX_COORDINATOR_BIND_ADDRESS=f"{HOST}:{port}",
               JAX_NUM_PROCESSES=str(processes), JAX_PROCESS_ID=str(index),
               XLA_FLAGS=with_device_count(env.get("XLA_FLAGS", ""), devices))
    env.setdefault("JAX_PLATFORMS", "cpu")
    return env


def shell_status(returncode: int) -> int:
    """A Popen return code as a shell reports it: 128+N for a process killed by signal N."""
    return 128 - returncode if returncode < 0 else returncode


def exit_status(statuses: Sequence[int]) -> int:
    """0 when all are 0; 75 when every non-zero one is 75; else the first other one (exit order)."""
    failures = [s for s in statuses if s not in (0, PREEMPTED)]
    if failures:
        return failures[0]
    return PREEMPTED if PREEMPTED in statuses else 0


def describe(returncode: int, killed: bool) -> str:
    """How a process ended, in words."""
    if returncode < 0:
        try:
            how = f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            how = f"killed by signal {-returncode}"
        return how + (" (still running after the grace period)" if killed else "")
    return f"exit status {returncode}" + (" (preempted)" if returncode == PREEMPTED else "")


def start(command: Sequence[str], processes: int, devices: int, port: int, procs: list) -> None:
    """Start the processes into `procs`, each in its own session (a signal reaches it once: from here)."""
    for i in range(processes):
        env = process_env(os.environ, i, processes, devices, port)
        proc = subprocess.Popen(list(command), env=env, start_new_session=True)  # pylint: disable=consider-using-with
        procs.append(proc)


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL to the process and anything it started in its session."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def supervise(procs: Sequence[subprocess.Popen], grace_s: float, poll_s: float = 0.05) -> list[tuple[int, int]]:
    """Wait for every process; once one has failed, kill those still running after grace_s.
    Returns (index, returncode) in exit order, and reports each on stderr."""
    exited: list[tuple[int, int]] = []
    running, killed = set(range(len(procs))), set()
    deadline: Optional[float] = None
    while running:
        for i in sorted(running):
            if procs[i].poll() is not None:
                running.discard(i)
                exited.append((i, procs[i].returncode))
                print(f"launch.local: process {i}: {describe(procs[i].returncode, i in killed)}", file=sys.stderr)
                if procs[i].returncode != 0 and deadline is None:
                    deadline = time.monotonic() + grace_s
        if deadline is not None and time.monotonic() >= deadline:
            for i in running - killed:
                killed.add(i)
                kill(procs[i])
        time.sleep(poll_s)
    return exited


def launch(command: Sequence[str], processes: int, devices: int, port: int, grace_s: float) -> int:
    """Run the processes to the end, passing SIGTERM / SIGINT on; returns the exit status."""
    procs: list[subprocess.Popen] = []

    def forward(signum, _frame):
        for proc in procs:
            if proc.returncode is None:
                proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in FORWARDED}
    try:
        start(command, processes, devices, port, procs)
        exited = supervise(procs, grace_s)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for proc in procs:
            if proc.poll() is None:
                kill(proc)
                proc.wait()
    status = exit_status([shell_status(rc) for _, rc in exited])
    print(f"launch.local: {processes} processes, exit status {status}", file=sys.stderr)
    return status


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ours, run_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(prog="python -m launch.local", description=__doc__.split("\n\n")[0],
                                usage="%(prog)s [--processes N] [--devices_per_process D] [--port P] "
                                      "[--grace_s S] -- --config=FILE --workdir=DIR [--config.key=value ...]")
    p.add_argument("--processes", type=int, default=2, help="processes to start (default 2)")
    p.add_argument("--devices_per_process", type=int, default=2, help="CPU devices of each process (default 2)")
    p.add_argument("--port", type=int, default=0, help="the coordinator's port on 127.0.0.1 (default: a free one)")
    p.add_argument("--grace_s", type=float, default=60.0,
                   help="seconds the others get to exit once one has failed, before they are killed (default 60)")
    p.add_argument("--module", default="dpo_jax.main", help=argparse.SUPPRESS)  # tests run a stand-in
    a = p.parse_args(ours)
    if a.processes < 1 or a.devices_per_process < 1 or a.grace_s < 0:
        p.error("--processes and --devices_per_process must be >= 1, --grace_s >= 0")
    if not run_args:
        p.error("give the run's arguments after --, e.g. -- --config=configs/synthetic.py --workdir=/tmp/run")
    command = [sys.executable, "-m", a.module, *run_args]
    return launch(command, a.processes, a.devices_per_process, a.port or free_port(), a.grace_s)


if __name__ == "__main__":
    sys.exit(main())
