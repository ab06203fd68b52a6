"""Logit parity with Hugging Face `transformers` (PyTorch, float32, eager attention) for tiny random
checkpoints of every supported family, with and without right padding, and the export round trip.

Goldens: none stored; each test builds the PyTorch model with torch.manual_seed(0), saves it with
`save_pretrained` and compares the two implementations on the same random tokens."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

from dpo_jax.models import hf  # noqa: E402

ATOL = 1e-4
_BASE = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
_LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}

CONFIGS = {
    "llama_gqa_untied": lambda T: T.LlamaConfig(**_BASE, num_key_value_heads=2, tie_word_embeddings=False),
    "llama3_rope_tied_bias": lambda T: T.LlamaConfig(**_BASE, num_key_value_heads=1, rope_parameters=_LLAMA3_ROPE,
                                                     tie_word_embeddings=True, attention_bias=True, mlp_bias=True),
    "llama_linear_rope": lambda T: T.LlamaConfig(**_BASE, num_key_value_heads=4, rope_parameters={
        "rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
    "mistral_sliding": lambda T: T.MistralConfig(**_BASE, num_key_value_heads=2, head_dim=8, sliding_window=4),
    "qwen2_bias_tied": lambda T: T.Qwen2Config(**_BASE, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen3_qk_norm": lambda T: T.Qwen3Config(**_BASE, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False),
    "gpt2_tied": lambda T: T.GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                        bos_token_id=1, eos_token_id=2),
    "gpt_neox_parallel": lambda T: T.GPTNeoXConfig(**_BASE, rotary_pct=0.5),
    "gpt_neox_sequential": lambda T: T.GPTNeoXConfig(**_BASE, rotary_pct=1.0, use_parallel_residual=False),
}


def _torch_model(name, directory):
    """Random tiny HF model (weights perturbed so norms/biases are not trivial), saved to `directory`."""
    cfg = CONFIGS[name](transformers)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(directory)
    return model


def _inputs(seed=0, lengths=(11, 7, 4)):
    rng = np.random.default_rng(seed)
    T = max(lengths)
    tokens = rng.integers(3, 128, size=(len(lengths), T)).astype(np.int32)
    mask = (np.arange(T)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
    return tokens * mask, mask


def _hf_logits(model, tokens, mask):
    with torch.no_grad():
        return model(input_ids=torch.as_tensor(tokens, dtype=torch.long),
                     attention_mask=torch.as_tensor(mask, dtype=torch.long)).logits.numpy()


def _our_logits(model, tokens, mask):
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    hidden = model(jnp.asarray(tokens), positions_BxT=jnp.asarray(positions), segment_ids_BxT=jnp.asarray(mask))
    return np.asarray(model.logits(hidden))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_transformers(name, tmp_path):
    ref_model = _torch_model(name, tmp_path / "hf")
    model = hf.load_model(tmp_path / "hf")
    tokens, mask = _inputs(seed=1, lengths=(11, 11, 7, 4))  # two unpadded rows, two right-padded
    ours, ref = _our_logits(model, tokens, mask), _hf_logits(ref_model, tokens, mask)
    real = mask.astype(bool)
    assert np.abs(ref[real]).max() > 0.5, "degenerate test: reference logits are all near zero"
    np.testing.assert_allclose(ours[:2], ref[:2], rtol=0, atol=ATOL,
                               err_msg=f"{name}: unpadded logits differ from transformers")
    np.testing.assert_allclose(ours[real], ref[real], rtol=0, atol=ATOL,
                               err_msg=f"{name}: right-padded logits differ from transformers at real positions")
    assert np.isfinite(ours).all(), "padding positions produced non-finite logits"

    # Round trip: ours -> export -> transformers loads it -> same logits.
    out = hf.export_model(model, tmp_path / "exported", tokenizer_dir=tmp_path / "hf")
    assert (out / "generation_config.json").is_file(), "generation_config.json was not copied"
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert type(reloaded) is type(ref_model)
    np.testing.assert_allclose(_hf_logits(reloaded, tokens, mask)[real], ref[real], rtol=0, atol=1e-5,
                               err_msg=f"{name}: exported checkpoint gives different logits in transformers")
    again = hf.load_model(out)
    np.testing.assert_array_equal(_our_logits(again, tokens, mask), ours)


def test_export_sharded_loads_in_transformers(tmp_path):
    ref_model = _torch_model("llama_gqa_untied", tmp_path / "hf")
    model = hf.load_model(tmp_path / "hf")
    out = hf.export_model(model, tmp_path / "sharded", max_shard_bytes=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tokens, mask = _inputs(seed=2)
    real = mask.astype(bool)
    np.testing.assert_allclose(_hf_logits(reloaded, tokens, mask)[real], _hf_logits(ref_model, tokens, mask)[real],
                               rtol=0, atol=1e-5)
