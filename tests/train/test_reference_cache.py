"""Tests of the precomputed-reference cache: same training as a frozen reference, reused, keyed."""

import json

import numpy as np
import pytest

from dpo_jax import runner
from dpo_jax.train import reference_cache
from dpo_jax.data import layouts


def synthetic_config(**ref):
    from configs import synthetic

    c = synthetic.get_config("runlocal=1")
    c.sft.steps = 0
    c.train.update(steps=4, log_every=1, checkpoint_every=0, progress=False, export_final=False)
    c.reference.update(ref)
    return c


def losses_by_step(workdir):
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_precomputed_trains_like_frozen_and_reuses_its_cache(tmp_path, monkeypatch):
    frozen = runner.run(synthetic_config(), str(tmp_path / "frozen"))
    cache = tmp_path / "cache"
    pre = runner.run(synthetic_config(mode="precomputed", cache_dir=str(cache)), str(tmp_path / "pre"))
    a, b = losses_by_step(tmp_path / "frozen"), losses_by_step(tmp_path / "pre")
    assert sorted(a) == [1, 2, 3, 4]
    np.testing.assert_allclose([b[s] for s in a], [a[s] for s in a], rtol=1e-6)
    np.testing.assert_allclose(pre["eval/loss"], frozen["eval/loss"], rtol=1e-6)
    assert len(list(cache.glob("*.npz"))) == 2  # train and eval splits

    def fail(*a, **k):
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr(reference_cache, "compute", fail)
    again = runner.run(synthetic_config(mode="precomputed", cache_dir=str(cache)), str(tmp_path / "again"))
    assert again["eval/loss"] == pre["eval/loss"]


def test_cache_key_depends_on_weights_tokenizer_data_and_settings(tmp_path):
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("{}")
    params = {"w": np.ones((3, 2), np.float32)}
    rows = reference_cache.IndexedRows([{"prompt": "a ", "chosen": "b", "rejected": "c"}])
    base = reference_cache.cache_key(params, str(tmp_path / "tok"), rows, {"max_length": 16})
    assert base == reference_cache.cache_key(params, str(tmp_path / "tok"), rows, {"max_length": 16})
    assert base != reference_cache.cache_key({"w": params["w"] * 2}, str(tmp_path / "tok"), rows, {"max_length": 16})
    assert base != reference_cache.cache_key(params, str(tmp_path / "tok"), rows, {"max_length": 32})
    other = reference_cache.IndexedRows([{"prompt": "a ", "chosen": "b", "rejected": "d"}])
    assert base != reference_cache.cache_key(params, str(tmp_path / "tok"), other, {"max_length": 16})
    (tmp_path / "tok" / "tokenizer.json").write_text('{"x": 1}')
    assert base != reference_cache.cache_key(params, str(tmp_path / "tok"), rows, {"max_length": 16})


def test_attach_reference_and_layout_carry_values():
    values = {k: np.array([1.0, np.nan, 3.0], np.float32) + i for i, k in enumerate(reference_cache.KEYS)}
    step = reference_cache.AttachReference(lambda row: {"prompt_ids": np.array([5, 6], np.int32),
                                                        "chosen_ids": np.array([7, 2], np.int32),
                                                        "rejected_ids": np.array([8, 2], np.int32)}, values)
    rows = reference_cache.IndexedRows([{"x": 0}, {"x": 1}, {"x": 2}])
    ex = step(rows[2])
    assert ex["ref_chosen"] == 3.0 and ex["ref_rejected_shared"] == 6.0
    with pytest.raises(ValueError, match="row 1 has no precomputed reference"):
        step(rows[1])
    spec = layouts.LayoutSpec(num_pairs=2, buckets=(8,), pair_scalars=reference_cache.KEYS)
    batch = spec([ex])
    np.testing.assert_array_equal(batch["ref_chosen_P"], [3.0, 0.0])
    with pytest.raises(ValueError, match="missing per-pair field 'ref_chosen'"):
        spec([{k: v for k, v in ex.items() if not k.startswith("ref_")}])
