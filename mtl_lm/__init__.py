"""mtl_lm: multi-objective pretraining of Llama-3-style decoders in JAX."""

__version__ = "0.1.0"
