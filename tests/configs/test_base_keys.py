"""Every key of configs/base.py is classified by the rules that decide what sweep members may share:
fused members (`train/members.py`: free loss hyper-parameters vs the fixed part) and the shared SFT
model of a sweep (`launch/sweep_plan.py`: SFT_NEUTRAL vs SFT_CHANGING). A new key in base.py fails
here until someone places it."""

import pytest

from configs import base
from dpo_jax import losses
from dpo_jax.train import members
from launch import sweep_plan

BASE = base.get_config()
KEYS = sorted(members._flat(BASE))  # pylint: disable=protected-access
# The loss keys whose value fused members may vary: beta, the weights of a combined loss and every
# numeric hyper-parameter of a registered loss (`ld_alpha` only while set in all or none of them).
LOSS_HPARAMS = {"beta", "weights"}.union(*(s.hparams for s in losses.LOSSES.values()))


def _fusing_free(key: str) -> bool:
    section, _, name = key.partition(".")
    return section == members.FREE_SECTION and name not in members.FIXED_LOSS_KEYS


def _other_value(key: str):
    """A value of `key`'s type that differs from base.py's."""
    section, _, name = key.rpartition(".")
    node = BASE
    for part in section.split(".") if section else ():
        node = node[part]
    value = node[name]
    if value is None:
        kind = node.get_ref(name).get_type()
        return {float: 0.5, int: 1, str: "x", tuple: (1.0,)}[kind]
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, tuple):
        return value[:-1]
    raise AssertionError(f"{key}: no other value for {value!r}")


def test_fusing_free_keys_are_loss_hyperparameters():
    free = [k for k in KEYS if _fusing_free(k)]
    assert free, "no key of configs/base.py is free for fused members"
    for key in free:
        assert key.split(".", 1)[1] in LOSS_HPARAMS, (
            f"{key} is free for fused members (members.FREE_SECTION) but no loss hyper-parameter: "
            "add it to members.FIXED_LOSS_KEYS, or register it as a hyper-parameter of a loss")
    for name in members.FIXED_LOSS_KEYS:
        assert f"{members.FREE_SECTION}.{name}" in KEYS, f"members.FIXED_LOSS_KEYS names no key of base.py: {name}"


@pytest.mark.parametrize("key", KEYS)
def test_fixed_part_follows_the_fusing_rules(key):
    """Changing a key changes `members.fixed_part` exactly when the key is not free."""
    changed = sweep_plan.apply_overrides(BASE, {key: _other_value(key)})
    differs = members.fixed_part(changed) != members.fixed_part(BASE)
    assert differs == (not _fusing_free(key)), (
        f"{key}: {'changes' if differs else 'does not change'} fixed_part but is "
        f"{'free' if _fusing_free(key) else 'fixed'} by FREE_SECTION / FIXED_LOSS_KEYS")


@pytest.mark.parametrize("key", KEYS)
def test_every_key_is_sft_neutral_or_sft_changing(key):
    rules = (sweep_plan.matching_rules(key, sweep_plan.SFT_NEUTRAL)
             + sweep_plan.matching_rules(key, sweep_plan.SFT_CHANGING))
    assert len(rules) == 1, (f"{key} must be covered by exactly one rule of sweep_plan.SFT_NEUTRAL and "
                             f"sweep_plan.SFT_CHANGING; covered by {rules or 'none'}")


def test_sft_rules_are_not_stale():
    for rule in sweep_plan.SFT_NEUTRAL + sweep_plan.SFT_CHANGING:
        assert any(sweep_plan.matching_rules(k, [rule]) for k in KEYS), f"sweep_plan rule {rule!r} covers no key"
