"""The policies of the evaluation: a Markov policy's log-probs in model token ids, malformed completions."""

import numpy as np
import pytest

from dpo_jax.data import synthetic as syn
from dpo_jax.data import synthetic_exact as sx
from dpo_jax.evaluation import policies as pol
from tests.evaluation.test_sampled import world

OFF, EOS = syn.TOKEN_OFFSET, syn.EOS_ID


def test_markov_policy_log_probs_and_malformed_completions():
    w = world(vocab_size=4, completion_len=3)
    pi = sx.optimal_policy(w, 1.0)
    mp = pol.MarkovPolicy(pi)
    prompts = pol.make_prompts([[OFF + 1, OFF + 2], [OFF + 3]])
    toks = np.array([[OFF + 0, OFF + 3, OFF + 1, EOS], [OFF + 2, EOS, 0, 0]], np.int32)
    mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0]], np.float32)
    lp = mp.logprob(prompts, toks, mask)
    assert lp[0] == pytest.approx(sx.sequence_logprob(pi, 2, [0, 3, 1]))
    assert lp[1] == -np.inf  # EOS before T content tokens
    with pytest.raises(ValueError, match="not a content token"):
        mp.logprob(pol.make_prompts([[EOS]]), toks[:1], mask[:1])


def tiny_decoder(seed=0):
    from flax import nnx

    from dpo_jax.models.transformer import Decoder, ModelConfig

    cfg = ModelConfig(vocab_size=OFF + 3, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                      num_kv_heads=1, init_std=0.5)
    return Decoder(cfg, rngs=nnx.Rngs(seed))


def assert_same_completions(got, want, atol=0.0):
    np.testing.assert_array_equal(got.tokens_NxM, want.tokens_NxM)
    np.testing.assert_array_equal(got.mask_NxM, want.mask_NxM)
    np.testing.assert_allclose(got.logps_N, want.logps_N, atol=atol, rtol=0)


@pytest.mark.parametrize("kind", ["model", "markov"])
def test_samples_do_not_depend_on_batching(kind):
    """Row r is drawn from (key, r) alone: one call, two calls with their global row ids and (for the
    model) another chunking give the same completions; an empty share gives none."""
    import jax

    w = world(vocab_size=3, completion_len=3)
    prompts = pol.make_prompts([[OFF + i % 3, OFF + (i * 2) % 3][: 1 + i % 2] for i in range(7)]).repeat(2)
    if kind == "model":
        make = lambda bs: pol.ModelPolicy(tiny_decoder(), eos_id=EOS, batch_size=bs)  # noqa: E731
    else:
        make = lambda bs: pol.MarkovPolicy(sx.optimal_policy(w, 1.0))  # noqa: E731
    key, kw = jax.random.key(5), dict(max_new_tokens=4, temperature=1.0)
    whole = make(16).sample(prompts, key, **kw)
    assert len({tuple(r) for r in whole.tokens_NxM}) > 3
    atol = 1e-5 if kind == "model" else 0.0
    assert_same_completions(make(3).sample(prompts, key, **kw), whole, atol)
    k, n = 5, 14
    parts = [make(4).sample(prompts.select(np.arange(a, b)), key, row_ids_N=np.arange(a, b), **kw)
             for a, b in ((0, k), (k, n))]
    assert_same_completions(pol.Completions(*(np.concatenate(x) for x in zip(*parts))), whole, atol)
    empty = make(4).sample(prompts.select(np.arange(0)), key, row_ids_N=np.arange(0), **kw)
    assert empty.tokens_NxM.shape == (0, 4) and empty.logps_N.shape == (0,)
    with pytest.raises(ValueError, match="row_ids_N"):
        make(4).sample(prompts, key, row_ids_N=np.arange(3), **kw)
