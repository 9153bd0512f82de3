r"""LCM-LoRA of the toy teacher: configs/toy.py (the toy LCD run) with a LoRA student.

    python -m lcm_jax.train --config=configs/toy_lora.py:rank=16 --workdir=workdirs/toy_lora16
    python -m lcm_jax.toy.evaluate --lcm workdirs/toy_lora16 --output docs/toy/lora16 --samplers lcm \
        --reference_steps 0

Everything but the student is the toy LCD row's (teacher, data, batch 32, 1000 steps, loss with
omega ~ U[2, 14], EMA target 0.995, float32), so the rows compare a LoRA student with the full
one at the same number of steps. The student is the frozen toy teacher plus a rank-`rank`
adapter (alpha = rank, diffusers' default) on diffusers' LCM-LoRA layer set, without guidance
input: omega is baked into the adapter, so the sample grids' guidance scale is unused.
The learning rate is `lr` (default 1e-3, ten times the full student's: an adapter's update
is a low-rank product of two small matrices, B starting at zero; diffusers' LoRA script uses
1e-4 where its full LCD script uses 1e-6). The EMA target keeps the toy's 0.995 (README: with
a fast target the toy's multi-step LCM degrades); diffusers' LoRA script has no EMA
(configs/sd15_lcm_lora.py: ema_decay 0).
"""

import importlib.util
import os

from lcm_jax import config as config_lib

_spec = importlib.util.spec_from_file_location("configs_toy", os.path.join(os.path.dirname(__file__), "toy.py"))
toy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(toy)


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, rank=16, lr=1e-3, ema_decay=0.995)
  c = toy.get_config()
  c.student = "lora"
  c.lora.rank = arg.rank
  c.lora.alpha = float(arg.rank)
  c.optimizer.lr = arg.lr
  c.ema_decay = arg.ema_decay
  return c
