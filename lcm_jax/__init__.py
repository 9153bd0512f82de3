"""lcm-jax: Latent Consistency Models in JAX/Flax.

    import lcm_jax
    pipe = lcm_jax.load_pipeline("path/to/diffusers-folder")   # or a hub id, or a training workdir
    lcm_jax.save_pipeline(pipe, "exported/")                   # back to a diffusers folder
    lcm_jax.train(config, "runs/my_run")                       # configs/*.py; see lcm_jax.training

The public names are imported on first use, so `import lcm_jax` (and every CLI's --help)
stays fast.
"""

from lcm_jax.errors import LcmJaxError, UnsupportedConfigError, WeightsError

__version__ = "0.1.0"
__all__ = ["LcmJaxError", "Pipeline", "UnsupportedConfigError", "WeightsError", "load_pipeline", "save_pipeline",
           "train"]

# name -> the module that defines it
_LAZY = {"Pipeline": "lcm_jax.sd_pipeline", "save_pipeline": "lcm_jax.sd_pipeline",
         "load_pipeline": "lcm_jax.load", "train": "lcm_jax.training"}


def __getattr__(name: str):
  if name in _LAZY:
    import importlib
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module 'lcm_jax' has no attribute {name!r}")
