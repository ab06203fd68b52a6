"""Sampled evaluation: the KL estimator against exact answers, win rate, the reward sources, and the
report of a training run (optimum/* and frontier/* included)."""

import concurrent.futures
import json
import textwrap
import threading

import numpy as np
import pytest
from flax import nnx

from dpo_jax.data import synthetic as syn
from dpo_jax.data import synthetic_exact as sx
from dpo_jax.evaluation import policies as pol
from dpo_jax.evaluation import sampled as ev
from dpo_jax.models.transformer import Decoder, ModelConfig

OFF, EOS = syn.TOKEN_OFFSET, syn.EOS_ID


def world(**kw):
    return sx.make_world(sx.WorldConfig(**kw))


def eval_prompts(w, n, seed=0):
    content = syn.sample_prompts(w, n, np.random.default_rng(seed))
    return content, pol.make_prompts([p + OFF for p in content])


def random_tabular(w, seed, alpha=0.5):
    rng = np.random.default_rng(seed)
    return sx.TabularPolicy(rng.dirichlet(np.full(w.vocab_size, alpha), size=(w.completion_len, w.vocab_size)))


def within(est, exact, se, k=4.0):
    assert abs(est - exact) <= k * se, f"estimate {est:.4f} vs exact {exact:.4f}: {abs(est - exact) / se:.1f} stderr"


@pytest.mark.parametrize("seed", [0, 1])
def test_sampled_kl_matches_exact_kl_of_two_markov_chains(seed):
    w = world(vocab_size=5, completion_len=6, seed=seed)
    content, prompts = eval_prompts(w, 32, seed)
    pi = random_tabular(w, seed + 10)
    e = ev.Evaluator(reference=pol.MarkovPolicy(sx.reference_policy(w)), prompts=prompts, samples_per_prompt=256,
                     seed=seed)
    out = e(pol.MarkovPolicy(pi))
    exact = sx.kl_to_ref(w, pi, content)
    assert 0 < out["sample/kl_stderr"] < 0.05 * exact
    within(out["sample/kl"], exact, out["sample/kl_stderr"])


def test_model_policy_kl_matches_enumeration_of_every_sequence():
    """A tiny random decoder without EOS: all V^3 completions enumerated give the exact KL; the sampler's
    log-probs equal teacher-forced scores, and the sampled estimate matches within its error."""
    cfg = ModelConfig(vocab_size=5, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                      init_std=0.6)
    pi = pol.ModelPolicy(Decoder(cfg, rngs=nnx.Rngs(0)), eos_id=(), batch_size=256)
    ref = pol.ModelPolicy(Decoder(cfg, rngs=nnx.Rngs(1)), eos_id=(), batch_size=256)
    prompts = pol.make_prompts([[1, 3], [4], [2, 2, 0]])
    seqs = np.stack(np.unravel_index(np.arange(125), (5, 5, 5)), axis=1).astype(np.int32)
    rep = pol.Prompts(np.repeat(prompts.tokens_BxP, 125, 0), np.repeat(prompts.lens_B, 125))
    toks, mask = np.tile(seqs, (3, 1)), np.ones((375, 3), np.float32)
    lp, lr = pi.logprob(rep, toks, mask).reshape(3, 125), ref.logprob(rep, toks, mask).reshape(3, 125)
    np.testing.assert_allclose(np.exp(lp).sum(1), 1.0, atol=1e-5)
    exact = float(np.mean((np.exp(lp) * (lp - lr)).sum(1)))
    e = ev.Evaluator(reference=ref, prompts=prompts, samples_per_prompt=512, max_new_tokens=3, eos_id=())
    comps = e.draw(pi, 0)
    np.testing.assert_allclose(comps.logps_N, pi.logprob(prompts.repeat(512), comps.tokens_NxM, comps.mask_NxM),
                               atol=1e-4)
    out = e(pi)
    assert out["sample/length"] == 3.0
    within(out["sample/kl"], exact, out["sample/kl_stderr"])


def test_win_rate_half_against_itself_and_rises_with_reward():
    w = world()
    content, prompts = eval_prompts(w, 32)
    ref = pol.MarkovPolicy(sx.reference_policy(w))
    e = ev.Evaluator(reference=ref, prompts=prompts, reward=ev.SyntheticReward(w), world=w, beta=1.0,
                     samples_per_prompt=64)
    self_play = e(ref)
    assert abs(self_play["sample/kl"]) < 1e-12 and self_play["sample/malformed_frac"] == 0.0
    within(self_play["sample/win_rate"], 0.5, self_play["sample/win_rate_stderr"])
    within(self_play["sample/reward"], sx.expected_reward(w, sx.reference_policy(w), content),
           self_play["sample/reward_stderr"])
    rates = [e(pol.MarkovPolicy(sx.optimal_policy(w, b)))["sample/win_rate"] for b in (8.0, 2.0, 0.5)]
    assert 0.55 < rates[0] < rates[1] < rates[2], rates


