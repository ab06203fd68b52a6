"""Summed completion log-probs of the TRL fixture's 16 pairs under its policy and reference checkpoints,
per pair, in one standard-layout batch and in one prefix-sharing batch (docs/design.md, "The batch").

Goldens: tests/fixtures/trl_parity/trl_reference.json, produced by make_reference.py there with
TRL 1.16 / transformers 5.23 on CPU in float32 (see PROVENANCE.md for how to regenerate)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dpo_jax.models import hf

RTOL = 1e-5
HOW = "goldens: tests/fixtures/trl_parity/trl_reference.json (TRL 1.16 DPOTrainer, fp32; see PROVENANCE.md)"


@pytest.fixture(scope="module")
def fixture(trl_fixture_dir):
    ref = json.loads((trl_fixture_dir / "trl_reference.json").read_text())
    models = {name: hf.load_model(trl_fixture_dir / name) for name in ("policy", "reference")}
    return ref["pairs"], models


@nnx.jit
def _token_logps(model, tokens, positions, segments, branches, targets):
    """log p(targets[b, t] | row b up to t) in float32 (the naive full-vocabulary path)."""
    hidden = model(tokens, positions_BxT=positions, segment_ids_BxT=segments, branch_ids_BxT=branches)
    logp = jax.nn.log_softmax(model.logits(hidden), axis=-1)
    return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def _run(model, rows):
    """rows: list of dicts of equal-length int lists -> token log-probs [B, T] (numpy)."""
    arrays = [jnp.asarray(np.array([r[k] for r in rows], np.int32))
              for k in ("tokens", "positions", "segments", "branches", "targets")]
    return np.asarray(_token_logps(model, *arrays))


def _pad(row, T):
    return {k: v + [0] * (T - len(v)) for k, v in row.items()}


def _standard_row(prompt, completion):
    """[prompt][completion]; the target of t is token t+1; counted where it is a completion token."""
    seq = prompt + completion
    n = len(seq)
    return {"tokens": seq, "positions": list(range(n)), "segments": [1] * n, "branches": [0] * n,
            "targets": seq[1:] + [0], "mask": [0] * (len(prompt) - 1) + [1] * len(completion) + [0]}


def _shared_row(prompt, chosen, rejected):
    """[prompt[:-1]][prompt[-1], chosen][prompt[-1], rejected], positions continuing from the prompt
    and restarting for the rejected branch; branch 1 = chosen, 2 = rejected."""
    n = len(prompt) - 1
    row = {"tokens": prompt[:-1], "positions": list(range(n)), "segments": [1] * n, "branches": [0] * n,
           "targets": [0] * n, "mask": [0] * n, "which": [0] * n}
    for b, comp in ((1, chosen), (2, rejected)):
        toks = [prompt[-1]] + comp
        row["tokens"] += toks
        row["positions"] += list(range(n, n + len(toks)))
        row["segments"] += [1] * len(toks)
        row["branches"] += [b] * len(toks)
        row["targets"] += comp + [0]
        row["mask"] += [1] * len(comp) + [0]
        row["which"] += [b] * len(toks)
    return row


def _check(got, pairs, key, layout):
    want = np.array([p[key] for p in pairs])
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=0, err_msg=f"{key} ({layout} layout); {HOW}")


@pytest.mark.parametrize("name", ["policy", "reference"])
def test_per_pair_logps_match_trl(fixture, name):
    pairs, models = fixture
    T = max(len(p["prompt_ids"]) + max(len(p["chosen_ids"]), len(p["rejected_ids"])) for p in pairs)
    for key in ("chosen", "rejected"):
        got = []
        for p in pairs:  # one sequence per call, right-padded to a common T (one compile)
            row = _pad(_standard_row(p["prompt_ids"], p[f"{key}_ids"]), T)
            lp = _run(models[name], [{k: v for k, v in row.items() if k != "mask"}])[0]
            got.append(float(np.sum(lp * np.array(row["mask"]))))
        _check(np.array(got), pairs, f"{name}_{key}_logps", "one pair per call")


@pytest.mark.parametrize("name", ["policy", "reference"])
def test_standard_batch_logps_match_trl(fixture, name):
    pairs, models = fixture
    P = len(pairs)
    rows = [_standard_row(p["prompt_ids"], p["chosen_ids"]) for p in pairs]
    rows += [_standard_row(p["prompt_ids"], p["rejected_ids"]) for p in pairs]
    T = max(len(r["tokens"]) for r in rows)
    rows = [_pad(r, T) for r in rows]
    lp = _run(models[name], [{k: v for k, v in r.items() if k != "mask"} for r in rows])
    assert np.isfinite(lp).all()
    summed = np.sum(lp * np.array([r["mask"] for r in rows]), axis=1)
    _check(summed[:P], pairs, f"{name}_chosen_logps", "standard, B = 2P right-padded rows")
    _check(summed[P:], pairs, f"{name}_rejected_logps", "standard, B = 2P right-padded rows")


@pytest.mark.parametrize("name", ["policy", "reference"])
def test_prefix_shared_batch_logps_match_trl(fixture, name):
    pairs, models = fixture
    rows = [_shared_row(p["prompt_ids"], p["chosen_ids"], p["rejected_ids"]) for p in pairs]
    T = max(len(r["tokens"]) for r in rows)
    rows = [_pad(r, T) for r in rows]
    lp = _run(models[name], [{k: v for k, v in r.items() if k not in ("mask", "which")} for r in rows])
    mask, which = np.array([r["mask"] for r in rows]), np.array([r["which"] for r in rows])
    for b, key in ((1, "chosen"), (2, "rejected")):
        summed = np.sum(lp * mask * (which == b), axis=1)
        _check(summed, pairs, f"{name}_{key}_logps", "prefix-shared, one row per pair")
