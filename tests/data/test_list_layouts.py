"""data/list_layouts.py + logprobs.branch_logps: a prompt shared by K completions in one row gives
each completion the summed log-prob of its own standard row (to 1e-5, through the Decoder), and
K = 2 is the prefix layout's segment."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dpo_jax import logprobs
from dpo_jax.data import layouts
from dpo_jax.data.list_layouts import ListLayoutSpec, list_segment
from dpo_jax.models.transformer import Decoder, ModelConfig

from tests.data.test_layouts import assert_no_query_sees_a_later_key

CFG = ModelConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)


def _rows(segments, length):
    """One segment per row, right-padded; row r is list / pair r."""
    batch = {k: np.zeros((len(segments), length), np.int32) for k in
             ("tokens_BxT", "positions_BxT", "segment_ids_BxT", "branch_ids_BxT", "targets_BxT", "pair_ids_BxT")}
    batch["loss_mask_BxT"] = np.zeros((len(segments), length), np.float32)
    for r, seg in enumerate(segments):
        n = len(seg)
        batch["tokens_BxT"][r, :n], batch["positions_BxT"][r, :n] = seg.tokens, seg.positions
        batch["segment_ids_BxT"][r, :n], batch["branch_ids_BxT"][r, :n] = 1, seg.branches
        batch["targets_BxT"][r, :n], batch["loss_mask_BxT"][r, :n] = seg.targets, seg.loss_mask
        batch["pair_ids_BxT"][r, :n] = r
    return batch


def _token_logps(model, batch):
    h = model(jnp.asarray(batch["tokens_BxT"]), positions_BxT=jnp.asarray(batch["positions_BxT"]),
              segment_ids_BxT=jnp.asarray(batch["segment_ids_BxT"]), branch_ids_BxT=jnp.asarray(batch["branch_ids_BxT"]))
    w_DxV, _ = model.unembedding()
    logits = jnp.einsum("btd,dv->btv", h, w_DxV)
    return jnp.take_along_axis(jax.nn.log_softmax(logits, -1), jnp.asarray(batch["targets_BxT"])[..., None], -1)[..., 0]


def test_k_branch_row_equals_k_separate_rows():
    rng = np.random.default_rng(0)
    model = Decoder(CFG, rngs=nnx.Rngs(0))
    prompts = [rng.integers(4, 40, n) for n in (5, 3)]
    lists = [[rng.integers(4, 40, a) for a in (4, 2, 6)], [rng.integers(4, 40, a) for a in (1, 7, 3)]]
    shared = _rows([list_segment(p, cs) for p, cs in zip(prompts, lists)], 32)
    logps_PxK, lens_PxK = logprobs.branch_logps(_token_logps(model, shared), jnp.asarray(shared["loss_mask_BxT"]),
                                                jnp.asarray(shared["pair_ids_BxT"]),
                                                jnp.asarray(shared["branch_ids_BxT"]), 2, 3)
    separate = _rows([layouts.sequence_segment(p, c, 1) for p, cs in zip(prompts, lists) for c in cs], 16)
    sums = np.sum(np.asarray(_token_logps(model, separate)) * separate["loss_mask_BxT"], axis=1).reshape(2, 3)
    np.testing.assert_allclose(logps_PxK, sums, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(lens_PxK, [[4, 2, 6], [1, 7, 3]])
    assert np.ptp(sums) > 1.0  # different completions, different log-probs: the comparison can fail


def test_two_branches_are_the_prefix_segment_and_sequence_logps():
    rng = np.random.default_rng(1)
    prompt, chosen, rejected = rng.integers(4, 40, 4), rng.integers(4, 40, 3), rng.integers(4, 40, 5)
    seg, ref = list_segment(prompt, [chosen, rejected]), layouts.prefix_segment(prompt, chosen, rejected)
    for field in ("tokens", "positions", "branches", "targets", "loss_mask"):
        np.testing.assert_array_equal(getattr(seg, field), getattr(ref, field), err_msg=field)
    logp = jnp.asarray(rng.normal(size=(1, len(seg))), jnp.float32)
    mask, pair, branch = (jnp.asarray(x)[None] for x in (seg.loss_mask, np.zeros(len(seg), np.int32), seg.branches))
    got, _ = logprobs.branch_logps(logp, mask, pair, branch, 1, 2)
    want = logprobs.sequence_logps(logp, mask, pair, branch, 1)
    np.testing.assert_allclose(got[0], [want.chosen[0], want.rejected[0]], rtol=1e-6)


def test_bad_segments_are_named():
    with pytest.raises(ValueError, match="at least one completion"):
        list_segment(np.array([1, 2]), [])
    with pytest.raises(ValueError, match="completion 2"):
        list_segment(np.array([1, 2]), [np.array([3]), np.array([], np.int32)])


# ------------------------------------------------------------------------------------------------
# ListLayoutSpec: the three layouts of ranked lists give the same per-(list, slot) log-probs.

def _lists(rng, sizes):
    ids = lambda n: rng.integers(4, 40, n).astype(np.int32)  # noqa: E731
    return [{"prompt_ids": ids(int(rng.integers(2, 6))), "response_ids": tuple(ids(int(rng.integers(1, 6)))
                                                                              for _ in range(k)),
             "scores": rng.permutation(k).astype(np.float32)} for k in sizes]


def _list_logps(model, batch, k):
    h = model(jnp.asarray(batch["tokens_BxT"]), positions_BxT=jnp.asarray(batch["positions_BxT"]),
              segment_ids_BxT=jnp.asarray(batch["segment_ids_BxT"]),
              branch_ids_BxT=jnp.asarray(batch["branch_ids_BxT"]))
    w_DxV, _ = model.unembedding()
    jb = {key: jnp.asarray(v) for key, v in batch.items()}
    return logprobs.list_completion_logps(h, w_DxV, jb, batch["pair_mask_P"].shape[0], k, chunk_size=16,
                                          vocab_chunk_size=16)


@pytest.mark.parametrize("logit_slots", [False, True])
def test_layouts_of_lists_agree(logit_slots):
    rng = np.random.default_rng(5)
    model = Decoder(CFG, rngs=nnx.Rngs(0))
    lists = _lists(rng, (3, 2, 4, 3))
    specs = {layout: ListLayoutSpec(layout=layout, num_pairs=5, list_size=4, buckets=(16, 32, 64), num_rows=3,
                                    row_length=64, logit_slots=logit_slots)
             for layout in ("standard", "prefix", "packed")}
    batches = {name: spec(lists, pair_offset=0) for name, spec in specs.items()}
    assert batches["standard"]["tokens_BxT"].shape[0] == 20 and batches["prefix"]["tokens_BxT"].shape[0] == 5
    assert batches["packed"]["tokens_BxT"].shape == (3, 64)
    assert all((layouts.SLOTS_KEY in b) == logit_slots for b in batches.values())
    for name, b in batches.items():
        assert_no_query_sees_a_later_key(b, name)
    out = {name: _list_logps(model, b, 4) for name, b in batches.items()}
    for name in ("prefix", "packed"):
        np.testing.assert_allclose(out[name][0], out["standard"][0], rtol=1e-5, atol=1e-5, err_msg=name)
        np.testing.assert_array_equal(out[name][1], out["standard"][1])
    lens = np.asarray(out["standard"][1])
    for p, example in enumerate(lists):
        k = len(example["response_ids"])
        np.testing.assert_array_equal(lens[p, :k], [len(r) for r in example["response_ids"]])
        assert (lens[p, k:] == 0).all() and (lens[4] == 0).all()  # empty slots and the filler list
        np.testing.assert_array_equal(batches["prefix"]["scores_PxK"][p, :k], example["scores"])
        np.testing.assert_array_equal(batches["prefix"]["slot_mask_PxK"][p], [1.0] * k + [0.0] * (4 - k))
    np.testing.assert_array_equal(batches["prefix"]["pair_mask_P"], [1, 1, 1, 1, 0])


def test_list_spec_rules():
    rng = np.random.default_rng(6)
    [five] = _lists(rng, (5,))
    spec = ListLayoutSpec(layout="prefix", num_pairs=2, list_size=4, buckets=(64,))
    assert not spec.fits(five)  # more responses than slots
    with pytest.raises(ValueError, match="5 responses exceed list_size=4"):
        spec([five])
    with pytest.raises(ValueError, match="list_size must be >= 2"):
        ListLayoutSpec(list_size=1)
    with pytest.raises(ValueError, match=r"list example 0: missing key\(s\) \['scores'\]"):
        spec([{"prompt_ids": np.int32([5]), "response_ids": (np.int32([6]), np.int32([7]))}])
    a, b = _lists(rng, (2,)), _lists(rng, (4, 3))
    merged = np.maximum(spec.batch_stats(a), spec.batch_stats(b))
    np.testing.assert_array_equal(merged, spec.batch_stats(a + b))  # processes agree by a max
    assert spec(a, spec.plan(merged))["tokens_BxT"].shape[1] == spec(b)["tokens_BxT"].shape[1]
