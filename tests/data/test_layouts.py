"""Batch layouts: hand-made examples, cross-layout equivalence, the attention rule, errors."""

import collections

import numpy as np
import pytest

from dpo_jax.data import layouts as L

PAIR = {
    "prompt_ids": np.array([5, 6, 7], np.int32),
    "chosen_ids": np.array([8, 9], np.int32),
    "rejected_ids": np.array([10, 11, 12], np.int32),
}


def _pair(prompt, chosen, rejected):
    return {
        "prompt_ids": np.asarray(prompt, np.int32),
        "chosen_ids": np.asarray(chosen, np.int32),
        "rejected_ids": np.asarray(rejected, np.int32),
    }


def _random_pairs(n, seed=0):
    rng = np.random.default_rng(seed)
    draw = lambda lo, hi: rng.integers(1, 100, rng.integers(lo, hi)).astype(np.int32)  # noqa: E731
    return [_pair(draw(1, 7), draw(1, 6), draw(1, 6)) for _ in range(n)]


def _check_dtypes(batch, rows, length, pairs):
    assert set(batch) == set(L.BATCH_KEYS)
    for key in L.BATCH_KEYS[:-1]:
        assert batch[key].shape == (rows, length), key
        assert batch[key].dtype == (np.float32 if key == "loss_mask_BxT" else np.int32), key
    assert batch["pair_mask_P"].shape == (pairs,) and batch["pair_mask_P"].dtype == np.float32


def test_standard_layout_by_hand():
    batch = L.standard_batch([PAIR], num_pairs=2, buckets=(4, 8, 16))
    _check_dtypes(batch, 4, 8, 2)
    z = [0] * 8
    np.testing.assert_array_equal(batch["tokens_BxT"], [[5, 6, 7, 8, 9, 0, 0, 0], z, [5, 6, 7, 10, 11, 12, 0, 0], z])
    np.testing.assert_array_equal(batch["positions_BxT"][0], [0, 1, 2, 3, 4, 0, 0, 0])
    np.testing.assert_array_equal(batch["positions_BxT"][2], [0, 1, 2, 3, 4, 5, 0, 0])
    np.testing.assert_array_equal(batch["segment_ids_BxT"], [[1] * 5 + [0] * 3, z, [1] * 6 + [0] * 2, z])
    np.testing.assert_array_equal(batch["branch_ids_BxT"], [[0, 0, 1, 1, 1, 0, 0, 0], z, [0, 0, 2, 2, 2, 2, 0, 0], z])
    np.testing.assert_array_equal(batch["targets_BxT"], [[6, 7, 8, 9, 0, 0, 0, 0], z, [6, 7, 10, 11, 12, 0, 0, 0], z])
    np.testing.assert_array_equal(batch["loss_mask_BxT"], [[0, 0, 1, 1, 0, 0, 0, 0], z, [0, 0, 1, 1, 1, 0, 0, 0], z])
    np.testing.assert_array_equal(batch["pair_mask_P"], [1, 0])


def test_prefix_layout_by_hand():
    batch = L.prefix_batch([PAIR, PAIR], num_pairs=2, buckets=(4, 16))
    _check_dtypes(batch, 2, 16, 2)
    pad = [0] * 7
    np.testing.assert_array_equal(batch["tokens_BxT"][1], [5, 6, 7, 8, 9, 7, 10, 11, 12] + pad)
    np.testing.assert_array_equal(batch["positions_BxT"][1], [0, 1, 2, 3, 4, 2, 3, 4, 5] + pad)
    np.testing.assert_array_equal(batch["branch_ids_BxT"][1], [0, 0, 1, 1, 1, 2, 2, 2, 2] + pad)
    np.testing.assert_array_equal(batch["targets_BxT"][1], [6, 7, 8, 9, 0, 10, 11, 12, 0] + pad)
    np.testing.assert_array_equal(batch["loss_mask_BxT"][1], [0, 0, 1, 1, 0, 1, 1, 1, 0] + pad)
    np.testing.assert_array_equal(batch["segment_ids_BxT"][1], [1] * 9 + pad)
    np.testing.assert_array_equal(batch["pair_ids_BxT"][1], [1] * 9 + pad)
    np.testing.assert_array_equal(batch["pair_mask_P"], [1, 1])


