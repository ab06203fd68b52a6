"""launch.local: the environment of each process, SIGTERM / SIGINT passed on, the exit-status rule,
and the kill after the grace period. The processes are a stand-in module (--module) that records
its environment and exits as told: `--do=A,B,...`, one item per process: `S` (exit S), `S@T`
(exit S after T seconds), `signal` (wait for SIGTERM / SIGINT, then exit 75), `hang` (ignore
SIGTERM, sleep)."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from launch import local

REPO = pathlib.Path(__file__).resolve().parents[2]

STANDIN = """
    import json, os, signal, sys, time
    i, out = int(os.environ["JAX_PROCESS_ID"]), os.environ["STANDIN_OUT"]
    def write(name, value):
        with open(os.path.join(out, f"{name}{i}.tmp"), "w") as f:
            json.dump(value, f)
        os.replace(os.path.join(out, f"{name}{i}.tmp"), os.path.join(out, f"{name}{i}"))
    def on_signal(signum, _):
        write("signal", signal.Signals(signum).name)
        sys.exit(75)
    do = [a for a in sys.argv[1:] if a.startswith("--do=")][0][5:].split(",")[i]
    signal.signal(signal.SIGTERM, signal.SIG_IGN if do == "hang" else on_signal)
    signal.signal(signal.SIGINT, on_signal)
    write("env", {"env": {k: v for k, v in os.environ.items() if k.startswith(("JAX_", "XLA_"))}, "argv": sys.argv[1:]})
    if do in ("signal", "hang"):
        time.sleep(60)
        sys.exit(9)
    status, _, delay = do.partition("@")
    time.sleep(float(delay or 0))
    sys.exit(int(status))
"""


@pytest.fixture
def launcher(tmp_path):
    """Popen of `python -m launch.local ARGS -- --do=...` with the stand-in; its records in tmp_path."""
    (tmp_path / "standin.py").write_text(textwrap.dedent(STANDIN))
    env = {**os.environ, "STANDIN_OUT": str(tmp_path),
           "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO), os.environ.get("PYTHONPATH", "")])}

    def start(*args, run_args=(), drop=(), **extra_env):
        argv = [sys.executable, "-m", "launch.local", "--module=standin", *args, "--", *run_args]
        proc_env = {k: v for k, v in {**env, **extra_env}.items() if k not in drop}
        return subprocess.Popen(argv, cwd=REPO, env=proc_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    return start


def finish(proc, timeout=30):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def records(tmp_path, name, n):
    return [json.loads((tmp_path / f"{name}{i}").read_text()) for i in range(n)]


def test_each_process_gets_its_place_in_the_job(launcher, tmp_path):
    args = ["--do=0,0,0", "--config=c.py:x", "--config.note=it's a b"]
    proc = launcher("--processes=3", "--devices_per_process=2", "--port=23456", run_args=args,
                    XLA_FLAGS="--xla_cpu_enable_fast_math=false --xla_force_host_platform_device_count=8")
    status, _, err = finish(proc)
    assert status == 0, err
    seen = records(tmp_path, "env", 3)
    for i, rec in enumerate(seen):
        assert rec["argv"] == args
        assert rec["env"]["JAX_COORDINATOR_ADDRESS"] == "127.0.0.1:23456"
        assert rec["env"]["JAX_COORDINATOR_BIND_ADDRESS"] == "127.0.0.1:23456"
        assert (rec["env"]["JAX_NUM_PROCESSES"], rec["env"]["JAX_PROCESS_ID"]) == ("3", str(i))
        assert rec["env"]["XLA_FLAGS"] == "--xla_cpu_enable_fast_math=false --xla_force_host_platform_device_count=2"
    assert "exit status 0" in err


def test_platform_defaults_to_cpu_and_the_port_to_a_free_one(launcher, tmp_path):
    status, _, err = finish(launcher("--processes=2", run_args=["--do=0,0"], drop=("JAX_PLATFORMS", "XLA_FLAGS")))
    assert status == 0, err
    envs = [rec["env"] for rec in records(tmp_path, "env", 2)]
    assert [e["JAX_PLATFORMS"] for e in envs] == ["cpu", "cpu"]
    assert [e["XLA_FLAGS"] for e in envs] == ["--xla_force_host_platform_device_count=2"] * 2
    assert envs[0]["JAX_COORDINATOR_ADDRESS"] == envs[1]["JAX_COORDINATOR_ADDRESS"] != "127.0.0.1:0"
    kept = launcher("--processes=1", run_args=["--do=0"], JAX_PLATFORMS="cuda,cpu")
    assert finish(kept)[0] == 0
    assert records(tmp_path, "env", 1)[0]["env"]["JAX_PLATFORMS"] == "cuda,cpu"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_signals_are_passed_to_every_process(launcher, tmp_path, signum):
    proc = launcher("--processes=2", run_args=["--do=signal,signal"])
    deadline = time.monotonic() + 20
    while not all((tmp_path / f"env{i}").exists() for i in range(2)):  # both have their handlers
        assert time.monotonic() < deadline and proc.poll() is None, "the processes did not start"
        time.sleep(0.05)
    proc.send_signal(signum)
    status, _, err = finish(proc)
    assert status == 75, err  # every process preempted
    assert records(tmp_path, "signal", 2) == [signum.name] * 2
    assert err.count("exit status 75 (preempted)") == 2


@pytest.mark.parametrize("do,expected", [
    ("0,0", 0), ("75,75", 75), ("0,75", 75),
    ("75,3@0.3", 3),     # a failure beats a preemption
    ("4@0.8,3@0.1", 3),  # the first failure, in exit order
])
def test_exit_status_rule(launcher, do, expected):
    status, _, err = finish(launcher("--processes=2", run_args=[f"--do={do}"]))
    assert status == expected, err
    assert err.count("launch.local: process ") == 2 and f"exit status {expected}\n" in err


def test_exit_status_of_statuses():
    assert local.exit_status([0, 0]) == 0
    assert local.exit_status([75, 0, 75]) == 75
    assert local.exit_status([75, 137, 1]) == 137
    assert local.shell_status(-9) == 137 and local.shell_status(3) == 3


def test_the_others_are_killed_after_the_grace_period(launcher):
    t0 = time.monotonic()
    status, _, err = finish(launcher("--processes=2", "--grace_s=0.5", run_args=["--do=1,hang"]))
    assert status == 1, err
    assert time.monotonic() - t0 < 20
    assert "process 1: killed by SIGKILL (still running after the grace period)" in err
    # A preempted process and a peer that hangs: not a clean preemption.
    status, _, err = finish(launcher("--processes=2", "--grace_s=0.5", run_args=["--do=75,hang"]))
    assert status == 128 + signal.SIGKILL, err


def test_the_others_get_the_grace_period(launcher):
    status, _, err = finish(launcher("--processes=2", "--grace_s=10", run_args=["--do=1,0@1"]))
    assert status == 1, err
    assert "process 1: exit status 0" in err  # it finished in time, not killed


def test_usage_errors():
    with pytest.raises(SystemExit):
        local.main(["--processes=2"])  # no run arguments
    with pytest.raises(SystemExit):
        local.main(["--processes=0", "--", "--config=c.py"])
    assert local.with_device_count("", 4) == "--xla_force_host_platform_device_count=4"
