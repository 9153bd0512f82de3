"""lcm-jax: Latent Consistency Models in JAX/Flax.

    import lcm_jax
    pipe = lcm_jax.load_pipeline("path/to/diffusers-folder")   # Flax modules + parameters
    lcm_jax.save_pipeline(pipe, "exported/")                   # back to a diffusers folder
"""

from lcm_jax.errors import LcmJaxError, UnsupportedConfigError, WeightsError
from lcm_jax.pipeline import Pipeline, load_pipeline, save_pipeline

__version__ = "0.1.0"
__all__ = ["LcmJaxError", "Pipeline", "UnsupportedConfigError", "WeightsError", "load_pipeline", "save_pipeline"]
