r"""A CPU-sized run for tests and smoke checks: give the teacher and the data on the command line.

    python -m lcm_jax.train --config=configs/tiny.py --workdir=/tmp/lcm_tiny \
        --config.teacher=path/to/tiny-pipeline --config.data.path=path/to/image-folder

`lcm_jax.config.runlocal` (float32, 2 images a step, 4 steps) at the size of the tests' tiny
random pipelines (VAE factor 2, two UNet down blocks: resolution a multiple of 4), with a
large learning rate and a fast EMA so that a handful of steps visibly change the weights.
Not the paper's numbers; runs are reproducible to the last bit on CPU.
"""

from lcm_jax import config as config_lib


def get_config(arg=None):
  config_lib.parse_arg(arg)
  c = config_lib.runlocal(config_lib.base_config())
  c.data.format = "imagefolder"
  c.resolution = 16
  c.optimizer.lr = 1e-4
  c.ema_decay = 0.95
  c.sample_prompts = ("a red circle", "a blue square")
  return c
