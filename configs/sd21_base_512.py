r"""LCD of Stable Diffusion 2.1-base (epsilon prediction) at 512x512.

    python -m lcm_jax.train --config=configs/sd21_base_512.py --workdir=runs/sd21_base_512 \
        --config.data.path='/data/laion-aesthetics-6plus/{00000..01210}.tar'

The paper's settings (`lcm_jax.config.base_config`: lr 8e-6, EMA 0.999943, DDIM with k = 20,
omega ~ U[2, 14], 100k iterations) at its 512 batch of 72 (data: LAION-5B Aesthetics
subsets, as the paper). `:runlocal` shrinks the run to a CPU-sized one.
"""

from lcm_jax import config as config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, runlocal=False)
  c = config_lib.base_config()
  c.teacher = "stabilityai/stable-diffusion-2-1-base"
  c.data.format = "wds"
  c.resolution = 512
  c.batch_size = 72
  return config_lib.runlocal(c) if arg.runlocal else c
