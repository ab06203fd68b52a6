"""Hugging Face config.json <-> ModelConfig: round trips per family, and errors that name the culprit."""

import json

import pytest

from dpo_jax.models import hf_config
from dpo_jax.models.transformer import ModelConfig, RopeScaling

TINY = ModelConfig(family="llama", vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
                   num_kv_heads=1, init_std=0.3, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def test_unsupported_model_type_names_it_and_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(hf_config.UnsupportedArchitectureError) as e:
        hf_config.load_config(tmp_path)
    msg = str(e.value)
    assert "bert" in msg and "BertModel" in msg
    assert all(k in msg for k in ("llama", "mistral", "qwen2", "qwen3", "gpt2", "gpt_neox", "LlamaForCausalLM"))


def test_unsupported_head_is_named(tmp_path):
    h = hf_config.config_to_hf(TINY) | {"architectures": ["LlamaForSequenceClassification"]}
    with pytest.raises(hf_config.UnsupportedArchitectureError, match="LlamaForSequenceClassification"):
        hf_config.config_from_hf(h)


def test_unsupported_rope_type_and_missing_field_are_named():
    h = hf_config.config_to_hf(TINY)
    with pytest.raises(ValueError, match="'yarn'"):
        hf_config.config_from_hf(h | {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}})
    with pytest.raises(ValueError, match="'intermediate_size'"):
        hf_config.config_from_hf({k: v for k, v in h.items() if k != "intermediate_size"})


@pytest.mark.parametrize("cfg", [
    TINY,
    ModelConfig(family="mistral", num_kv_heads=2, sliding_window=7),
    ModelConfig(family="qwen2", qkv_bias=True, tie_embeddings=True, rope_theta=1e6),
    ModelConfig(family="qwen3", qk_norm=True, head_dim=32, sliding_window=5, sliding_layers=(True, False)),
    ModelConfig(family="llama", rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192), rope_theta=5e5),
    ModelConfig(family="gpt2", norm="layer", norm_eps=1e-5, activation="gelu_tanh", gated_mlp=False,
                position="learned", qkv_bias=True, o_bias=True, mlp_bias=True, tie_embeddings=True,
                intermediate_size=256),
    ModelConfig(family="gpt_neox", norm="layer", norm_eps=1e-5, activation="gelu", gated_mlp=False, qkv_bias=True,
                o_bias=True, mlp_bias=True, parallel_residual=True, rotary_fraction=0.25),
], ids=lambda c: c.family)
def test_config_round_trip(cfg):
    h = json.loads(json.dumps(hf_config.config_to_hf(cfg)))
    assert h["architectures"] == [hf_config.ARCHITECTURES[cfg.family]]
    assert hf_config.config_from_hf(h, init_std=cfg.init_std) == cfg


def test_inexpressible_config_is_refused_naming_the_field():
    with pytest.raises(ValueError, match="qk_norm"):
        hf_config.config_to_hf(ModelConfig(family="llama", qk_norm=True))


def test_family_traits_name_known_families_and_fields():
    import dataclasses  # pylint: disable=g-import-not-at-top

    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    for family, traits in hf_config.FAMILY_TRAITS.items():
        assert family in hf_config.ARCHITECTURES, family
        assert set(traits) <= fields, (family, set(traits) - fields)
    assert set(hf_config.NO_GQA_FAMILIES) <= set(hf_config.ARCHITECTURES)


@pytest.mark.parametrize("attention", ["dense", "blockwise"])
def test_attention_choice_exports_and_is_not_written(attention):
    """`attention` is ours (how the forward runs), not the model's: any choice exports, none reaches config.json."""
    h = hf_config.config_to_hf(ModelConfig(family="llama", attention=attention))
    assert "attention" not in h
    assert hf_config.config_from_hf(json.loads(json.dumps(h))).attention == "auto"
