r"""LCD of Stable Diffusion 2.1 (v-prediction) at 768x768 with the paper's settings.

    python -m lcm_jax.train --config=configs/sd21_768.py --workdir=runs/sd21_768 \
        --config.data.path='/data/laion-aesthetics-6.5plus/{00000..01210}.tar'

Numbers: paper Sec. 5.1 / Appendix: lr 8e-6, EMA 0.999943, batch 16 at 768, DDIM solver with
skipping step k = 20, omega ~ U[2, 14], 100k iterations. The paper's data are LAION-5B
Aesthetics subsets (6+ and 6.5+); it reports a usable 2-4 step 768 LCM after about 4,000
steps (32 A100 GPU-hours).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import common  # noqa: E402  (the line above makes configs/ importable from any cwd)


def get_config(arg=None):
  del arg
  c = common.get_base_config()
  c.teacher = "stabilityai/stable-diffusion-2-1"
  c.data.format = "wds"
  c.resolution = 768
  c.batch_size = 16
  c.num_train_steps = 100_000
  c.optimizer.lr = 8e-6
  c.ema_decay = 0.999943
  c.loss.solver = "ddim"
  c.loss.skipping_step = 20
  c.loss.omega_min, c.loss.omega_max = 2.0, 14.0
  return c
