"""Training data: grain pipelines for image-caption data sets and for cached latents.

`make_train_data(config, ...)` -> `TrainData`, an infinite iterator of per-process batches
whose state goes into checkpoints; `default_data_config()` lists every config key. Formats:
`wds` (webdataset tar shards), `imagefolder` (Hugging Face ImageFolder), `tfds` (TFDS via
`tfds.data_source`) and `latents` (a cache written by `python -m lcm_jax.cache_latents`).
"""

from lcm_jax.data.latents import read_metadata as read_latents_metadata
from lcm_jax.data.loader import (
    FORMATS,
    IMAGE_FORMATS,
    TrainData,
    default_data_config,
    make_train_data,
)

__all__ = ["FORMATS", "IMAGE_FORMATS", "TrainData", "default_data_config", "make_train_data",
           "read_latents_metadata"]
