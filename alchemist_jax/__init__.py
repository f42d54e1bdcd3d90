"""alchemist_jax: meta-gradient data selection for text-to-image diffusion training, in JAX."""

__version__ = "0.1.0"
