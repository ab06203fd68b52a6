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
from dpo_jax.data.list_layouts import list_segment
from dpo_jax.models.transformer import Decoder, ModelConfig

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
