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
  # FSDP over all devices (the replicated state, ~15 GiB, would fill a 16 GiB v5e chip), and
  # the batch in 3 microbatches of 24 whose gradients are averaged before one update: 3
  # images per chip at a time on a v5e-8, 6 on a v4-8 (twice the HBM per chip).
  c.mesh.data, c.mesh.fsdp = 1, -1
  c.grad_accum_steps = 3
  return config_lib.runlocal(c) if arg.runlocal else c
