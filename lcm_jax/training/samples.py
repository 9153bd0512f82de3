"""Sample grids of the EMA target during training: one row per prompt, one column per LCM step count."""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from lcm_jax import lora
from lcm_jax import workdir as workdir_lib
from lcm_jax.figures import rows_by_columns, save_png
from lcm_jax.sd_pipeline import Pipeline, build_module
from lcm_jax.text_to_image import TextToImage


def to_sampling_device(tree: Any) -> Any:
  """A copy of `tree` on this process's first device, for sampling outside the mesh.

  Multi-process: every process must call it (it all-gathers the shards); single-process it
  just moves (or keeps) the arrays on one device.
  """
  if jax.process_count() > 1:
    tree = multihost_utils.process_allgather(tree, tiled=True)
  return jax.device_put(tree, jax.local_devices()[0])


def sample_grid(text_to_image: TextToImage, prompts, steps, guidance_scale: float, resolution: int) -> np.ndarray:
  """uint8 [len(prompts) R, len(steps) R, 3], the same seed everywhere (so columns differ only
  by the number of steps)."""
  columns = [text_to_image(list(prompts), sampler="lcm", num_steps=int(n), guidance_scale=guidance_scale,
                           height=resolution, width=resolution, seed=0) for n in steps]
  return rows_by_columns(np.stack(columns, axis=1))


class SampleWriter:
  """`writer(step, target_params)` samples the EMA target with the LCM sampler on process 0,
  writes WORKDIR/samples/step_XXXXXXX.png and logs the grid to TensorBoard. A LoRA student's
  target is an adapter: it is added to the frozen teacher at scale alpha / rank."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, frozen, tokenizer, unet_config: dict,
               vae_config: dict, scheduler_config: dict, metric_writer, is_main: bool, log):
    self.config, self.workdir, self.metric_writer, self.log = config, workdir, metric_writer, log
    params = {"vae": to_sampling_device(frozen.vae_params),  # every process: it may all-gather
              "text_encoder": to_sampling_device(frozen.text_params)}
    self.lora_base = self.lora_scale = None
    if config.get("student") == "lora":  # the target is an adapter on the frozen teacher
      self.lora_base = to_sampling_device(frozen.arrays["teacher"])
      self.lora_scale = lora.lora_scale(int(config.lora.rank), float(config.lora.alpha))
    self.text_to_image = None
    if is_main:
      dtype = jax.numpy.dtype
      unet = build_module("unet", unet_config, dtype=dtype(config.precision.compute_dtype),
                          param_dtype=dtype(config.precision.target_dtype), attention=config.attention)
      self.text_to_image = TextToImage(Pipeline(
          unet=unet, vae=frozen.vae, text_encoder=frozen.text_encoder, tokenizer=tokenizer, params=params,
          configs={"unet": unet_config, "vae": vae_config, "scheduler": scheduler_config}))

  def __call__(self, step: int, target_params) -> None:
    target = to_sampling_device(target_params)  # every process: it may all-gather
    if self.text_to_image is None:
      return
    start = time.perf_counter()
    if self.lora_scale is None:
      self.text_to_image.pipe.params["unet"] = target
    else:  # added to the teacher inside the sampler's compiled function
      self.text_to_image.pipe.params["unet"] = self.lora_base
      self.text_to_image.pipe.unet_loras = [(target, self.lora_scale)]
    c = self.config
    grid = sample_grid(self.text_to_image, c.sample_prompts, c.sample_steps, c.sample_guidance_scale, c.resolution)
    path = os.path.join(self.workdir, workdir_lib.SAMPLES_DIR, f"step_{step:07d}.png")
    save_png(path, grid)
    self.metric_writer.image(step, "samples/ema_lcm_" + "_".join(str(n) for n in c.sample_steps) + "_steps", grid)
    self.log(f"step {step}: wrote {path} ({time.perf_counter() - start:.1f}s)")
