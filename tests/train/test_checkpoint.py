"""Checkpointer: bitwise round trips, sharded restore, grain iterator resume, pruning, atomicity."""

import os
import shutil

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dpo_jax.train.checkpoint import Checkpointer, abstract_target
from dpo_jax.train.step import TrainState


def make_state(seed=0, ref=True, rng=True):
    k = jax.random.split(jax.random.key(seed), 4)
    params = {
        "embed": {"w_VxD": jax.random.normal(k[0], (16, 8), jnp.float32)},
        "mlp": {"w_DxF": jax.random.normal(k[1], (8, 16), jnp.bfloat16), "b_F": jnp.arange(16, dtype=jnp.float32)},
    }
    tx = optax.adamw(1e-2)
    opt_state = tx.init(params)
    # One real update so mu/nu/count are not trivially zero.
    grads = jax.tree.map(lambda p: jnp.ones_like(p) * 0.5, params)
    _, opt_state = tx.update(grads, opt_state, params)
    ref_params = jax.tree.map(lambda p: p * 2, params) if ref else None
    return TrainState(step=jnp.array(7, jnp.int32), params=params, opt_state=opt_state,
                      ref_params=ref_params, rng=k[3] if rng else None)


def assert_bitwise_equal(a, b):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype and x.shape == y.shape
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.atleast_1d(np.asarray(x)).view(np.uint8), np.atleast_1d(np.asarray(y)).view(np.uint8))


def make_iterator():
    return iter(grain.MapDataset.range(100).shuffle(seed=0).repeat(3).batch(4).to_iter_dataset())


def test_round_trip_bitwise_with_extra_and_none_fields(tmp_path):
    state = make_state()
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        assert ckpt.latest_step() is None
        assert ckpt.save(7, state, extra={"last_logged_step": 5, "np": np.int64(3)}, force=True)
        ckpt.wait()
        assert ckpt.latest_step() == 7
        restored, extra = ckpt.restore(abstract_target(state))
    assert isinstance(restored, TrainState)
    assert isinstance(restored.opt_state[0], optax.ScaleByAdamState)
    assert_bitwise_equal(restored, state)
    assert extra == {"last_logged_step": 5, "np": 3}

    # ref_params / rng None, abstract leaves from eval_shape (no sharding: default device).
    state2 = make_state(seed=1, ref=False, rng=False)
    with Checkpointer(tmp_path / "ckpt2", async_save=False) as ckpt:
        ckpt.save(3, state2, force=True)
        restored2, extra2 = ckpt.restore(jax.eval_shape(lambda: state2))
    assert restored2.ref_params is None and restored2.rng is None
    assert_bitwise_equal(restored2, state2)
    assert extra2 == {}


def test_save_is_a_snapshot(tmp_path):
    """An async save must hold the values of save time: the loop donates/deletes the buffers."""
    state = make_state()
    expected = jax.tree.map(lambda x: np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(
        x.dtype, jax.dtypes.prng_key) else x), state)
    target = abstract_target(state)
    extra = {"n": 1}
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state, extra=extra, force=True)
        extra["n"] = 2
        for x in jax.tree.leaves(state):
            x.delete()
        ckpt.wait()
        restored, got_extra = ckpt.restore(target)
    got = jax.tree.map(lambda x: np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(
        x.dtype, jax.dtypes.prng_key) else x), restored)
    jax.tree.map(np.testing.assert_array_equal, got, expected)
    assert got_extra == {"n": 1}


def test_restore_onto_sharded_target(tmp_path):
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "fsdp"))
    state = make_state()

    def spec(x):
        if x.ndim == 2:
            return NamedSharding(mesh, P("data", "fsdp"))
        if x.ndim == 1:
            return NamedSharding(mesh, P("fsdp"))
        return NamedSharding(mesh, P())

    # Saved from a different sharding (replicated on one device) than the one restored into.
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(10, state, force=True)
        ckpt.wait()
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=spec(x)), state)
        restored, _ = ckpt.restore(target)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(target)):
        assert got.sharding == want.sharding, (got.sharding, want.sharding)
    assert restored.params["embed"]["w_VxD"].sharding.spec == P("data", "fsdp")
    assert len(restored.params["embed"]["w_VxD"].addressable_shards) == 8
    assert_bitwise_equal(restored, state)

    # Concrete sharded arrays as the target: their shardings are used; round trip sharded->sharded.
    with Checkpointer(tmp_path / "again") as ckpt:
        ckpt.save(11, restored, force=True)
        zeros = jax.tree.map(lambda x: jax.device_put(jnp.zeros_like(x), x.sharding), restored)
        again, _ = ckpt.restore(zeros)
    for got, want in zip(jax.tree.leaves(again), jax.tree.leaves(restored)):
        assert got.sharding == want.sharding
    assert_bitwise_equal(again, state)


