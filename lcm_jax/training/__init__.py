"""The trainer as a library: `train(config, workdir)` (see `lcm_jax.training.trainer`)."""

from lcm_jax.training.trainer import train

__all__ = ["train"]
