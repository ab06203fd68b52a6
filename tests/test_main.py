"""The command line: an unknown `--config.<key>` is one line naming it and the nearest valid key."""

import os
import pathlib
import subprocess
import sys

import pytest

from configs import base, common

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_unknown_config_key_is_one_line_and_exit_status_2(tmp_path):
    workdir = tmp_path / "run"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    p = subprocess.run([sys.executable, "-m", "dpo_jax.main", "--config=configs/synthetic.py", f"--workdir={workdir}",
                        "--config.train.stepz=3"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr
    last = [line for line in p.stderr.splitlines() if line.strip()][-1]
    assert "train.stepz" in last and "train.steps" in last, p.stderr
    assert "Traceback" not in p.stderr
    assert not workdir.exists()


@pytest.mark.parametrize("argv, expected", [
    (["main", "--config=c.py:steps=5", "--config.train.steps=3", "--noconfig.train.progress"],
     ("c.py:steps=5", ["train.steps", "train.progress"])),
    (["main", "-config", "c.py", "--config.loss.beta", "0.5", "--workdir=/w"], ("c.py", ["loss.beta"])),
    (["main", "--workdir=/w"], (None, [])),
])
def test_command_line_overrides(argv, expected):
    assert common.command_line_overrides(argv) == expected


def test_check_keys_names_the_nearest_key():
    c = base.get_config()
    common.check_keys(c, ["train.steps", "model.arch", "model.arch.num_heads", "mesh.shape.data"])
    with pytest.raises(ValueError, match=r"^--config\.trian\.steps: unknown config key 'trian\.steps'; "
                                         r"did you mean --config\.train\.steps\?$"):
        common.check_keys(c, ["train.steps", "trian.steps"])
    with pytest.raises(ValueError, match=r"^--config\.zzzz: .*configs/base\.py$"):
        common.check_keys(c, ["zzzz"])
