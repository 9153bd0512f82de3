r"""LCD of Stable Diffusion 2.1 (v-prediction) at 768x768 with the paper's settings.

    python -m lcm_jax.train --config=configs/sd21_768.py --workdir=runs/sd21_768 \
        --config.data.path='/data/laion-aesthetics-6.5plus/{00000..01210}.tar'

The defaults (`lcm_jax.config.base_config`) are the paper's (Sec. 5.1 / appendix): lr 8e-6,
EMA 0.999943, DDIM solver with skipping step k = 20, omega ~ U[2, 14], 100k iterations; this
file adds the teacher, the resolution and the paper's batch of 16 at 768. The paper's data
are LAION-5B Aesthetics subsets (6+ and 6.5+); it reports a usable 2-4 step 768 LCM after
about 4,000 steps (32 A100 GPU-hours). `:runlocal` shrinks the run to a CPU-sized one.
"""

from lcm_jax import config as config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, runlocal=False)
  c = config_lib.base_config()
  c.teacher = "stabilityai/stable-diffusion-2-1"
  c.data.format = "wds"
  c.resolution = 768
  c.batch_size = 16
  # Every chip holds 1/N of the parameters, optimiser state and EMA target (FSDP over all
  # devices): the replicated state alone (~15 GiB) would fill a 16 GiB v5e chip.
  c.mesh.data, c.mesh.fsdp = 1, -1
  return config_lib.runlocal(c) if arg.runlocal else c
