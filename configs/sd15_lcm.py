r"""LCD of an SD 1.5-architecture teacher (Dreamshaper v7, the teacher of the published
LCM_Dreamshaper_v7) at 512x512.

    python -m lcm_jax.train --config=configs/sd15_lcm.py --workdir=runs/dreamshaper7 \
        --config.data.path='/data/laion-aesthetics-6plus/{00000..01210}.tar'

Numbers: diffusers' README example for `train_lcm_distill_sd_wds.py` on SD 1.5: lr 1e-6,
pseudo-Huber loss (c = 0.001), EMA 0.95, no weight decay, 12 images per GPU (96 on 8 GPUs
here: set batch_size for your devices), omega ~ U[5, 15] (its w_min/w_max defaults);
4,000 iterations, as the LCM_Dreamshaper_v7 model card reports. `:runlocal` shrinks the run
to a CPU-sized one.
"""

from lcm_jax import config as config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, runlocal=False)
  c = config_lib.base_config()
  c.teacher = "Lykon/dreamshaper-7"
  c.data.format = "wds"
  c.resolution = 512
  c.batch_size = 96
  c.num_train_steps = 4_000
  c.optimizer.lr = 1e-6
  c.optimizer.weight_decay = 0.0
  c.ema_decay = 0.95
  c.loss.distance = "huber"  # huber_c: the default 0.001
  c.loss.omega_min, c.loss.omega_max = 5.0, 15.0
  c.checkpoint_every = 500
  c.sample_every = 200
  return config_lib.runlocal(c) if arg.runlocal else c
