r"""The toy reproduction (issue 6): distil the shipped toy teacher on its 32x32 shapes domain, on a CPU.

    python -m lcm_jax.toy.teacher --output toy/teacher          # only to rebuild the shipped teacher
    python -c "from lcm_jax.toy.domain import write_imagefolder as w; w('workdirs/toy_data/teacher', 8000)"
    python -m lcm_jax.train --config=configs/toy.py --workdir=workdirs/toy

`make demo` runs exactly this (lcm_jax/demo.py writes the data). The arg `lcf` gives latent
consistency fine-tuning of that LCM on the shifted sub-domain (colours the teacher never saw):

    python -c "from lcm_jax.toy.domain import *; write_imagefolder('workdirs/toy_data/shifted', 4000, seed=5, colours=SHIFTED_COLOURS)"
    python -m lcm_jax.train --config=configs/toy.py:lcf --workdir=workdirs/toy_lcf

Where the numbers come from:
* loss: the paper's (DDIM solver, k = 20, omega ~ U[2, 14], l2), as configs/common.py.
* batch 32, lr 2e-4 and EMA 0.95: not the paper's. The paper's lr 8e-6 and EMA 0.999943 are
  for 100k steps of an 865M-parameter UNet; a 3M-parameter UNet distilled in a few hundred
  steps on a CPU needs a larger step and an EMA that follows the student within tens of
  steps (0.95 is diffusers' default for the same reason). Sized so that `make demo` fits
  15 minutes on 2 cores; the README's table comes from a longer run of the same config
  (--config.num_train_steps, see README).
* float32 everywhere: bf16 is slower than fp32 on CPUs.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import common  # noqa: E402

SAMPLE_PROMPTS = (
    "a red circle on the left on a blue background",
    "a yellow triangle at the top on a black background",
    "a white cross in the center on a green background",
    "a blue square at the bottom on a yellow background",
)


def get_config(arg=None):
  if arg not in (None, "", "lcd", "lcf"):
    raise ValueError(f"configs/toy.py takes no arg, 'lcd' or 'lcf', got {arg!r}")
  c = common.get_base_config()
  c.teacher = "toy/teacher"
  c.data.path = "workdirs/toy_data/teacher"
  c.data.format = "imagefolder"
  c.data.num_workers = 0
  c.data.read_threads = 2
  c.resolution = 32
  c.batch_size = 32
  c.num_train_steps = 600
  c.optimizer.lr = 2e-4
  c.optimizer.schedule = "constant"
  c.ema_decay = 0.95
  c.precision.teacher_dtype = "float32"
  c.precision.compute_dtype = "float32"
  c.precision.target_dtype = "float32"
  c.remat = False
  c.checkpoint_every = 200
  c.keep_checkpoints = 2
  c.log_every = 20
  c.sample_every = 600
  c.sample_prompts = SAMPLE_PROMPTS
  c.sample_guidance_scale = 9.0  # omega = 8, the paper's evaluation setting
  if arg == "lcf":
    # Algorithm 4: no teacher; the VAE, text encoder and tokenizer come from the LCM's workdir.
    c.mode = "lcf"
    c.teacher = ""
    c.init_from = "workdirs/toy"
    c.data.path = "workdirs/toy_data/shifted"
    c.num_train_steps = 400
    c.sample_every = 400
    c.sample_prompts = (
        "a orange circle on the left on a blue background",
        "a purple triangle at the top on a black background",
        "a pink cross in the center on a green background",
        "a orange square at the bottom on a yellow background",
    )
  return c
