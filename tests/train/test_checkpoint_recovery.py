"""Checkpoint recovery: a damaged newest step is moved aside and the previous intact one restored
(six kinds of damage, and a non-finite state), the target mismatches that move nothing, non-finite
saves refused, temporary directories removed on open, background save errors raised as one
CheckpointError, and the real runner resuming past a damaged step to the uninterrupted result."""

import glob
import json
import logging
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from orbax.checkpoint._src.checkpointers import async_checkpointer

from dpo_jax.train import checkpoint
from dpo_jax.train.checkpoint import CheckpointError, Checkpointer, TargetMismatch, abstract_target
from tests.train.test_checkpoint import assert_bitwise_equal, make_iterator, make_state

# A failed TensorStore read can complete after orbax closed its event loop: "Event loop is closed",
# reported as unraisable; the failure itself is what the tests look at.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

# ---------------------------------------------------------------------- damage, one kind each


def _truncate_array_file(step_dir):
    """Every OCDBT data file under state/ (the array bytes) cut to half its length. Orbax keeps
    the same bytes both in the merged state/d/ and in a per-process ocdbt.process_N/d/, and which
    copy a restore reads is not fixed, so cutting one file alone is not always damage."""
    files = glob.glob(str(step_dir / "state" / "**" / "d" / "*"), recursive=True)
    assert files, f"no OCDBT data files under {step_dir / 'state'}"
    for name in files:
        with open(name, "r+b") as f:
            f.truncate(os.path.getsize(name) // 2)


def _empty(path):
    open(path, "w").close()


def _empty_state_dir(step_dir):
    shutil.rmtree(step_dir / "state")
    (step_dir / "state").mkdir()


DAMAGE = {
    "truncated_array_file": _truncate_array_file,
    "empty_metadata": lambda d: _empty(d / "state" / "_METADATA"),
    "empty_manifest": lambda d: _empty(d / "state" / "manifest.ocdbt"),
    "missing_iterator_state": lambda d: os.remove(d / "data" / "process_0-of-1.json"),
    "garbled_iterator_state": lambda d: (d / "data" / "process_0-of-1.json").write_text('{"next_index": '),
    "empty_state_dir": _empty_state_dir,
}


def _save_two_steps(directory):
    """Steps 1 and 2 of distinct states and iterator positions (1 and 2 batches read); returns
    step 1's state and the batch a resume from step 1 reads next."""
    it = make_iterator()
    next(it)
    one, two = make_state(seed=1), make_state(seed=2)
    with Checkpointer(directory) as ckpt:
        ckpt.save(1, one, it, extra={"at": 1}, force=True)
        after_one = next(it)
        ckpt.save(2, two, it, extra={"at": 2}, force=True)
    return one, after_one


def _files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_newest_step_is_moved_aside_and_previous_restored(tmp_path, caplog, kind):
    one, after_one = _save_two_steps(tmp_path)
    DAMAGE[kind](tmp_path / "2")
    files_of_two = _files(tmp_path / "2")
    fresh = make_iterator()
    with caplog.at_level(logging.WARNING), Checkpointer(tmp_path) as ckpt:
        step, state, extra = ckpt.restore_latest(abstract_target(one), fresh)
        assert ckpt.all_steps() == [1] and ckpt.latest_step() == 1
    assert (step, extra) == (1, {"at": 1})
    assert_bitwise_equal(state, one)
    np.testing.assert_array_equal(next(fresh), after_one)  # the position of step 1
    moved = list((tmp_path / "corrupt").iterdir())
    assert len(moved) == 1 and moved[0].name.startswith("2-"), moved
    assert not (tmp_path / "2").exists() and _files(moved[0]) == files_of_two  # moved, files and all
    warnings = [r.getMessage() for r in caplog.records
                if r.levelno == logging.WARNING and "is damaged" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert warnings[0].startswith(f"checkpoint step 2 is damaged; moved to {moved[0]} ("), warnings[0]
    assert warnings[0].endswith("); using step 1"), warnings[0]


def test_nonfinite_state_on_disk_is_damage_and_never_saved(tmp_path, monkeypatch, caplog):
    one, _ = _save_two_steps(tmp_path)
    nan = make_state(seed=3)
    nan = nan.replace(params={**nan.params, "mlp": {**nan.params["mlp"], "b_F": jnp.full((16,), jnp.nan)}})
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(ValueError, match=r"step=3: state\.params\['mlp'\]\['b_F'\] holds a non-finite value.*"
                                             r"not saved"):
            ckpt.save(3, nan, force=True)
        assert not list(tmp_path.glob("3*"))  # nothing written
        monkeypatch.setattr(checkpoint, "_nonfinite_leaf", lambda tree: None)  # a state damaged another way
        ckpt.save(3, nan, make_iterator(), force=True)
        monkeypatch.undo()
        ckpt.wait()
        with pytest.raises(ValueError, match=r"step=3: state\.params\['mlp'\]\['b_F'\] holds a non-finite"):
            ckpt.restore(abstract_target(one))  # restore() raises, moves nothing
        assert ckpt.all_steps() == [1, 2, 3]
        with caplog.at_level(logging.WARNING):
            step, state, _ = ckpt.restore_latest(abstract_target(one), make_iterator())
    assert step == 2 and [p.name for p in (tmp_path / "corrupt").iterdir()] == ["3-valueerror"]
    assert any("step 3 is damaged" in r.getMessage() and "non-finite" in r.getMessage() for r in caplog.records)


def test_nonfinite_check_finds_the_first_bad_leaf_wherever_leaves_live():
    """Leaves on one device, on two meshes of the same devices in another order, and on the host."""
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    devices = np.array(jax.devices()[:8])
    a = NamedSharding(Mesh(devices.reshape(2, 4), ("x", "y")), P("x", "y"))
    b = NamedSharding(Mesh(devices[::-1].reshape(4, 2), ("x", "y")), P("y", "x"))
    ones = jnp.ones((8, 8), jnp.bfloat16)
    tree = {"a": jax.device_put(ones, a), "b": jax.device_put(ones, b), "c": jnp.ones(3), "d": np.ones(2),
            "k": jax.random.key(0), "n": jnp.arange(4)}
    assert checkpoint._nonfinite_leaf(tree) is None
    tree["d"] = np.array([1.0, np.nan])
    assert checkpoint._nonfinite_leaf(tree) == "['d']"
    tree["c"] = jnp.array([np.nan, 1.0, 1.0])
    assert checkpoint._nonfinite_leaf(tree) == "['c']"  # the first in tree order
    tree["b"] = jax.device_put(ones.at[7, 7].set(jnp.inf), b)
    assert checkpoint._nonfinite_leaf(tree) == "['b']"


def test_each_damaged_step_is_set_aside_until_none_is_left(tmp_path):
    one, _ = _save_two_steps(tmp_path)
    _empty_state_dir(tmp_path / "1")
    _empty_state_dir(tmp_path / "2")
    it = make_iterator()
    next(it)
    position = it.get_state()
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.restore_latest(abstract_target(one), it) is None
        assert ckpt.latest_step() is None
        assert it.get_state() == position  # failed tries leave the iterator where it was
        ckpt.save(2, one, it, force=True)  # the run starts over and writes step 2 afresh
        ckpt.wait()
        assert ckpt.all_steps() == [2]
    assert sorted(p.name for p in (tmp_path / "corrupt").iterdir()) == ["1-valueerror", "2-valueerror"]
    # The same step damaged twice: a second, distinct name.
    _empty_state_dir(tmp_path / "2")
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.restore_latest(abstract_target(one)) is None
    assert sorted(p.name for p in (tmp_path / "corrupt").iterdir()) == ["1-valueerror", "2-valueerror",
                                                                        "2-valueerror-1"]


def test_target_mismatch_raises_and_moves_nothing(tmp_path):
    one, _ = _save_two_steps(tmp_path)
    no_ref = abstract_target(one).replace(ref_params=None)
    wider = abstract_target(one).replace(
        params={**one.params, "embed": {"w_VxD": jax.ShapeDtypeStruct((32, 8), jnp.float32)}})
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(TargetMismatch, match=r"step=2: .*tree differs.*not in the target \(first: \['ref_params/"):
            ckpt.restore_latest(no_ref, make_iterator())
        with pytest.raises(TargetMismatch, match=r"params\['embed'\]\['w_VxD'\].*\(16, 8\).*\(32, 8\)"):
            ckpt.restore_latest(wider, make_iterator())
        assert ckpt.all_steps() == [1, 2]
    assert not (tmp_path / "corrupt").exists()


def test_data_fallback_for_a_step_without_this_process_state(tmp_path):
    """A step without this process's iterator file restores through ``data_fallback`` (another
    process count wrote it); without a fallback, or when it raises, the step is damaged."""
    one, after_one = _save_two_steps(tmp_path)
    shutil.copytree(tmp_path, tmp_path / "copy", ignore=shutil.ignore_patterns("copy"))
    os.remove(tmp_path / "2" / "data" / "process_0-of-1.json")
    calls = []
    with Checkpointer(tmp_path) as ckpt:
        step, _, extra = ckpt.restore_latest(abstract_target(one), make_iterator(),
                                             data_fallback=lambda s, e: calls.append((s, e)))
    assert step == 2 and calls == [(2, {"at": 2})] and not (tmp_path / "corrupt").exists()

    def refuse(step_, extra_):
        raise ValueError(f"step {step_}: nothing to carry over")

    copy = tmp_path / "copy"
    os.remove(copy / "2" / "data" / "process_0-of-1.json")
    fresh = make_iterator()
    with Checkpointer(copy) as ckpt:
        step, _, _ = ckpt.restore_latest(abstract_target(one), fresh, data_fallback=refuse)
    assert step == 1 and [p.name for p in (copy / "corrupt").iterdir()] == ["2-valueerror"]
    np.testing.assert_array_equal(next(fresh), after_one)


# ---------------------------------------------------------------------- temporary directories


def test_temporary_directories_are_removed_on_open(tmp_path):
    one, _ = _save_two_steps(tmp_path)
    tmp = tmp_path / "3.orbax-checkpoint-tmp-1234567"
    shutil.copytree(tmp_path / "2", tmp)
    shutil.rmtree(tmp / "state")
    ckpt = Checkpointer(tmp_path)
    try:
        assert not tmp.exists()  # gone before the first save or restore
        assert ckpt.all_steps() == [1, 2]
        step, state, _ = ckpt.restore_latest(abstract_target(one))
        assert step == 2
    finally:
        ckpt.close()


# ---------------------------------------------------------------------- background save errors


def _disk_full(*args, **kwargs):
    raise OSError(28, "No space left on device")


def test_background_save_error_is_one_checkpoint_error_at_the_next_save_or_wait(tmp_path, monkeypatch):
    state = make_state()
    monkeypatch.setattr(async_checkpointer, "_background_wait_for_commit_futures", _disk_full)
    with Checkpointer(tmp_path, every=50) as ckpt:
        assert ckpt.save(50, state)
        with pytest.raises(CheckpointError) as err:
            ckpt.wait()
        assert str(err.value) == "checkpoint of step 50 failed: OSError: [Errno 28] No space left on device"
        assert isinstance(err.value.__cause__, OSError) and err.value.__cause__.errno == 28
        ckpt.wait()  # raised once
        assert ckpt.latest_step() is None

        assert ckpt.save(100, state)  # fails in the background too: the next save raises it
        with pytest.raises(CheckpointError, match=r"^checkpoint of step 100 failed: OSError: \[Errno 28\] No space"):
            ckpt.save(150, state)
        monkeypatch.undo()
        assert ckpt.save(150, state)  # the disk has room again
        ckpt.wait()
        assert ckpt.all_steps() == [150]
    assert sorted(os.listdir(tmp_path)) != ["150"]  # the failed steps' temporary directories remain ...
    with Checkpointer(tmp_path) as ckpt:
        assert sorted(os.listdir(tmp_path)) == ["150"]  # ... until the directory is opened again


def test_background_save_error_raised_by_a_non_writing_save(tmp_path, monkeypatch):
    monkeypatch.setattr(async_checkpointer, "_background_wait_for_commit_futures", _disk_full)
    with pytest.raises(CheckpointError, match=r"^checkpoint of step 2 failed: OSError"):
        with Checkpointer(tmp_path, every=2) as ckpt:
            ckpt.save(2, make_state())
            while ckpt._manager.is_saving_in_progress():  # let the background write fail first
                time.sleep(0.01)
            ckpt.save(3, make_state())  # not a periodic step: nothing written, the error raised


# ---------------------------------------------------------------------- end to end


def _end_to_end_config(steps=8):
    from tests.test_runner import synthetic_config

    config = synthetic_config(steps=steps, checkpoint_every=2, keep_checkpoints=0, log_every=1,
                              export_final=False)
    config.eval.num_prompts = 0
    return config


class _Crash(Exception):
    pass


def _crash_during_step(monkeypatch, at_call):
    """`metrics.step_flops` (called once per training step, before it) raises during step `at_call`."""
    from dpo_jax.train import metrics

    calls, real = [0], metrics.step_flops

    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] == at_call:
            raise _Crash(f"crash during step {at_call}")
        return real(*args, **kwargs)

    monkeypatch.setattr(metrics, "step_flops", wrapped)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    from dpo_jax import runner

    workdir = tmp_path_factory.mktemp("uninterrupted")
    runner.run(_end_to_end_config(), str(workdir))
    return workdir


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_runner_resumes_past_a_damaged_step_to_the_uninterrupted_result(tmp_path, monkeypatch, uninterrupted, kind,
                                                                          caplog):
    """Crash during step 7 (checkpoints 2, 4, 6 on disk), damage step 6, rerun: it resumes from
    step 4, sets 6 aside, and ends with the uninterrupted run's report and metrics. A missing
    iterator file is not damage: the position every checkpoint stores for all processes restores
    step 6 itself."""
    from dpo_jax import runner

    with monkeypatch.context() as patch:
        _crash_during_step(patch, 7)
        with pytest.raises(_Crash):
            runner.run(_end_to_end_config(), str(tmp_path))
    checkpoints = tmp_path / "checkpoints"
    assert sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()) == [2, 4, 6]
    DAMAGE[kind](checkpoints / "6")
    with caplog.at_level("WARNING"):
        runner.run(_end_to_end_config(), str(tmp_path))
    if kind == "missing_iterator_state":
        assert not (checkpoints / "corrupt").exists()
        assert "stage 'train': resumed from step 6 of 8" in caplog.text
    else:
        assert [p.name.split("-")[0] for p in (checkpoints / "corrupt").iterdir()] == ["6"]
        assert "stage 'train': resumed from step 4 of 8" in caplog.text
    assert sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()) == [2, 4, 6, 8]
    want = json.loads((uninterrupted / "report.json").read_text())
    got = json.loads((tmp_path / "report.json").read_text())
    assert got.keys() == want.keys()
    for key, value in want.items():
        if isinstance(value, float):
            assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-6), key
        else:
            assert got[key] == value, key
    drop = ("tokens_per_s", "mfu")
    rows = {name: [{k: v for k, v in json.loads(line).items() if k not in drop}
                   for line in (workdir / "metrics.jsonl").read_text().splitlines()]
            for name, workdir in (("got", tmp_path), ("want", uninterrupted))}
    assert rows["got"] == rows["want"]
