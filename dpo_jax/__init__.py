"""dpo_jax: preference optimization (DPO and its family) in JAX and Flax NNX."""

__version__ = "0.1.0"
