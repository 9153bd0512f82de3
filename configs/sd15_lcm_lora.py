r"""LCM-LoRA of Stable Diffusion 1.5 at 512x512 (Luo et al., arXiv 2311.05556): LCD whose
student is the frozen teacher plus a rank-64 LoRA adapter, without a guidance input.

    python -m lcm_jax.train --config=configs/sd15_lcm_lora.py --workdir=runs/lcm_lora_sd15 \
        --config.data.path='/data/laion-aesthetics-6plus/{00000..01210}.tar'
    python -m lcm_jax.export --model runs/lcm_lora_sd15 --lora-only --output lcm-lora-sdv1-5/

Numbers: diffusers' README example for `train_lcm_distill_lora_sd_wds.py` on SD 1.5: LoRA rank
64 (alpha 64: the script's lora_alpha defaults to the rank), the script's layer set
(`lcm_jax.lora.DEFAULT_TARGETS`), lr 1e-4 constant (its lr_warmup_steps 500 is ignored by
diffusers' "constant" schedule), no weight decay, pseudo-Huber loss (c = 0.001), 12 images
per GPU (96 on 8 GPUs here: set batch_size for your devices), omega ~ U[5, 15] (its
w_min/w_max), 1000 iterations. The script has no EMA target: its target is the same student
(current adapter) without gradient, which here is ema_decay = 0 (the target adapter becomes
the updated student after every step). Only the adapter (67.3M parameters at rank 64) is
trained, held in the optimiser state and checkpointed; the base is the teacher.
`:runlocal` shrinks the run to a CPU-sized one.
"""

from lcm_jax import config as config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, runlocal=False)
  c = config_lib.base_config()
  c.teacher = "stable-diffusion-v1-5/stable-diffusion-v1-5"
  c.student = "lora"
  c.lora.rank = 64
  c.lora.alpha = 64.0
  c.data.format = "wds"
  c.resolution = 512
  c.batch_size = 96
  c.num_train_steps = 1_000
  c.optimizer.lr = 1e-4
  c.optimizer.weight_decay = 0.0
  c.ema_decay = 0.0
  c.loss.distance = "huber"  # huber_c: the default 0.001
  c.loss.omega_min, c.loss.omega_max = 5.0, 15.0
  c.checkpoint_every = 200
  c.sample_every = 200
  return config_lib.runlocal(c) if arg.runlocal else c
