"""Flax modules for Stable Diffusion: UNet, VAE and CLIP text encoder.

Modules only: no file or hub I/O here (that is `lcm_jax.weights` and `lcm_jax.sd_pipeline`).
Each module is used purely functionally: one definition, any number of parameter trees,
applied with `module.apply({"params": params}, ...)`. Images and latents are NHWC.
Submodule names follow the naming contract in `lcm_jax.weights`.
"""
