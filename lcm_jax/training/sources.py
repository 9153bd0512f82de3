"""Where a training run's weights come from, resolved and checked before any weight is read."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

import jax
import ml_collections
import numpy as np

from lcm_jax import workdir as workdir_lib
from lcm_jax.config import TEACHER_MODES
from lcm_jax.errors import LcmJaxError
from lcm_jax.models.unet import UNetConfig
from lcm_jax.models.vae import downsampling_factor
from lcm_jax.sd_pipeline import read_json, resolve_pipeline_folder
from lcm_jax.sharding import local_batch_size


@dataclasses.dataclass
class Sources:
  """The folders a run reads, resolved (hub ids downloaded) before anything is loaded.

  Attributes:
    base: the pipeline folder whose VAE, text encoder, tokenizer and scheduler are used
      (the teacher's; for LCF without a teacher, init_from's).
    base_variant: weights variant of `base` (e.g. "fp16") or None.
    teacher: the folder of the teacher UNet (LCD) or None.
    init_folder: an LCM pipeline folder to start the student from, or None.
    init_workdir: a workdir to start the student from, or None.
    student_unet_config: the student's unet config (with time_cond_proj_dim; a LoRA student's
      is the teacher's, without).
    vae_config: the VAE config of `base`.
    scheduler_config: the scheduler config of `base` (the noise schedule).
  """
  base: str
  base_variant: str | None
  teacher: str | None
  init_folder: str | None
  init_workdir: str | None
  student_unet_config: dict
  vae_config: dict
  scheduler_config: dict

  @property
  def model_index(self) -> dict:
    return read_json(os.path.join(self.base, "model_index.json"))


def resolve_sources(config: ml_collections.ConfigDict) -> Sources:
  """Finds every folder the run needs and reads their configs (no weights)."""
  variant = config.teacher_variant or None
  revision = config.get("teacher_revision") or None
  teacher = resolve_pipeline_folder(config.teacher, variant=variant, revision=revision) if config.teacher else None
  init_folder = init_workdir = None
  if config.init_from:
    if workdir_lib.is_workdir(config.init_from):
      init_workdir = config.init_from
    else:
      init_folder = resolve_pipeline_folder(config.init_from)

  if init_workdir:
    student_config = workdir_lib.unet_config(init_workdir)
    init_base, init_variant = workdir_lib.model_dir(init_workdir), workdir_lib.model_info(init_workdir).get("variant")
  elif init_folder:
    student_config = read_json(os.path.join(init_folder, "unet", "config.json"))
    init_base, init_variant = init_folder, None
  elif config.get("student") == "lora":  # LCM-LoRA: the teacher's UNet (plus an adapter), no guidance input
    student_config = dict(read_json(os.path.join(teacher, "unet", "config.json")), time_cond_proj_dim=None)
    init_base = init_variant = None
  else:
    student_config = dict(read_json(os.path.join(teacher, "unet", "config.json")),
                          time_cond_proj_dim=int(config.loss.guidance_embedding_dim))
    init_base = init_variant = None
  if not student_config.get("time_cond_proj_dim") and config.get("student") != "lora":
    raise LcmJaxError(f"config.init_from={config.init_from!r} is not an LCM: its UNet config has no "
                      "time_cond_proj_dim (the guidance input); distil it with mode=lcd first")
  base, base_variant = (teacher, variant) if teacher else (init_base, init_variant)
  return Sources(base=base, base_variant=base_variant or None, teacher=teacher if config.mode in TEACHER_MODES else None,
                 init_folder=init_folder, init_workdir=init_workdir, student_unet_config=student_config,
                 vae_config=read_json(os.path.join(base, "vae", "config.json")),
                 scheduler_config=read_json(os.path.join(base, "scheduler", "scheduler_config.json")))


def resolution_multiple(unet_config: Mapping, vae_config: Mapping) -> int:
  """The resolutions training can take are multiples of this: the VAE's downsampling factor
  times the UNet's (2 per down block but the last), so every skip connection lines up
  (64 for Stable Diffusion: 8 x 2^3)."""
  unet_blocks = len(UNetConfig.from_dict(unet_config).block_out_channels)
  return downsampling_factor(vae_config) * 2 ** (unet_blocks - 1)


def check_resolution(resolution: int, unet_config: Mapping, vae_config: Mapping) -> None:
  multiple = resolution_multiple(unet_config, vae_config)
  if resolution % multiple:
    below, above = resolution // multiple * multiple, (resolution // multiple + 1) * multiple
    raise LcmJaxError(
        f"config.resolution={resolution} is not a multiple of {multiple} (the VAE's downsampling factor "
        f"x 2 per UNet down block but the last); use e.g. {below or above} or {above}")


def check_batch_size(batch_size: int, mesh: jax.sharding.Mesh, grad_accum_steps: int = 1) -> None:
  """The global batch must split evenly over the devices, each device's share over the
  microbatches, and the batch over the processes."""
  devices = int(np.prod(list(mesh.shape.values())))
  if batch_size % devices:
    raise LcmJaxError(
        f"config.batch_size={batch_size} is not divisible by the {devices} data-parallel devices "
        f"(mesh data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']}); use a multiple of {devices}")
  if (batch_size // devices) % grad_accum_steps:
    raise LcmJaxError(
        f"config.batch_size={batch_size} gives {batch_size // devices} examples per device, which do not split "
        f"into config.grad_accum_steps={grad_accum_steps} microbatches; use a batch that is a multiple of "
        f"{devices * grad_accum_steps}")
  local_batch_size(batch_size)  # and by the number of processes