def test_packed_layout_by_hand():
    short = _pair([3], [4], [5, 6])  # segments of length 2 and 3
    # First-fit into 2 rows of 8: PAIR's chosen (5) -> row 0, its rejected (6) -> row 1, short's
    # chosen (2) -> row 0 (1 left), short's rejected (3) fits nowhere: the pair does not fit.
    with pytest.raises(ValueError, match="example 1"):
        L.packed_batch([PAIR, short], num_pairs=3, num_rows=2, row_length=8)
    # Rows of 9: short's rejected goes to row 1 (3 left there).
    batch = L.packed_batch([PAIR, short], num_pairs=3, num_rows=2, row_length=9)
    np.testing.assert_array_equal(batch["tokens_BxT"], [[5, 6, 7, 8, 9, 3, 4, 0, 0], [5, 6, 7, 10, 11, 12, 3, 5, 6]])
    np.testing.assert_array_equal(batch["segment_ids_BxT"], [[1, 1, 1, 1, 1, 2, 2, 0, 0], [1, 1, 1, 1, 1, 1, 2, 2, 2]])
    np.testing.assert_array_equal(batch["positions_BxT"], [[0, 1, 2, 3, 4, 0, 1, 0, 0], [0, 1, 2, 3, 4, 5, 0, 1, 2]])
    np.testing.assert_array_equal(batch["branch_ids_BxT"], [[0, 0, 1, 1, 1, 1, 1, 0, 0], [0, 0, 2, 2, 2, 2, 2, 2, 2]])
    np.testing.assert_array_equal(batch["targets_BxT"], [[6, 7, 8, 9, 0, 4, 0, 0, 0], [6, 7, 10, 11, 12, 0, 5, 6, 0]])
    np.testing.assert_array_equal(batch["loss_mask_BxT"], [[0, 0, 1, 1, 0, 1, 0, 0, 0], [0, 0, 1, 1, 1, 0, 1, 1, 0]])
    np.testing.assert_array_equal(batch["pair_ids_BxT"], [[0, 0, 0, 0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0, 1, 1, 1]])
    np.testing.assert_array_equal(batch["pair_mask_P"], [1, 1, 0])


def _loss_triples(batch):
    """Multiset of (pair, branch, position, target) over loss-masked positions of real pairs."""
    keep = (batch["loss_mask_BxT"] > 0) & (batch["pair_mask_P"][batch["pair_ids_BxT"]] > 0)
    cols = [batch[k][keep] for k in ("pair_ids_BxT", "branch_ids_BxT", "positions_BxT", "targets_BxT")]
    return collections.Counter(zip(*(c.tolist() for c in cols)))


def _all_layouts(pairs, num_pairs):
    buckets = L.power_of_two_buckets(32, 4)
    return {
        "standard": L.standard_batch(pairs, num_pairs=num_pairs, buckets=buckets),
        "prefix": L.prefix_batch(pairs, num_pairs=num_pairs, buckets=buckets),
        "packed": L.packed_batch(pairs, num_pairs=num_pairs, num_rows=num_pairs, row_length=32),
        "packed_prefix": L.packed_batch(
            pairs, num_pairs=num_pairs, num_rows=num_pairs, row_length=32, share_prefix=True
        ),
    }


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_layouts_give_the_same_loss_triples(seed):
    pairs = _random_pairs(5, seed)
    expected = collections.Counter()
    for p, pair in enumerate(pairs):
        n = len(pair["prompt_ids"])
        for branch, key in ((1, "chosen_ids"), (2, "rejected_ids")):
            for k, tok in enumerate(pair[key].tolist()):
                expected[(p, branch, n - 1 + k, tok)] += 1
    for name, batch in _all_layouts(pairs, num_pairs=6).items():
        assert _loss_triples(batch) == expected, name


def _visible_context(batch, row, i):
    """Tokens query i attends to under the design's mask rule, ordered by position."""
    seg, pos, br = (batch[k][row] for k in ("segment_ids_BxT", "positions_BxT", "branch_ids_BxT"))
    keys = np.flatnonzero((seg == seg[i]) & (pos <= pos[i]) & ((br == 0) | (br == br[i])))
    keys = keys[np.argsort(pos[keys], kind="stable")]
    assert len(set(pos[keys].tolist())) == len(keys), "two visible keys share a position"
    return batch["tokens_BxT"][row, keys].tolist()


