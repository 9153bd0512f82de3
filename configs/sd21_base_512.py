r"""LCD of Stable Diffusion 2.1-base (epsilon prediction) at 512x512.

    python -m lcm_jax.train --config=configs/sd21_base_512.py --workdir=runs/sd21_base_512 \
        --config.data.path='/data/laion-aesthetics-6plus/{00000..01210}.tar'

Numbers: paper Sec. 5.1 / Appendix: batch 72 at 512, lr 8e-6, EMA 0.999943, DDIM with k = 20,
omega ~ U[2, 14], 100k iterations (data: LAION-5B Aesthetics subsets, as the paper).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import common  # noqa: E402


def get_config(arg=None):
  del arg
  c = common.get_base_config()
  c.teacher = "stabilityai/stable-diffusion-2-1-base"
  c.data.format = "wds"
  c.resolution = 512
  c.batch_size = 72
  c.num_train_steps = 100_000
  return c
