"""Sampler: greedy = argmax of a full forward, log-probs = teacher forcing, EOS, ragged prompts,
top-k / top-p, the nucleus filter against a NumPy reference, per-row randomness (any split of the
rows with their global ids samples the same), the per-step logit bias, and one compile per shape bucket.

Every reference value is recomputed here from a plain (cache-free) forward of prompt + completion."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dpo_jax.models import sampler
from dpo_jax.models.transformer import Decoder, ModelConfig

_BASE = dict(vocab_size=61, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=4,
             max_position_embeddings=64, init_std=0.3)
PRESETS = {
    "llama": dict(num_kv_heads=2),
    "gpt2": dict(family="gpt2", norm="layer", norm_eps=1e-5, activation="gelu_tanh", gated_mlp=False,
                 position="learned", qkv_bias=True, o_bias=True, mlp_bias=True, tie_embeddings=True),
}
LENS = (7, 3, 1, 5)
P, N = 8, 6


def tiny_model(preset="llama", seed=0, **kw):
    return Decoder(ModelConfig(**{**_BASE, **PRESETS[preset], **kw}), rngs=nnx.Rngs(seed))


def prompts(lens=LENS, width=P, seed=0):
    """Right-padded prompts; the padding slots hold random junk (it must never matter)."""
    toks = np.random.default_rng(seed).integers(3, 61, (len(lens), width)).astype(np.int32)
    return jnp.asarray(toks), jnp.asarray(lens, jnp.int32)


@nnx.jit
def _forward_logps(model, seq_BxT, seg_BxT):
    return jax.nn.log_softmax(model.logits(model(seq_BxT, segment_ids_BxT=seg_BxT)), axis=-1)


def full_logps(model, toks, lens, completions_BxN):
    """[B, N, V] float32 log-softmax predicting each completion token, from one cache-free forward over
    rows `prompt[:len] + completion` packed contiguously (right-padded to P + N)."""
    toks, completions_BxN = np.asarray(toks), np.asarray(completions_BxN)
    B, N = completions_BxN.shape
    T = toks.shape[1] + N
    seq, seg = np.zeros((B, T), np.int32), np.zeros((B, T), np.int32)
    for b, n in enumerate(np.asarray(lens)):
        seq[b, :n + N] = np.concatenate([toks[b, :n], completions_BxN[b]])
        seg[b, :n + N] = 1
    logps = np.asarray(_forward_logps(model, jnp.asarray(seq), jnp.asarray(seg)))
    return np.stack([logps[b, n - 1:n - 1 + N] for b, n in enumerate(np.asarray(lens))])


def picked(logps_BxNxV, tokens_BxN):
    return np.take_along_axis(logps_BxNxV, np.asarray(tokens_BxN)[..., None], axis=-1)[..., 0]


@pytest.fixture(scope="module", params=sorted(PRESETS))
def greedy_run(request):
    model = tiny_model(request.param)
    toks, lens = prompts()
    return model, toks, lens, sampler.sample(model, toks, lens, jax.random.key(0), max_new_tokens=N, temperature=0.0)


def test_greedy_is_argmax_of_full_forward(greedy_run):
    model, toks, lens, s = greedy_run
    assert s.tokens_BxN.shape == (4, N) and s.tokens_BxN.dtype == jnp.int32
    assert s.logps_BxN.dtype == jnp.float32
    np.testing.assert_array_equal(s.mask_BxN, 1.0)  # no EOS configured
    np.testing.assert_array_equal(s.lengths_B, N)
    np.testing.assert_array_equal(s.sample_logps_BxN, 0.0)
    ref = full_logps(model, toks, lens, s.tokens_BxN)
    np.testing.assert_array_equal(np.argmax(ref, axis=-1), s.tokens_BxN)
    np.testing.assert_allclose(s.logps_BxN, picked(ref, s.tokens_BxN), atol=1e-5, rtol=0)


def test_ragged_batch_equals_each_row_alone(greedy_run):
    """Row b decodes the same next to rows of other lengths as next to copies of itself (zero padding
    instead of junk; the same [B, P] program)."""
    model, toks, lens, s = greedy_run
    for b, n in enumerate(LENS):
        row = jnp.zeros((P,), jnp.int32).at[:n].set(toks[b, :n])
        alone = sampler.sample(model, jnp.tile(row, (len(LENS), 1)), jnp.full((len(LENS),), n, jnp.int32),
                               jax.random.key(0), max_new_tokens=N, temperature=0.0)
        for r in range(len(LENS)):
            np.testing.assert_array_equal(alone.tokens_BxN[r], s.tokens_BxN[b], err_msg=f"row {b}")
            np.testing.assert_allclose(alone.logps_BxN[r], s.logps_BxN[b], atol=1e-5, rtol=0)


def test_eos_stops_each_row_at_its_first_eos(greedy_run):
    model, toks, lens, s = greedy_run
    greedy = np.asarray(s.tokens_BxN)
    eos = int(greedy[0, 2])  # certain to be emitted by row 0 at step 2 at the latest
    out = sampler.sample(model, toks, lens, jax.random.key(0), max_new_tokens=N, temperature=0.0, eos_id=eos,
                         pad_id=0)
    for b in range(len(LENS)):
        hits = np.flatnonzero(greedy[b] == eos)
        stop = int(hits[0]) + 1 if hits.size else N
        np.testing.assert_array_equal(out.tokens_BxN[b, :stop], greedy[b, :stop], err_msg=f"row {b}")
        np.testing.assert_array_equal(out.tokens_BxN[b, stop:], 0, err_msg=f"row {b}: pad after EOS")
        np.testing.assert_array_equal(out.mask_BxN[b], np.arange(N) < stop)
        np.testing.assert_array_equal(out.logps_BxN[b, stop:], 0.0)
        np.testing.assert_allclose(out.logps_BxN[b, :stop], s.logps_BxN[b, :stop], atol=1e-6)
        assert int(out.lengths_B[b]) == stop and bool(out.finished_B[b]) == bool(hits.size)
    assert int(out.lengths_B[0]) <= 3
    # several EOS ids, and the default from the model config
    two = sampler.sample(model, toks, lens, jax.random.key(0), max_new_tokens=N, temperature=0.0,
                         eos_id=(eos, int(greedy[1, 0])))
    assert int(two.lengths_B[1]) == 1 and bool(two.finished_B[1])
    if model.cfg.family == "llama":  # the config's eos_token_id is the default (a new graphdef: one compile)
        cfg_model = Decoder(dataclasses.replace(model.cfg, eos_token_id=eos), rngs=nnx.Rngs(0))  # same weights
        default = sampler.sample(cfg_model, toks, lens, jax.random.key(0), max_new_tokens=N, temperature=0.0)
        np.testing.assert_array_equal(default.tokens_BxN, out.tokens_BxN)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_sampled_logps_equal_teacher_forcing(preset):
    model = tiny_model(preset, seed=1)
    toks, lens = prompts(seed=1)
    temperature, top_k, top_p = 0.8, 12, 0.9
    s = sampler.sample(model, toks, lens, jax.random.key(3), max_new_tokens=N, temperature=temperature,
                       top_k=top_k, top_p=top_p)
    scored = sampler.score(model, toks, lens, s.tokens_BxN, s.mask_BxN)
    np.testing.assert_allclose(scored, s.logps_BxN, atol=1e-5, rtol=0)
    ref = full_logps(model, toks, lens, s.tokens_BxN)
    np.testing.assert_allclose(s.logps_BxN, picked(ref, s.tokens_BxN), atol=1e-5, rtol=0)
    q = np.stack([np_filtered_logprobs(r, temperature, top_k, top_p) for r in ref])  # shift-invariant
    np.testing.assert_allclose(s.sample_logps_BxN, picked(q, s.tokens_BxN), atol=1e-5, rtol=0)
    assert not np.allclose(s.sample_logps_BxN, s.logps_BxN), "degenerate: filtering changed nothing"


def test_rows_sample_the_same_in_any_split():
    """Row r draws from (key, r) alone: rows [0, N) at once, as [0, k) and [k, N) with their global ids,
    and reversed, give the same completions; identical prompts in one batch still differ."""
    model = tiny_model(seed=3)
    lens = (7, 3, 1, 5, 2, 6, 4)
    toks, lens = prompts(lens=lens, seed=4)
    kw = dict(max_new_tokens=N, temperature=1.2, top_k=20, eos_id=(5, 9), pad_id=0)
    whole = sampler.sample(model, toks, lens, jax.random.key(11), **kw)
    k = 3
    head = sampler.sample(model, toks[:k], lens[:k], jax.random.key(11), row_ids_B=np.arange(k), **kw)
    tail = sampler.sample(model, toks[k:], lens[k:], jax.random.key(11), row_ids_B=np.arange(k, 7), **kw)
    back = sampler.sample(model, toks[::-1], lens[::-1], jax.random.key(11), row_ids_B=np.arange(7)[::-1], **kw)
    for name in ("tokens_BxN", "mask_BxN", "finished_B"):
        want = np.asarray(getattr(whole, name))
        np.testing.assert_array_equal(np.concatenate([getattr(head, name), getattr(tail, name)]), want, name)
        np.testing.assert_array_equal(np.asarray(getattr(back, name))[::-1], want, name)
    for name in ("logps_BxN", "sample_logps_BxN"):
        want = np.asarray(getattr(whole, name))
        np.testing.assert_allclose(np.concatenate([getattr(head, name), getattr(tail, name)]), want, atol=1e-5)
        np.testing.assert_allclose(np.asarray(getattr(back, name))[::-1], want, atol=1e-5)
    assert len({tuple(r) for r in np.asarray(whole.tokens_BxN)}) > 1
    same = sampler.sample(model, jnp.tile(toks[:1], (6, 1)), jnp.full((6,), lens[0]), jax.random.key(11), **kw)
    assert len({tuple(r) for r in np.asarray(same.tokens_BxN)}) > 1, "identical prompts drew identical rows"
    other = sampler.sample(model, toks, lens, jax.random.key(11), row_ids_B=np.arange(7) + 7, **kw)
    assert not np.array_equal(other.tokens_BxN, whole.tokens_BxN), "row ids changed nothing"


def test_score_masks_and_rejects_bad_shapes():
    model = tiny_model()
    toks, lens = prompts()
    comp = jnp.asarray(np.random.default_rng(5).integers(0, 61, (4, 5)), jnp.int32)
    mask = jnp.asarray(np.arange(5)[None] < np.array([5, 2, 0, 4])[:, None], jnp.float32)
    out = sampler.score(model, toks, lens, comp, mask)
    full = sampler.score(model, toks, lens, comp, jnp.ones_like(mask))
    np.testing.assert_array_equal(np.asarray(out)[np.asarray(mask) == 0], 0.0)
    np.testing.assert_allclose(np.asarray(out)[np.asarray(mask) > 0], np.asarray(full)[np.asarray(mask) > 0],
                               atol=1e-6)
    with pytest.raises(ValueError, match="mask_BxN"):
        sampler.score(model, toks, lens, comp, mask[:, :3])
    with pytest.raises(ValueError, match="completions_BxN"):
        sampler.score(model, toks, lens, comp[:2], mask[:2])


def test_top_k_one_and_tiny_top_p_equal_greedy(greedy_run):
    model, toks, lens, s = greedy_run
    for kw in (dict(top_k=1), dict(top_p=1e-6), dict(top_k=1, temperature=0.3)):
        out = sampler.sample(model, toks, lens, jax.random.key(7), max_new_tokens=N, **{"temperature": 1.0, **kw})
        np.testing.assert_array_equal(out.tokens_BxN, s.tokens_BxN, err_msg=str(kw))
        np.testing.assert_allclose(out.logps_BxN, s.logps_BxN, atol=1e-6)
        np.testing.assert_allclose(out.sample_logps_BxN, 0.0, atol=1e-6)  # a one-token support


def test_prompt_buckets_pad_to_the_bucket(greedy_run):
    model, toks, lens, s = greedy_run
    out = sampler.sample(model, toks[:, :max(LENS)], lens, jax.random.key(0), max_new_tokens=N, temperature=0.0,
                         prompt_buckets=(4, P, 16))  # padded back to width P: the same program
    np.testing.assert_array_equal(out.tokens_BxN, s.tokens_BxN)
    np.testing.assert_allclose(out.logps_BxN, s.logps_BxN, atol=1e-6)


def test_compiles_once_per_shape_bucket():
    """Sampling knobs, EOS / pad ids, keys, row ids, prompt contents and lengths, and prompt widths
    inside one bucket share one program; a new max_new_tokens compiles one more."""
    model = tiny_model(seed=2)
    knobs = [dict(temperature=0.0), dict(temperature=1.0, eos_id=5), dict(temperature=0.7, top_k=5, pad_id=3),
             dict(temperature=1.3, top_p=0.8, eos_id=(4, 9)), dict(temperature=1.0, top_k=3, top_p=0.5)]
    for i, kw in enumerate(knobs):
        width = (5, 7, 8)[i % 3]
        toks_i, lens_i = prompts(lens=(width, 1 + i, 2, 4), width=width, seed=10 + i)
        sampler.sample(model, toks_i, lens_i, jax.random.key(i), max_new_tokens=N, prompt_buckets=(P, 16),
                       row_ids_B=None if i == 0 else np.arange(4) + 100 * i, **kw)
        if i == 0:
            first = sampler.trace_count("sample")
    assert sampler.trace_count("sample") == first, "knobs, ids, keys or prompts inside a bucket recompiled"
    toks, lens = prompts(seed=2)
    sampler.sample(model, toks, lens, jax.random.key(0), max_new_tokens=N + 3)  # a shape no other test uses
    assert sampler.trace_count("sample") == first + 1
    n_score = sampler.trace_count("score")
    for i in range(3):
        sampler.score(model, toks, lens, toks[:, :3] + i, jnp.ones((4, 3)))
    assert sampler.trace_count("score") == n_score + 1


def test_step_bias_forbids_tokens_and_renormalizes():
    """A per-step bias (-inf forbids, finite shifts): forbidden tokens are never drawn, and logps,
    sample_logps and score are the log-probs of softmax(logits + bias_n) (then filtered); greedy takes
    the argmax of the biased logits; new bias values of one shape compile nothing new."""
    model = tiny_model(seed=4)
    toks, lens = prompts(seed=4)
    toks, lens = jnp.tile(toks, (16, 1)), jnp.tile(lens, 16)
    rng = np.random.default_rng(0)
    allowed_NxV = rng.random((N, 61)) < 0.3
    allowed_NxV[:, 7] = True
    bias_NxV = np.where(allowed_NxV, rng.normal(size=(N, 61)), -np.inf).astype(np.float32)
    s = sampler.sample(model, toks, lens, jax.random.key(1), max_new_tokens=N, temperature=1.0, step_bias_NxV=bias_NxV)
    tokens = np.asarray(s.tokens_BxN)
    assert allowed_NxV[np.arange(N)[None, :], tokens].all(), "a forbidden token was drawn"
    assert len(set(tokens.ravel())) > N
    biased = full_logps(model, toks, lens, tokens) + bias_NxV[None]
    biased = biased - np.log(np.exp(biased).sum(-1, keepdims=True))  # renormalized over the allowed tokens
    np.testing.assert_allclose(s.logps_BxN, picked(biased, tokens), atol=2e-5, rtol=0)
    np.testing.assert_allclose(s.sample_logps_BxN, s.logps_BxN, atol=1e-6)
    scored = sampler.score(model, toks, lens, s.tokens_BxN, s.mask_BxN, step_bias_NxV=bias_NxV)
    np.testing.assert_allclose(scored, s.logps_BxN, atol=2e-5, rtol=0)
    other = tokens.copy()
    other[:, 0] = np.flatnonzero(~allowed_NxV[0])[0]
    forbidden = sampler.score(model, toks, lens, other, s.mask_BxN, step_bias_NxV=bias_NxV)
    assert np.isneginf(np.asarray(forbidden)[:, 0]).all()
    filtered = sampler.sample(model, toks, lens, jax.random.key(2), max_new_tokens=N, temperature=0.7, top_k=5,
                              step_bias_NxV=bias_NxV)
    ref = full_logps(model, toks, lens, filtered.tokens_BxN) + bias_NxV[None]
    q = np.stack([np_filtered_logprobs(r, 0.7, 5, 1.0) for r in ref])
    np.testing.assert_allclose(filtered.sample_logps_BxN, picked(q, filtered.tokens_BxN), atol=2e-5, rtol=0)
    greedy = sampler.sample(model, toks, lens, jax.random.key(0), max_new_tokens=N, temperature=0.0,
                            step_bias_NxV=bias_NxV)
    np.testing.assert_array_equal(greedy.tokens_BxN, np.argmax(full_logps(model, toks, lens, greedy.tokens_BxN)
                                                               + bias_NxV[None], axis=-1))
    n_sample, n_score = sampler.trace_count("sample"), sampler.trace_count("score")
    for i in range(2):
        shifted = bias_NxV + np.float32(i)
        sampler.sample(model, toks, lens, jax.random.key(i), max_new_tokens=N, temperature=1.0, step_bias_NxV=shifted)
        sampler.score(model, toks, lens, s.tokens_BxN, s.mask_BxN, step_bias_NxV=shifted)
    assert (sampler.trace_count("sample"), sampler.trace_count("score")) == (n_sample, n_score)


@pytest.mark.parametrize("bias,match", [
    (np.zeros((N - 1, 61)), "step_bias_NxV must have shape"),
    (np.zeros((N, 60)), "step_bias_NxV must have shape"),
    (np.where(np.arange(N)[:, None] == 2, -np.inf, np.zeros((N, 61))), "step_bias_NxV row 2 forbids every token"),
    (np.full((N, 61), np.nan), "step_bias_NxV must be finite or -inf"),
])
def test_bad_step_bias_names_the_field(bias, match):
    model = tiny_model()
    toks, lens = prompts()
    with pytest.raises(ValueError, match=match):
        sampler.sample(model, toks, lens, jax.random.key(0), max_new_tokens=N, step_bias_NxV=bias)
    with pytest.raises(ValueError, match=match):
        sampler.score(model, toks, lens, toks[:, :N], jnp.ones((4, N)), step_bias_NxV=bias)


@pytest.mark.parametrize("kw,match", [
    (dict(lens=(0, 1, 1, 1)), "prompt_lens_B"),
    (dict(lens=(9, 1, 1, 1)), "prompt_lens_B"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(temperature=-0.5), "temperature"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=60, preset="gpt2"), "max_position_embeddings"),
    (dict(prompt_buckets=(4,)), "prompt_buckets"),
    (dict(eos_id=61), "eos_id"),
    (dict(row_ids_B=np.arange(3)), "row_ids_B"),
    (dict(row_ids_B=np.zeros(4)), "row_ids_B"),
])
def test_bad_arguments_name_the_field(kw, match):
    kw = dict(kw)
    model = tiny_model(kw.pop("preset", "llama"))
    toks, _ = prompts()
    lens = jnp.asarray(kw.pop("lens", LENS), jnp.int32)
    with pytest.raises(ValueError, match=match):
        sampler.sample(model, toks, lens, jax.random.key(0), **{"max_new_tokens": N, **kw})


# ----------------------------------------------------------------------------- the token choice alone


def np_filtered_logprobs(logits, temperature, top_k, top_p):
    """NumPy reference of temperature -> top-k -> top-p (HF warper order), as log-probs."""
    x = np.asarray(logits, np.float64) / temperature
    out = np.full_like(x, -np.inf)
    for i, row in enumerate(x):
        order = np.argsort(-row, kind="stable")
        keep = order[:top_k] if top_k else order
        p = np.exp(row[keep] - row[keep].max())
        p /= p.sum()
        mass_before = np.cumsum(p) - p
        keep = keep[(mass_before < top_p) | (np.arange(len(keep)) == 0)]
        out[i, keep] = row[keep] - np.log(np.exp(row[keep]).sum())
    return out


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.5, 4, 1.0), (1.0, 0, 0.6), (2.0, 6, 0.7),
                                                     (1.0, 100, 0.95)])
def test_filter_logits_matches_numpy_reference(temperature, top_k, top_p):
    logits = np.random.default_rng(0).normal(size=(5, 20)).astype(np.float32) * 2
    got = np.asarray(jax.nn.log_softmax(sampler.filter_logits(jnp.asarray(logits), temperature, top_k, top_p)))
    want = np_filtered_logprobs(logits, temperature, top_k, top_p)
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    np.testing.assert_allclose(got[np.isfinite(want)], want[np.isfinite(want)], atol=1e-5)


def test_choose_tokens_draws_from_the_filtered_distribution():
    logits = jnp.log(jnp.asarray([[0.4, 0.3, 0.15, 0.1, 0.05]]))
    draws = sampler.choose_tokens(jnp.tile(logits, (20000, 1)), jax.random.key(0), 1.0, 0, 0.8)[0]
    counts = np.bincount(np.asarray(draws), minlength=5) / 20000
    np.testing.assert_allclose(counts, [0.4 / 0.85, 0.3 / 0.85, 0.15 / 0.85, 0, 0], atol=0.015)
    token, logp, slogp = sampler.choose_tokens(logits, jax.random.key(1), 0.0, 0, 1.0)
    assert int(token[0]) == 0 and float(slogp[0]) == 0.0
    np.testing.assert_allclose(logp, np.log(0.4), rtol=1e-6)