@pytest.mark.parametrize("seed", [0, 3])
def test_every_target_sees_exactly_its_own_prefix(seed):
    """Under the attention rule of docs/design.md each loss position sees prompt + completion[:k]."""
    pairs = _random_pairs(4, seed)
    for name, batch in _all_layouts(pairs, num_pairs=4).items():
        for row, i in zip(*np.nonzero(batch["loss_mask_BxT"])):
            pair = pairs[batch["pair_ids_BxT"][row, i]]
            completion = pair["chosen_ids" if batch["branch_ids_BxT"][row, i] == 1 else "rejected_ids"]
            k = batch["positions_BxT"][row, i] - (len(pair["prompt_ids"]) - 1)
            want = pair["prompt_ids"].tolist() + completion[:k].tolist()
            assert _visible_context(batch, row, i) == want, (name, row, i)
            assert batch["targets_BxT"][row, i] == completion[k], (name, row, i)


def assert_no_query_sees_a_later_key(batch, what=""):
    """The invariant `models.attention.tiled_attention` relies on: under the attention rule, every
    key a query sees sits at or before it in its row."""
    seg, pos, br = (np.asarray(batch[k]) for k in ("segment_ids_BxT", "positions_BxT", "branch_ids_BxT"))
    sees = ((seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] != 0) & (pos[:, None, :] <= pos[:, :, None])
            & ((br[:, None, :] == 0) | (br[:, None, :] == br[:, :, None])))
    later = np.triu(np.ones((seg.shape[1], seg.shape[1]), bool), k=1)
    assert not (sees & later).any(), f"{what}: a query sees a key after it"
    assert sees.any(), what  # the rule was applied to real rows


@pytest.mark.parametrize("seed", [0, 3])
def test_no_query_sees_a_key_after_it_in_any_layout(seed):
    for name, batch in _all_layouts(_random_pairs(5, seed), num_pairs=6).items():
        assert_no_query_sees_a_later_key(batch, name)


def test_unpaired_one_row_per_example():
    good = {"prompt_ids": np.array([1, 2]), "completion_ids": np.array([3, 4]), "label": True}
    bad = {"prompt_ids": np.array([1]), "completion_ids": np.array([5]), "label": False}
    for build in (L.standard_batch, L.prefix_batch):
        batch = build([good, bad], num_pairs=3, buckets=(8,))
        _check_dtypes(batch, 3, 8, 3)
        np.testing.assert_array_equal(batch["branch_ids_BxT"][:2, :4], [[0, 1, 1, 1], [2, 2, 0, 0]])
        np.testing.assert_array_equal(batch["loss_mask_BxT"][:2, :4], [[0, 1, 1, 0], [1, 0, 0, 0]])
        np.testing.assert_array_equal(batch["pair_mask_P"], [1, 1, 0])
    packed = L.packed_batch([good, bad], num_pairs=2, num_rows=1, row_length=8)
    np.testing.assert_array_equal(packed["segment_ids_BxT"], [[1, 1, 1, 1, 2, 2, 0, 0]])
    np.testing.assert_array_equal(packed["pair_ids_BxT"], [[0, 0, 0, 0, 1, 1, 0, 0]])
    with pytest.raises(ValueError, match="label"):
        L.standard_batch([dict(good, label="yes")], num_pairs=1, buckets=(8,))


def test_buckets():
    assert L.power_of_two_buckets(100, 16) == (16, 32, 64, 100)
    assert L.power_of_two_buckets(64, 16) == (16, 32, 64)
    assert L.bucket_length(17, (16, 32, 64)) == 32
    assert L.bucket_length(16, (16, 32, 64)) == 16
    with pytest.raises(ValueError, match="exceeds the largest length bucket 64"):
        L.bucket_length(65, (16, 32, 64))
    long_pair = _pair(np.ones(40), np.ones(30), [1])
    with pytest.raises(ValueError, match="length 70"):
        L.standard_batch([long_pair], num_pairs=1, buckets=(16, 32, 64))
    spec = L.LayoutSpec(layout="standard", num_pairs=2, buckets=(16, 64))
    assert not spec.fits(long_pair) and spec.fits(PAIR)
    assert spec([PAIR])["tokens_BxT"].shape == (4, 16)
    assert spec([])["tokens_BxT"].shape == (4, 16)


