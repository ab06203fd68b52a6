"""The notebooks run top to bottom on small parameters and draw their figures.

Each notebook is executed with nbclient in a `python3` kernel, with small parameters injected as a
cell right after its first cell (tagged `parameters`, as papermill does). A cell that raises fails
the test. The committed notebooks must carry no outputs."""

import os
import pathlib

import nbformat
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
KERNEL = "python3"


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
    """os.environ for the kernel: the repository importable (configs, launch, dpo_jax) and a
    `python3` kernelspec of this interpreter if none is installed (a bare virtualenv)."""
    from jupyter_client.kernelspec import KernelSpecManager

    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    if KERNEL not in KernelSpecManager().find_kernel_specs():
        from ipykernel import kernelspec

        prefix = tmp_path_factory.mktemp("kernel")
        kernelspec.install(kernel_name=KERNEL, prefix=str(prefix))
        env["JUPYTER_PATH"] = os.pathsep.join(filter(None, [str(prefix / "share" / "jupyter"),
                                                            os.environ.get("JUPYTER_PATH")]))
    return env


def execute(name: str, params: dict, cwd: pathlib.Path, env: dict) -> nbformat.NotebookNode:
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    first = nb.cells[0]
    assert first.cell_type == "code" and "parameters" in first.metadata.get("tags", []), \
        f"{name}: the first cell must be the code cell tagged 'parameters'"
    injected = "\n".join(f"{k} = {v!r}" for k, v in params.items())
    nb.cells.insert(1, nbformat.v4.new_code_cell(injected, metadata={"tags": ["injected-parameters"]}))
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        NotebookClient(nb, kernel_name=KERNEL, timeout=600, resources={"metadata": {"path": str(cwd)}}).execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return nb


def images(nb) -> int:
    return sum("image/png" in out.get("data", {}) for cell in nb.cells if cell.cell_type == "code"
               for out in cell.get("outputs", []))


@pytest.mark.parametrize("name", sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")))
def test_committed_without_outputs(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{name}: cell {i} has outputs; strip them"


def test_loss_geometry(tmp_path, kernel_env):
    out = tmp_path / "figures"
    nb = execute("loss_geometry.ipynb", {"n_points": 201, "out_dir": str(out)}, tmp_path, kernel_env)
    assert (out / "loss_geometry_margin.png").stat().st_size > 0
    assert (out / "loss_geometry_slice.png").stat().st_size > 0
    assert images(nb) >= 2
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "hinge" in text and "ipo" in text


def test_exact_optimum(tmp_path, kernel_env):
    out = tmp_path / "figures"
    nb = execute("exact_optimum.ipynb", {"steps": 400, "world_samples": 500, "out_dir": str(out)}, tmp_path,
                 kernel_env)
    for fig in ("exact_optimum_convergence.png", "exact_optimum_policies.png", "exact_optimum_partition.png",
                "exact_optimum_markov.png"):
        assert (out / fig).stat().st_size > 0, fig
    assert images(nb) >= 4


def test_beta_sweep_runs_then_reads(tmp_path, kernel_env):
    """Runs a two-member sweep in-process, then reads the same root back without training."""
    out, root = tmp_path / "figures", tmp_path / "sweep"
    small = {"train.steps": 2, "sft.steps": 0, "train.export_final": False, "train.checkpoint_every": 0,
             "train.progress": False, "eval.num_prompts": 8, "eval.samples_per_prompt": 2}
    nb = execute("beta_sweep.ipynb", {"root": str(root), "betas": [0.5, 2.0], "overrides": small,
                                      "out_dir": str(out)}, tmp_path, kernel_env)
    assert sorted(p.name for p in root.iterdir() if (p / "report.json").exists()) == \
        ["loss.name=sigmoid,loss.beta=0.5", "loss.name=sigmoid,loss.beta=2.0"]
    assert (root / "manifest.json").exists() and (out / "beta_sweep_reward_kl.png").stat().st_size > 0
    assert images(nb) >= 2
    again = execute("beta_sweep.ipynb", {"sweep_root": str(root), "out_dir": str(tmp_path / "again")}, tmp_path,
                    kernel_env)
    assert (tmp_path / "again" / "beta_sweep_reward_kl.png").stat().st_size > 0 and images(again) >= 2