def barrier_gathers(count):
    """One fake `gather` per shard (run in threads): each waits for every shard's rows and returns
    them concatenated in shard order, as `multihost.allgather_rows` does across processes."""
    barrier, slots = threading.Barrier(count, timeout=120), [None] * count

    def make(i):
        def gather(rows):
            slots[i] = rows
            barrier.wait()
            out = np.concatenate(slots)
            barrier.wait()  # every shard has read before any writes its next array
            return out
        return gather
    return [make(i) for i in range(count)]


def sharded(make_evaluator, policy, count):
    """The reports of `count` shards evaluating `policy` in lockstep (twice: the reference's samples
    are cached after the first call)."""
    evaluators = [make_evaluator(shard=(i, count), gather=g) for i, g in enumerate(barrier_gathers(count))]
    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        return [list(pool.map(lambda e: e(policy), evaluators)) for _ in range(2)]


@pytest.mark.parametrize("kind", ["model", "markov"])
@pytest.mark.parametrize("count", [2, 3])
def test_sharded_evaluation_equals_one_process(kind, count):
    """5 prompts x 2 samples split over 2 (5 + 5 rows, a prompt across the boundary) or 3 shards (4 + 3 + 3):
    every shard reports what one unsharded evaluation reports (synthetic reward, world metrics)."""
    w = world(vocab_size=3, completion_len=3, seed=2)
    _, prompts = eval_prompts(w, 5, seed=4)
    if kind == "model":
        cfg = ModelConfig(vocab_size=OFF + 3, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                          num_kv_heads=1, init_std=0.3)
        policy, reference = (Decoder(cfg, rngs=nnx.Rngs(i)) for i in (0, 1))
    else:
        policy, reference = pol.MarkovPolicy(random_tabular(w, 3)), pol.MarkovPolicy(sx.reference_policy(w))

    def make(**kw):
        return ev.Evaluator(reference=reference, prompts=prompts, reward=ev.SyntheticReward(w), world=w, beta=1.0,
                            samples_per_prompt=2, batch_size=3, seed=7, **kw)

    one = make()(policy)
    assert {"sample/kl", "sample/reward", "sample/win_rate", "optimum/kl", "frontier/regret"} <= set(one)
    assert one["sample/reward"] != one["sample/reward_ref"]
    for reports in sharded(make, policy, count):
        for i, got in enumerate(reports):
            assert set(got) == set(one), f"shard {i}"
            for k, v in one.items():
                assert got[k] == pytest.approx(v, rel=1e-6, abs=1e-6), f"shard {i}/{count}: {k}"


def test_sharding_edge_cases_name_the_field():
    """A shard may hold no rows (3 shards, 2 rows); a gather that does not return every shard's rows and a
    bad shard raise errors that name them."""
    w = world(vocab_size=3, completion_len=3)
    _, prompts = eval_prompts(w, 1)

    def make(**kw):
        return ev.Evaluator(reference=pol.MarkovPolicy(sx.reference_policy(w)), prompts=prompts,
                            reward=ev.SyntheticReward(w), world=w, beta=1.0, samples_per_prompt=2, **kw)

    policy = pol.MarkovPolicy(random_tabular(w, 1))
    one = make()(policy)
    for reports in sharded(make, policy, 3):
        assert all(r == one for r in reports)
    with pytest.raises(ValueError, match="gather"):
        make(shard=(0, 2))(policy)
    with pytest.raises(ValueError, match="shard"):
        make(shard=(2, 2))


def test_synthetic_reward_rules():
    w = world(vocab_size=4, completion_len=3)
    reward = ev.SyntheticReward(w)
    prompt = np.array([OFF + 1, OFF + 2])
    comps = [np.array([OFF + 0, OFF + 3, OFF + 1, EOS]),  # well-formed
             np.array([OFF + 0, EOS]),  # early EOS: one step, two missing
             np.array([OFF + 0, OFF + 3, 1]),  # a special token in place of content
             np.array([OFF + 0, OFF + 3, OFF + 1, OFF + 2])]  # no EOS after T tokens
    r, bad = reward([prompt] * 4, comps)
    full = sx.sequence_reward(w, 2, [0, 3, 1])
    worst = w.reward_VxV.min()
    np.testing.assert_allclose(r, [full, w.reward_VxV[2, 0] + 2 * worst,
                                   w.reward_VxV[2, 0] + w.reward_VxV[0, 3] + worst, full])
    assert bad.tolist() == [False, True, True, True]