def test_bad_examples_name_the_field():
    with pytest.raises(ValueError, match="example 0: 'prompt_ids' must be a non-empty"):
        L.standard_batch([_pair([], [1], [2])], num_pairs=1, buckets=(8,))
    with pytest.raises(ValueError, match="missing key 'rejected_ids'"):
        L.prefix_batch([{"prompt_ids": [1], "chosen_ids": [2]}], num_pairs=1, buckets=(8,))
    with pytest.raises(ValueError, match="example 1: 'chosen_ids'"):
        L.standard_batch([PAIR, dict(PAIR, chosen_ids=[0.5])], num_pairs=2, buckets=(8,))
    with pytest.raises(ValueError, match="pair capacity"):
        L.standard_batch([PAIR, PAIR], num_pairs=1, buckets=(16,))
    unpaired = {"prompt_ids": [1], "completion_ids": [2], "label": True}
    with pytest.raises(ValueError, match="mixes paired"):
        L.standard_batch([PAIR, unpaired], num_pairs=2, buckets=(16,))
    with pytest.raises(ValueError, match="layout must be one of"):
        L.LayoutSpec(layout="ragged")
    with pytest.raises(ValueError, match="num_rows"):
        L.LayoutSpec(layout="packed", num_rows=0, row_length=8)


def test_pack_groups_respect_capacity_and_fit():
    pairs = _random_pairs(40, seed=5)
    spec = L.LayoutSpec(layout="packed", num_pairs=6, num_rows=3, row_length=24)
    groups = list(L.pack_groups(pairs, spec))
    assert [id(p) for g in groups for p in g] == [id(p) for p in pairs]
    assert all(1 <= len(g) <= 6 for g in groups)
    for i, g in enumerate(groups):
        batch = spec(g)  # raises if the group does not fit
        if i + 1 < len(groups) and len(g) < 6:  # closed early: the next example must not fit
            packer = L.FirstFitPacker(3, 24)
            for p in g + [groups[i + 1][0]]:
                placed = packer.add(spec.segment_lengths(p))
            assert placed is None
        assert batch["pair_mask_P"].sum() == len(g)
    std = L.LayoutSpec(layout="standard", num_pairs=6, buckets=(32,))
    assert [len(g) for g in L.pack_groups(pairs, std)] == [6] * 6 + [4]


def test_segment_lengths_match_the_segments():
    unpaired = {"prompt_ids": np.array([1, 2]), "completion_ids": np.array([3, 4, 5]), "label": False}
    for example in _random_pairs(6, seed=9) + [unpaired]:
        for layout, share in (("standard", False), ("prefix", False), ("packed", False), ("packed", True)):
            spec = L.LayoutSpec(layout=layout, num_rows=2, row_length=64, share_prefix=share)
            segs = L.example_segments(example, 0, share or layout == "prefix")
            assert spec.segment_lengths(example) == [len(s) for s in segs], (layout, share)


def test_prefix_layout_falls_back_to_standard_rows_when_sharing_saves_too_little():
    long_prompt = _pair(np.arange(1, 25), [30, 31, 32, 33], [40, 41, 42, 43])  # 24 + 4 + 4
    short_prompt = _pair([1, 2], np.arange(30, 44), np.arange(50, 64))  # 2 + 14 + 14
    buckets = tuple(range(8, 72, 8))
    spec = L.LayoutSpec(layout="prefix", num_pairs=2, buckets=buckets)
    # Long prompt: prefix rows 2 x 40 (24 + 4 + 4 + 1 = 33 -> 40) vs standard 4 x 32: 37.5% saved.
    assert spec.prefix_saves([long_prompt, long_prompt])
    np.testing.assert_array_equal(spec([long_prompt])["tokens_BxT"],
                                  L.prefix_batch([long_prompt], num_pairs=2, buckets=buckets)["tokens_BxT"])
    # Short prompt: prefix rows 2 x 32 (31 -> 32) vs standard 4 x 16: nothing saved -> standard rows.
    assert not spec.prefix_saves([short_prompt])
    batch = spec([short_prompt, short_prompt])
    expected = L.standard_batch([short_prompt, short_prompt], num_pairs=2, buckets=buckets)
    assert set(batch) == set(expected)
    for key in expected:
        np.testing.assert_array_equal(batch[key], expected[key], err_msg=key)
    # A zero threshold keeps prefix rows whenever they are not longer in padded tokens.
    assert L.LayoutSpec(layout="prefix", num_pairs=2, buckets=buckets, prefix_min_saving=0.0).prefix_saves(
        [short_prompt])
    with pytest.raises(ValueError, match="prefix_min_saving must be in"):
        L.LayoutSpec(layout="prefix", prefix_min_saving=1.0)


