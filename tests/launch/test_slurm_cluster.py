"""The one-node Slurm test cluster runs multi-task jobs, and launch/slurm.sbatch runs on it: two JAX
processes of two CPU devices each (a stand-in for dpo_jax.main, given as PYTHON), the requeue of a
preempted run (status 75), and a failure's status as the job's."""

import pathlib
import re
import sys
import textwrap

REPO = pathlib.Path(__file__).resolve().parents[2]
SBATCH = REPO / "launch" / "slurm.sbatch"
# 1 node, 2 tasks of 1 CPU and 2 JAX CPU devices each; no GPUs on the test cluster.
CPU_JOB = ["--nodes=1", "--ntasks=2", "--cpus-per-task=1", "--gpus-per-node=0", "--time=5",
           "--export=ALL,JAX_PLATFORMS=cpu,XLA_FLAGS=--xla_force_host_platform_device_count=2"]
RUN_ARGS = ["--config=configs/synthetic.py:runlocal=1", "--workdir=/tmp/unused", "--config.loss.name=it's"]

JAX_STANDIN = """
    import os, sys
    import jax, numpy as np
    from jax.experimental import multihost_utils
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize()
    ids = multihost_utils.process_allgather(np.int32(jax.process_index()))
    words = (jax.process_index(), jax.process_count(), jax.device_count(), jax.local_device_count(),
             os.environ["JAX_COORDINATOR_ADDRESS"], list(map(int, ids)), sys.argv[1:])
    with open(os.path.join(os.environ["STANDIN_OUT"], f"task{jax.process_index()}"), "w") as f:
        f.write(" ".join(map(str, words)))
"""

# Task i of attempt a exits with STATUSES.split("|")[a].split(",")[i] ("hang": sleeps instead).
STATUS_STANDIN = """
    import os, sys, time
    attempt, task = int(os.environ.get("SLURM_RESTART_COUNT", "0")), int(os.environ["SLURM_PROCID"])
    status = os.environ["STATUSES"].split("|")[attempt].split(",")[task]
    print(f"attempt {attempt} task {task}: {status}", flush=True)
    if status == "hang":
        time.sleep(120)
    sys.exit(int(status))
"""


def standin(tmp_path, body: str) -> pathlib.Path:
    """An executable run as `PYTHON -m dpo_jax.main ARGS`: the interpreter runs it with those args."""
    path = tmp_path / "python"
    path.write_text(f"#!{sys.executable}\n" + textwrap.dedent(body))
    path.chmod(0o755)
    return path


def sbatch(cluster, tmp_path, python, *, env=None, extra=()):
    """`sbatch --wait` launch/slurm.sbatch from the repository; returns (status, job output)."""
    out = tmp_path / "job.out"
    done = cluster.run(["sbatch", "--wait", *CPU_JOB, *extra, f"--output={out}", str(SBATCH), *RUN_ARGS],
                       cwd=REPO, env={"PYTHON": str(python), **(env or {})}, timeout=180)
    log = out.read_text() if out.exists() else ""
    return done.returncode, f"{log}\n{done.stderr}"


def test_two_tasks_run_under_srun(slurm_cluster, tmp_path):
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/bash\nsrun bash -c 'echo \"task $SLURM_PROCID of $SLURM_NTASKS pid $$\"'\n")
    out = tmp_path / "out.txt"
    done = slurm_cluster.run(["sbatch", "--wait", "--nodes=1", "--ntasks=2", f"--output={out}", str(script)],
                             timeout=120)
    assert done.returncode == 0, done.stderr + slurm_cluster.logs()
    lines = sorted(out.read_text().splitlines())
    assert [line.split(" pid ")[0] for line in lines] == ["task 0 of 2", "task 1 of 2"]
    assert len(set(lines)) == 2  # two processes


def test_sbatch_script_runs_two_jax_processes(slurm_cluster, tmp_path):
    status, log = sbatch(slurm_cluster, tmp_path, standin(tmp_path, JAX_STANDIN), env={"STANDIN_OUT": str(tmp_path)})
    assert status == 0, log + slurm_cluster.logs()
    for i in range(2):
        words = (tmp_path / f"task{i}").read_text().split(" ", 5)
        assert words[:4] == [str(i), "2", "4", "2"], words  # process i of 2; 4 devices, 2 of them here
        assert re.fullmatch(r"127\.0\.0\.1:\d+", words[4]), words  # the node's address
        assert words[5] == f"[0, 1] {['-m', 'dpo_jax.main', *RUN_ARGS]}", words  # allgather; arguments


def test_sbatch_script_requeues_a_preempted_run(slurm_cluster, tmp_path):
    status, log = sbatch(slurm_cluster, tmp_path, standin(tmp_path, STATUS_STANDIN), env={"STATUSES": "75,75|0,0"})
    assert status == 0, log + slurm_cluster.logs()
    assert sorted(re.findall(r"attempt \d task \d: \d+", log)) == [
        "attempt 0 task 0: 75", "attempt 0 task 1: 75", "attempt 1 task 0: 0", "attempt 1 task 1: 0"], log
    assert "requeueing job" in log


def test_sbatch_script_exits_with_a_failure_status(slurm_cluster, tmp_path):
    status, log = sbatch(slurm_cluster, tmp_path, standin(tmp_path, STATUS_STANDIN), env={"STATUSES": "0,3"})
    assert status == 3, log
    assert "requeue" not in log


def test_a_task_that_outlives_a_preempted_one_is_killed(slurm_cluster, tmp_path):
    status, log = sbatch(slurm_cluster, tmp_path, standin(tmp_path, STATUS_STANDIN),
                         env={"STATUSES": "75,hang", "SRUN_WAIT_S": "1"})
    assert status == 128 + 9, log  # srun's status is its tasks' highest: SIGKILL, not 75
    assert "requeue" not in log