@pytest.fixture(scope="module")
def world_tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    path = syn.save_tokenizer(world(), str(tmp_path_factory.mktemp("tok")))
    return path, AutoTokenizer.from_pretrained(path)


def test_callable_reward_source(tmp_path, monkeypatch, world_tokenizer):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent("""
        def count_t1(prompts, completions):
            return [c.split().count("t1") + 0.1 * len(p.split()) for p, c in zip(prompts, completions)]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    source = ev.make_reward("my_rewards:count_t1", tok=world_tokenizer[1])
    r, bad = source([np.array([5, 6]), np.array([7])], [np.array([5, 5, 4, EOS]), np.array([4, 6])])
    np.testing.assert_allclose(r, [2.2, 0.1])
    assert bad.tolist() == [False, True]  # the second never ended with EOS
    with pytest.raises(ValueError, match="cannot import"):
        ev.make_reward("my_rewards:missing", tok=world_tokenizer[1])
    with pytest.raises(ValueError, match="config.eval.reward"):
        ev.make_reward("not_a_spec", tok=world_tokenizer[1])
    assert ev.make_reward("", tok=world_tokenizer[1]) is None  # no world, no reward


def test_reward_model_directory(tmp_path, world_tokenizer):
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=12, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, num_labels=1, pad_token_id=0, eos_token_id=EOS, bos_token_id=1)
    LlamaForSequenceClassification(cfg).save_pretrained(tmp_path)
    shutil.copytree(world_tokenizer[0], tmp_path, dirs_exist_ok=True)
    source = ev.make_reward(str(tmp_path), tok=world_tokenizer[1])
    assert isinstance(source, ev.ModelReward)
    prompts = [np.array([5, 6]), np.array([7, 8, 9])]
    comps = [np.array([4, 4, 4, 10, EOS]), np.array([9, EOS])]
    r, bad = source(prompts, comps)
    assert r.shape == (2,) and np.all(np.isfinite(r)) and r[0] != r[1] and not bad.any()
    alone = [source([p], [c])[0][0] for p, c in zip(prompts, comps)]
    np.testing.assert_allclose(r, alone, rtol=1e-5)  # padding in a batch changes nothing


def test_training_run_reports_sampled_and_exact_metrics(tmp_path):
    from configs import synthetic as synthetic_config
    from dpo_jax import runner
    from dpo_jax.train import metrics

    c = synthetic_config.get_config("runlocal=1")
    c.sft.steps = 0
    c.train.update(steps=1, progress=False, export_final=False, checkpoint_every=0)
    c.eval.update(num_prompts=8, samples_per_prompt=2)
    report = runner.run(c, str(tmp_path))
    keys = ("eval/accuracy", "eval/loss", "sample/reward", "sample/reward_ref", "sample/kl", "sample/kl_stderr",
            "sample/win_rate", "optimum/reward", "optimum/kl", "frontier/reward_at_kl", "frontier/regret")
    on_disk = json.loads((tmp_path / "report.json").read_text())
    last = metrics.read_jsonl(str(tmp_path / "metrics.jsonl"))[-1]
    for k in keys:
        assert isinstance(report[k], float) and on_disk[k] == report[k] and last[k] == report[k], k
    assert report["sample/num_prompts"] == 8.0
    assert report["frontier/regret"] == pytest.approx(report["frontier/reward_at_kl"] - report["sample/reward"])
    w = syn.load_world(str(tmp_path / "data"))
    rows = metrics.read_jsonl(str(tmp_path / "data" / "eval_pairs.jsonl"))[:8]
    content = np.stack([syn.text_to_tokens(r["prompt"]) for r in rows])
    star = sx.optimal_policy(w, c.loss.beta)
    assert report["optimum/kl"] == pytest.approx(sx.kl_to_ref(w, star, content), rel=1e-9)
    assert report["optimum/reward"] == pytest.approx(sx.expected_reward(w, star, content), rel=1e-9)



def test_reward_model_without_safetensors_is_refused(tmp_path, world_tokenizer):
    """A pickled `pytorch_model.bin` could run code when loaded: only safetensors weights load."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    cfg = LlamaConfig(vocab_size=12, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, num_labels=1, pad_token_id=0, eos_token_id=EOS, bos_token_id=1)
    model = LlamaForSequenceClassification(cfg)
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")  # the pickled weights format
    assert not list(tmp_path.glob("*.safetensors"))
    shutil.copytree(world_tokenizer[0], tmp_path, dirs_exist_ok=True)
    with pytest.raises((OSError, ValueError), match="safetensors"):
        ev.make_reward(str(tmp_path), tok=world_tokenizer[1])
