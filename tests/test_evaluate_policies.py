"""The policies of the evaluation: a Markov policy's log-probs in model token ids, malformed completions."""

import numpy as np
import pytest

from dpo_jax import evaluate_policies as pol
from dpo_jax.data import synthetic as syn
from tests.test_evaluate import world

OFF, EOS = syn.TOKEN_OFFSET, syn.EOS_ID


def test_markov_policy_log_probs_and_malformed_completions():
    w = world(vocab_size=4, completion_len=3)
    pi = syn.optimal_policy(w, 1.0)
    mp = pol.MarkovPolicy(pi)
    prompts = pol.make_prompts([[OFF + 1, OFF + 2], [OFF + 3]])
    toks = np.array([[OFF + 0, OFF + 3, OFF + 1, EOS], [OFF + 2, EOS, 0, 0]], np.int32)
    mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0]], np.float32)
    lp = mp.logprob(prompts, toks, mask)
    assert lp[0] == pytest.approx(syn.sequence_logprob(pi, 2, [0, 3, 1]))
    assert lp[1] == -np.inf  # EOS before T content tokens
    with pytest.raises(ValueError, match="not a content token"):
        mp.logprob(pol.make_prompts([[EOS]]), toks[:1], mask[:1])
