"""crosswrite_jax: a JAX/Flax stack that pretrains and fine-tunes Transformers, from one CPU to a TPU pod."""

__version__ = "0.1.0"