def test_logit_slots_list_each_rows_loss_masked_positions():
    assert L.slot_levels(128) == (32, 64, 96, 128)
    assert L.slot_levels(16) == (8, 16) and L.slot_levels(8) == (8,)
    batch = L.standard_batch([PAIR], num_pairs=2, buckets=(8,))  # loss mask rows [0,0,1,1,0..], [], [0,0,1,1,1,..], []
    np.testing.assert_array_equal(L.logit_slots(batch["loss_mask_BxT"]),
                                  [[2, 3, -1, -1, -1, -1, -1, -1], [-1] * 8, [2, 3, 4, -1, -1, -1, -1, -1], [-1] * 8])
    mask = np.zeros((2, 128), np.float32)
    mask[0, 64:128] = 1  # a 64-token completion after a 64-token prompt: C = 64, half of T
    mask[1, 70:90] = 1
    slots = L.logit_slots(mask)
    assert slots.shape == (2, 64)
    np.testing.assert_array_equal(slots[0], np.arange(64, 128))
    np.testing.assert_array_equal(slots[1], np.r_[np.arange(70, 90), [-1] * 44])
    mask[1, :] = 1
    assert L.logit_slots(mask).shape == (2, 128)
    for layout, extra in (("standard", {}), ("prefix", {}), ("packed", dict(num_rows=2, row_length=32))):
        spec = L.LayoutSpec(layout=layout, num_pairs=2, buckets=(16, 32), logit_slots=True, **extra)
        out = spec(_random_pairs(2, seed=3))
        np.testing.assert_array_equal(out[L.SLOTS_KEY], L.logit_slots(out["loss_mask_BxT"]))
        assert L.SLOTS_KEY not in L.LayoutSpec(layout=layout, num_pairs=2, buckets=(16, 32), **extra)(
            _random_pairs(2, seed=3))


@pytest.mark.parametrize("layout", ["standard", "prefix"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batch_stats_of_a_union_are_the_max_of_the_parts(layout, seed):
    spec = L.LayoutSpec(layout=layout, num_pairs=8, buckets=(4, 8, 16, 32), logit_slots=True)
    pairs = _random_pairs(8, seed)
    parts = [pairs[:3], pairs[3:], []]
    merged = np.max([spec.batch_stats(p) for p in parts], axis=0)
    np.testing.assert_array_equal(merged, spec.batch_stats(pairs))
    assert spec.plan(merged) == spec.plan(spec.batch_stats(pairs))


def test_processes_with_different_local_choices_lay_out_one_global_plan():
    """Alone, process 0 (long prompts) would share prefixes and process 1 (one long completion,
    short prompt) would not; with the merged plan both lay out the same rows, T and C."""
    spec = L.LayoutSpec(layout="prefix", num_pairs=2, buckets=(8, 16, 32, 64), logit_slots=True)
    shared = [_pair(range(1, 21), [3, 2], [4, 2]), _pair(range(1, 21), [5, 2], [6, 2])]
    unshared = [_pair([1], [7] * 30, [8, 2]), _pair([1], [9, 2], [9, 2])]
    assert spec.prefix_saves(shared) and not spec.prefix_saves(unshared)
    plan = spec.plan(np.maximum(spec.batch_stats(shared), spec.batch_stats(unshared)))
    batches = [spec(part, plan, pair_offset=2 * q) for q, part in enumerate((shared, unshared))]
    assert batches[0]["tokens_BxT"].shape == batches[1]["tokens_BxT"].shape == (2 * 2 if not plan.prefix_rows else 2,
                                                                               plan.length)
    assert batches[0][L.SLOTS_KEY].shape == batches[1][L.SLOTS_KEY].shape == (batches[0]["tokens_BxT"].shape[0],
                                                                             plan.slots)
    assert plan == spec.plan(spec.batch_stats(shared + unshared))  # what one process would lay out
    ids = [set(b["pair_ids_BxT"][b["loss_mask_BxT"] > 0].tolist()) for b in batches]
    assert ids == [{0, 1}, {2, 3}]


def test_a_plan_too_short_for_the_examples_is_an_error():
    spec = L.LayoutSpec(layout="standard", num_pairs=2, buckets=(8, 16), logit_slots=True)
    plan = spec.plan(spec.batch_stats([PAIR]))
    with pytest.raises(ValueError, match="shorter than the longest row"):
        spec([_pair([1] * 6, [2] * 6, [3])], plan)
