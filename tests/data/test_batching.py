"""batching: the layout plan agreed across processes, and an iterator position carried over to another
process count (a 2-process checkpoint resumed on 1 or 3 processes reads the pairs one process would)."""

import numpy as np
import pytest

from dpo_jax.data import batching
from dpo_jax.data import pipeline as P

ID0 = 1000


def _rows(n, seed=0):
    rng = np.random.default_rng(seed)
    draw = lambda hi: rng.integers(3, 50, rng.integers(1, hi)).tolist()  # noqa: E731
    return [{"prompt": [ID0 + i] + draw(6), "chosen": draw(9), "rejected": draw(9)} for i in range(n)]


def keep_all(row):
    return {"prompt_ids": np.asarray(row["prompt"], np.int32),
            "chosen_ids": np.asarray(list(row["chosen"]) + [2], np.int32),
            "rejected_ids": np.asarray(list(row["rejected"]) + [2], np.int32)}


def _ids(batch):
    """Row ids of the batch's real pairs."""
    first = (batch["positions_BxT"] == 0) & (batch["segment_ids_BxT"] > 0)
    return {int(t) - ID0 for t in batch["tokens_BxT"][first]}


def _config(pairs, layout="standard"):
    kw = dict(pack_rows=pairs, pack_length=32) if layout == "packed" else {}
    return P.DataConfig(pairs_per_batch=pairs, max_length=32, min_bucket=8, num_epochs=None, seed=5, layout=layout,
                        **kw)


def _iterators(rows, pairs_global, count):
    return [P.make_train_iterator(rows, keep_all, _config(pairs_global // count), process_index=i, process_count=count)
            for i in range(count)]


@pytest.mark.parametrize("new_count", [1, 3])
def test_two_process_position_resumes_on_another_count(new_count):
    rows, pairs = _rows(48), 12  # 48 rows divide by 2 and 3; 12 pairs per global batch
    one = _iterators(rows, pairs, 1)[0]
    want = [_ids(next(one)) for _ in range(9)]  # step 4 crosses into the second epoch
    two = _iterators(rows, pairs, 2)
    for step in range(3):
        assert set().union(*(_ids(next(it)) for it in two)) == want[step]  # same pairs per step as one process
    states = [it.get_state() for it in two]
    resumed = _iterators(rows, pairs, new_count)
    for i, it in enumerate(resumed):
        it.set_state(batching.reshard_state(states, it.get_state(), i, new_count))
    for step in range(3, 9):
        assert set().union(*(_ids(next(it)) for it in resumed)) == want[step], f"step {step}"


def test_position_is_found_under_the_packed_grouping_and_a_missing_one_is_an_error():
    it = P.make_train_iterator(_rows(16), keep_all, _config(4, "packed"), process_index=0, process_count=1)
    next(it)
    state = it.get_state()
    assert batching.reshard_state([state], state, 0, 1) == state
    assert batching.reshard_state([state, state], state, 0, 1) != state
    with pytest.raises(ValueError, match="next_index"):
        batching.reshard_state([{"other": 1}], state, 0, 1)
