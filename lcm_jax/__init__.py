"""lcm-jax: Latent Consistency Models in JAX/Flax."""

__version__ = "0.1.0"