def test_restore_shape_mismatch_names_the_leaf(tmp_path):
    state = make_state()
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state, force=True)
        bad = abstract_target(state).replace(
            params={**state.params, "embed": {"w_VxD": jax.ShapeDtypeStruct((32, 8), jnp.float32)}})
        with pytest.raises(ValueError, match=r"params\['embed'\]\['w_VxD'\].*\(16, 8\).*\(32, 8\)"):
            ckpt.restore(bad)
        with pytest.raises(ValueError, match=r"step=5 not in"):
            ckpt.restore(abstract_target(state), step=5)
        with pytest.raises(ValueError, match="holds no data iterator"):
            ckpt.restore(abstract_target(state), data_iterator=make_iterator())
        with pytest.raises(ValueError, match="data_iterator must be a grain"):
            ckpt.save(2, state, data_iterator=iter(range(3)), force=True)
        with pytest.raises(ValueError, match="extra is not JSON"):
            ckpt.save(2, state, extra={"f": object()}, force=True)
    with pytest.raises(ValueError, match="no finalized checkpoint"):
        Checkpointer(tmp_path / "empty").restore(abstract_target(state))


def test_iterator_resumes_mid_stream(tmp_path):
    # Uninterrupted reference: batches 0..39 (crosses the epoch boundary at batch 25).
    ref = [next(it) for it in [make_iterator()] for _ in range(40)]
    state = make_state()
    it = make_iterator()
    for _ in range(13):
        next(it)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(13, state, data_iterator=it, force=True)
        for _ in range(5):  # advancing after save must not change what was saved
            next(it)
        ckpt.wait()
    # A fresh process: new iterator, new Checkpointer over the same directory.
    fresh = make_iterator()
    with Checkpointer(tmp_path) as ckpt:
        _, _ = ckpt.restore(abstract_target(state), data_iterator=fresh)
    resumed = [next(fresh) for _ in range(27)]
    for i, (a, b) in enumerate(zip(resumed, ref[13:])):
        np.testing.assert_array_equal(a, b, err_msg=f"batch {13 + i}")


def test_should_save_and_keep_prunes(tmp_path):
    state = make_state(ref=False)
    with Checkpointer(tmp_path, keep=2, every=3) as ckpt:
        saved = [s for s in range(1, 11) if ckpt.save(s, state)]
        assert saved == [3, 6, 9]
        assert ckpt.save(10, state, force=True)
        assert not ckpt.save(10, state, force=True)  # already on disk: not written again
        ckpt.wait()
        assert ckpt.all_steps() == [9, 10]
        assert sorted(int(p) for p in os.listdir(tmp_path) if p.isdigit()) == [9, 10]
    off = Checkpointer(tmp_path / "off")
    assert not any(off.should_save(s) for s in range(10)) and not off.save(4, state)
    off.close()


def test_incomplete_checkpoint_is_ignored(tmp_path):
    """A crash mid-save leaves a temporary dir; the previous finalized step stays the latest."""
    state = make_state(ref=False)
    it = make_iterator()
    next(it)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state, data_iterator=it, extra={"at": 1}, force=True)
        next(it)
        ckpt.save(2, state, data_iterator=it, extra={"at": 2}, force=True)
    # Step 2 "was half-written": its finalized dir becomes a temporary one, one item missing.
    tmp = tmp_path / "2.orbax-checkpoint-tmp-1234567"
    os.rename(tmp_path / "2", tmp)
    shutil.rmtree(tmp / "state")
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() == 1
        assert ckpt.all_steps() == [1]
        fresh = make_iterator()
        restored, extra = ckpt.restore(abstract_target(state), data_iterator=fresh)
        assert extra == {"at": 1}
        assert_bitwise_equal(restored, state)
        ref = make_iterator()
        next(ref)
        np.testing.assert_array_equal(next(fresh), next(ref))
        # The run goes on and saves step 2 again, cleanly.
        assert ckpt.save(2, state, force=True)
        ckpt.wait()
        assert ckpt.latest_step() == 2
    assert not tmp.exists()  # leftovers are cleaned up when the directory is opened
