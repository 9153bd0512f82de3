"""Training configs: each file's `get_config(arg)` returns an `ml_collections.ConfigDict`
(defaults in `lcm_jax.config.base_config`). Use them by path:

    python -m lcm_jax.train --config=configs/sd21_768.py[:runlocal] --workdir=...

or import them (`from configs import sd21_768`) from the repository root.
"""
