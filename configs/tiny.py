r"""A CPU-sized run for tests and smoke checks: give the teacher and the data on the command line.

    python -m lcm_jax.train --config=configs/tiny.py --workdir=/tmp/lcm_tiny \
        --config.teacher=path/to/tiny-pipeline --config.data.path=path/to/image-folder

Sizes fit the tests' tiny random pipelines (VAE factor 2, two UNet down blocks: resolution a
multiple of 4). Numbers are not from the paper: a few steps, a large learning rate and a
fast EMA so that a handful of steps visibly change the weights; float32 throughout, so runs
are reproducible to the last bit on CPU.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import common  # noqa: E402


def get_config(arg=None):
  del arg
  c = common.get_base_config()
  c.data.format = "imagefolder"
  c.data.num_workers = 0
  c.resolution = 16
  c.batch_size = 2
  c.num_train_steps = 4
  c.optimizer.lr = 1e-4
  c.ema_decay = 0.95
  c.precision.teacher_dtype = "float32"
  c.precision.compute_dtype = "float32"
  c.precision.target_dtype = "float32"
  c.remat = False
  c.checkpoint_every = 2
  c.keep_checkpoints = 2
  c.log_every = 1
  c.sample_every = 0
  c.sample_prompts = ("a red circle", "a blue square")
  c.compilation_cache_dir = ""
  return c
