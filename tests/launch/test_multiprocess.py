"""One process against many: the synthetic smoke run as 2 processes of 2 CPU devices (through
launch/local.py and through `sbatch launch/slurm.sbatch` on a one-node Slurm cluster) logs the
values of 1 process holding 4 devices; SIGTERM to one process stops both at the same step with the
preempted status; SIGKILL of one ends the other; every interrupted run resumes (on 2 processes or
on 1) to the uninterrupted run's values.

Tolerance: relative 1e-5, absolute 2e-6. The absolute part is for values that are differences of
float32 sums of ~20 log-probs (rewards/*, logratio/mean): the batch is split over devices differently
(4 rows per device vs 8), the sums are rounded in another order, and their float32 unit in the last
place (2e-6 at 20) stays in the difference. Timings (tokens_per_s, mfu) are not compared.
"""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from dpo_jax import multihost

REPO = pathlib.Path(__file__).resolve().parents[2]
HELPERS = pathlib.Path(__file__).resolve().parent / "helpers"
SBATCH = REPO / "launch" / "slurm.sbatch"
RUN_ARGS = ["--config=configs/synthetic.py:runlocal=1", "--config.train.progress=False"]
TIMINGS = ("tokens_per_s", "mfu")
SFT_STEPS = 10  # runlocal: 10 SFT steps, then 10 preference steps, a checkpoint every 5
CPU_JOB = ["--nodes=1", "--ntasks=2", "--cpus-per-task=1", "--gpus-per-node=0", "--time=10",
           "--export=ALL,JAX_PLATFORMS=cpu,XLA_FLAGS=--xla_force_host_platform_device_count=2"]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JAX_", "TPU_"))}
    env.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join([str(REPO), str(HELPERS)]),
               PYTHON=sys.executable, **extra)  # PYTHON: the interpreter slurm.sbatch runs (this one)
    return env


def one_process(workdir, devices=4, *extra):
    """`python -m dpo_jax.main` as one process with `devices` CPU devices."""
    env = _env(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return subprocess.run([sys.executable, "-m", "dpo_jax.main", *RUN_ARGS, f"--workdir={workdir}", *extra],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)


def local_launch(workdir, *extra, module="dpo_jax.main", env=None, grace_s=60):
    """launch/local.py: 2 processes of 2 CPU devices each."""
    cmd = [sys.executable, "-m", "launch.local", "--processes=2", "--devices_per_process=2", f"--grace_s={grace_s}",
           f"--module={module}", "--", *RUN_ARGS, f"--workdir={workdir}", *extra]
    return subprocess.run(cmd, cwd=REPO, env=_env(**(env or {})), capture_output=True, text=True, timeout=600,
                          check=False)


def logged(workdir) -> list[tuple[int, str, list]]:
    """metrics.jsonl as (step, key, values in file order), timings left out."""
    rows = [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    by_key: dict = {}
    for row in rows:
        for key, value in row.items():
            if key != "step" and not key.endswith(TIMINGS):
                by_key.setdefault((row["step"], key), []).append(value)
    return sorted((step, key, values) for (step, key), values in by_key.items())


def assert_same_values(got_dir, want_dir):
    got, want = logged(got_dir), logged(want_dir)
    assert [(s, k, len(v)) for s, k, v in got] == [(s, k, len(v)) for s, k, v in want], \
        "logged steps, keys or row counts differ"
    for (step, key, a), (_, _, b) in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6, err_msg=f"step {step} {key}")
    assert len(want) >= 100  # every SFT, train and eval value and the final report


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The reference: one uninterrupted process with 4 devices."""
    workdir = tmp_path_factory.mktemp("single") / "run"
    done = one_process(workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    return workdir


def test_two_local_processes_log_what_one_process_logs(single, tmp_path):
    workdir = tmp_path / "run"
    done = local_launch(workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_values(workdir, single)
    info = json.loads((workdir / "run_info.json").read_text())
    assert info["process_count"] == 2 and info["devices"][-1] == "x4"
    assert done.stdout.count("dpo_jax: sigmoid for 10 steps") == 1  # only process 0 prints the summary
    assert (workdir / "final" / "config.json").exists() and (workdir / "report.json").exists()


def test_sigterm_to_one_process_stops_both_at_one_step_and_the_rerun_resumes(single, tmp_path):
    workdir = tmp_path / "run"
    t0 = time.monotonic()
    done = local_launch(workdir, module="signal_at_step", env=dict(
        TEST_SIGNAL=str(int(signal.SIGTERM)), TEST_SIGNAL_AT_CALL=str(SFT_STEPS + 3), TEST_SIGNAL_PROCESS="1",
        TEST_SIGNAL_THEN_SLEEP_S="3"))  # JAX's notifier looks once a second; the 7 steps left take less
    assert done.returncode == multihost.PREEMPTED_EXIT, done.stderr[-3000:]
    stops = re.findall(r"\[process (\d)/2\] train: preempted at step (\d+): checkpoint saved", done.stderr)
    assert sorted(p for p, _ in stops) == ["0", "1"] and len({s for _, s in stops}) == 1, done.stderr[-3000:]
    step = int(stops[0][1])
    assert 3 <= step < 10 and (workdir / "checkpoints" / str(step)).is_dir()
    assert time.monotonic() - t0 < 120  # the whole run, signal at step 3 and both exits included
    assert not (workdir / "report.json").exists()
    again = local_launch(workdir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert_same_values(workdir, single)


def test_sigkill_of_one_process_ends_the_other_and_one_process_resumes(single, tmp_path):
    workdir = tmp_path / "run"
    done = local_launch(workdir, "--config.distributed.heartbeat_timeout_s=5", module="signal_at_step",
                        grace_s=120, env=dict(TEST_SIGNAL=str(int(signal.SIGKILL)), TEST_SIGNAL_PROCESS="1",
                                              TEST_SIGNAL_AT_CALL=str(SFT_STEPS + 7),  # once checkpoint 5 is final
                                              TEST_SIGNAL_AFTER_PATH=str(workdir / "checkpoints" / "5")))
    statuses = dict(re.findall(r"launch.local: process (\d): (.*)", done.stderr))
    assert statuses["1"] == "killed by SIGKILL", done.stderr[-3000:]
    assert "grace period" not in statuses["0"], done.stderr[-3000:]  # it ended by itself, within the heartbeat timeout
    assert done.returncode not in (0, multihost.PREEMPTED_EXIT)
    assert "stopped sending heartbeats" in done.stderr or "task" in done.stderr.lower(), done.stderr[-3000:]
    assert (workdir / "checkpoints" / "5").is_dir()
    # The 2-process checkpoint resumes on one process of 4 devices (orbax reshards; the data position carries over).
    again = one_process(workdir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "written by 2 processes, on 1" in again.stderr
    assert_same_values(workdir, single)


def test_sbatch_two_tasks_log_what_one_process_logs(single, slurm_cluster, tmp_path):
    workdir, out = tmp_path / "run", tmp_path / "job.out"
    done = slurm_cluster.run(["sbatch", "--wait", *CPU_JOB, f"--output={out}", str(SBATCH), *RUN_ARGS,
                              f"--workdir={workdir}"], cwd=REPO, env=_env(), timeout=600)
    log = out.read_text() if out.exists() else ""
    assert done.returncode == 0, log[-3000:] + done.stderr
    assert_same_values(workdir, single)
    assert json.loads((workdir / "run_info.json").read_text())["process_count"] == 2
