"""A training run's folder (its workdir): layout, the `model/` folder, and models read back out of it.

Layout of a workdir (written by `python -m lcm_jax.train`):

    WORKDIR/
      config.json              the run's config (also inside every checkpoint)
      model/                   a diffusers `LatentConsistencyModelPipeline` folder without UNet
                               weights: model_index.json, unet/config.json (with
                               time_cond_proj_dim), scheduler/ (LCMScheduler), and the base
                               pipeline's vae/, text_encoder/, tokenizer/ (hard links or copies)
      model/lcm_jax.json       facts diffusers does not need (weights variant, teacher, mode; for
                               a LoRA run: student "lora", the adapter's rank/alpha/targets and
                               base_unet, the teacher's unet/ folder the adapter applies to)
      checkpoints/<step>/      Orbax (`lcm_jax.checkpoint`): params, target_params (EMA), train
                               (step, rng, optimiser state), config, data (iterator position)
      samples/step_XXXXXXX.png sample grids
      damaged_checkpoints/     checkpoints that failed to restore, set aside on resume
      events.out.tfevents.*    TensorBoard

`load_pipeline_from_workdir(workdir)` makes a whole `lcm_jax.sd_pipeline.Pipeline` of it (UNet
from the latest checkpoint), which `lcm_jax.sd_pipeline.save_pipeline` writes as a folder that
diffusers' `LatentConsistencyModelPipeline.from_pretrained` loads.

A LoRA run (config.student = "lora", LCM-LoRA) checkpoints only the adapter (params and
target_params are `lcm_jax.lora` adapter trees); the base is the teacher's UNet, referenced
from model/lcm_jax.json and never copied. Its model/ is a StableDiffusionPipeline folder (the
UNet has no guidance input) with the LCMScheduler; `load_unet` returns the base with the
adapter fused in, `load_lora` the adapter itself (`python -m lcm_jax.export --lora-only`).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from lcm_jax import checkpoint
from lcm_jax.errors import LcmJaxError, check_can_be_folder
from lcm_jax.sd_pipeline import (
  Pipeline,
  abstract_params,
  build_module,
  load_pipeline_folder,
  read_json,
)

CHECKPOINT_DIR = "checkpoints"
MODEL_DIR = "model"
CONFIG_FILE = "config.json"
SAMPLES_DIR = "samples"
DAMAGED_DIR = "damaged_checkpoints"
# Extra facts about model/ that diffusers does not need (it ignores unknown files).
MODEL_INFO_FILE = "lcm_jax.json"
PARAMS_CHOICES = tuple(checkpoint.PARAMS_CHOICES)

# LCMScheduler's constructor arguments: the keys its scheduler_config.json may carry.
LCM_SCHEDULER_KEYS = (
    "num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
    "original_inference_steps", "clip_sample", "clip_sample_range", "set_alpha_to_one",
    "steps_offset", "prediction_type", "thresholding", "dynamic_thresholding_ratio",
    "sample_max_value", "timestep_spacing", "timestep_scaling", "rescale_betas_zero_snr")


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(workdir, CHECKPOINT_DIR)


def model_dir(workdir: str) -> str:
  return os.path.join(workdir, MODEL_DIR)


def is_workdir(path: str) -> bool:
  """True if `path` looks like a training workdir (has model/ and checkpoints/)."""
  return (os.path.isdir(checkpoint_dir(path))
          and os.path.isfile(os.path.join(model_dir(path), "unet", "config.json")))


def latest_step(workdir: str) -> int | None:
  """The step of the workdir's newest finished checkpoint, or None."""
  return checkpoint.latest_step(checkpoint_dir(workdir))


def model_info(workdir: str) -> dict:
  """model/lcm_jax.json: the weights variant, teacher, init_from and mode of the run."""
  return read_json(os.path.join(model_dir(workdir), MODEL_INFO_FILE))


def write_config(workdir: str, config_json: Mapping[str, Any]) -> None:
  """Writes WORKDIR/config.json atomically (a reader never sees half a file)."""
  path = os.path.join(workdir, CONFIG_FILE)
  with open(path + ".tmp", "w") as f:
    json.dump(dict(config_json), f, indent=2, sort_keys=True)
  os.replace(path + ".tmp", path)


def saved_config(workdir: str) -> dict | None:
  """WORKDIR/config.json (the config the run was started with), or None."""
  path = os.path.join(workdir, CONFIG_FILE)
  return read_json(path) if os.path.isfile(path) else None


def check_workdir_path(workdir: str) -> None:
  """Raises LcmJaxError unless `workdir` is a folder or can be made one (no file in the way)."""
  check_can_be_folder(workdir, "--workdir")


def set_aside_checkpoint(workdir: str, step: int) -> str:
  """Moves the (damaged) checkpoint of `step` to WORKDIR/damaged_checkpoints/, out of Orbax's sight."""
  target = os.path.join(workdir, DAMAGED_DIR, f"{step}-{int(time.time())}")
  os.makedirs(os.path.dirname(target), exist_ok=True)
  os.rename(os.path.join(checkpoint_dir(workdir), str(step)), target)
  return target


# ---------------------------------------------------------------------------------------
# The model folder.

def lcm_scheduler_config(base: Mapping[str, Any], *, original_inference_steps: int,
                         timestep_scaling: float) -> dict:
  """An `LCMScheduler` scheduler_config.json from the teacher's scheduler config.

  The noise schedule (betas, prediction type, ...) and every other LCMScheduler option the
  teacher's config sets are kept, as `LCMScheduler.from_config(teacher_config)` keeps them;
  keys LCMScheduler does not take are dropped; original_inference_steps is the number of
  points of the skipping-step grid the model was trained on (num_train_timesteps // k).
  """
  config = {k: v for k, v in base.items() if k in LCM_SCHEDULER_KEYS}
  config.update(_class_name="LCMScheduler", original_inference_steps=int(original_inference_steps),
                timestep_scaling=float(timestep_scaling))
  return config


def _link_or_copy(src: str, dst: str) -> None:
  # A hard link costs no space (SD's text encoder is over 1 GB); across filesystems, copy.
  try:
    os.link(os.path.realpath(src), dst)
  except OSError:
    shutil.copy2(src, dst)


def write_model_folder(workdir: str, base_folder: str, base_model_index: Mapping[str, Any],
                       unet_config: Mapping[str, Any], scheduler_config: Mapping[str, Any],
                       info: Mapping[str, Any], pipeline_class: str | None = None) -> str:
  """Writes `workdir/model/`: everything of the trained pipeline except the UNet weights.

  Args:
    base_folder: the local diffusers folder whose vae/, text_encoder/ and tokenizer/ the
      model uses (the teacher's).
    base_model_index: its model_index.json.
    unet_config: the student's unet/config.json (with time_cond_proj_dim).
    scheduler_config: the LCMScheduler config (`lcm_scheduler_config`).
    info: extra facts kept in model/lcm_jax.json (e.g. the weights variant, the teacher).
    pipeline_class: model_index.json's class; default LatentConsistencyModelPipeline (a UNet
      with a guidance input). A LoRA run's UNet has none: StableDiffusionPipeline, whose
      scheduler is then the LCMScheduler (diffusers' recipe for an LCM-LoRA).
  Returns:
    the folder's path.
  """
  out = model_dir(workdir)
  os.makedirs(out, exist_ok=True)
  for component in ("vae", "text_encoder", "tokenizer"):
    src, dst = os.path.join(base_folder, component), os.path.join(out, component)
    if os.path.isdir(dst):
      shutil.rmtree(dst)
    shutil.copytree(src, dst, copy_function=_link_or_copy)
  index = {k: v for k, v in base_model_index.items() if k.startswith("_")}
  index.update({name: list(base_model_index[name]) for name in ("vae", "text_encoder", "tokenizer")})
  # Components the LCM pipeline may take but we do not carry (the safety checker would need
  # the base pipeline's weights): null, so diffusers builds the pipeline without them.
  index.update(_class_name=pipeline_class or "LatentConsistencyModelPipeline", unet=["diffusers", "UNet2DConditionModel"],
               scheduler=["diffusers", "LCMScheduler"], safety_checker=[None, None],
               feature_extractor=[None, None], requires_safety_checker=False)
  for sub, name, content in (("", "model_index.json", index), ("unet", "config.json", unet_config),
                             ("scheduler", "scheduler_config.json", scheduler_config),
                             ("", MODEL_INFO_FILE, info)):
    os.makedirs(os.path.join(out, sub), exist_ok=True)
    with open(os.path.join(out, sub, name), "w") as f:
      json.dump(dict(content), f, indent=2, sort_keys=True)
  return out


# ---------------------------------------------------------------------------------------
# Reading models back.

def unet_config(workdir: str) -> dict:
  """The student's unet/config.json (with time_cond_proj_dim)."""
  return read_json(os.path.join(model_dir(workdir), "unet", "config.json"))


def load_unet(workdir: str, params: str = "ema", step: int | None = None, *, dtype=jnp.float32,
              sharding: Callable[[Any], Any] | None = None) -> tuple[dict, dict]:
  """The student UNet of a workdir's latest (or `step`) checkpoint (of a LoRA run: the base
  UNet with the checkpoint's adapter fused in, `load_lora`).

  Args:
    params: "ema" (the EMA target theta-, what the paper samples with) or "online" (the
      student the optimiser updates).
    dtype: the dtype of the returned parameters.
    sharding: abstract parameter tree -> tree of shardings to restore into (e.g. a mesh's
      rule-table shardings); None restores onto this process's first device.
  Returns:
    (unet config dict with time_cond_proj_dim, parameter tree).
  Raises:
    LcmJaxError if `workdir` is not a workdir or has no checkpoint.
  """
  if not is_workdir(workdir):
    raise LcmJaxError(f"{workdir} is not a training workdir (no {MODEL_DIR}/unet/config.json "
                      f"and {CHECKPOINT_DIR}/)")
  config = unet_config(workdir)
  abstract = abstract_params(build_module("unet", config, param_dtype=dtype))
  shardings = (sharding(abstract) if sharding is not None
               else jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.local_devices()[0]), abstract))
  if is_lora_run(workdir):
    from lcm_jax.lora import merge
    adapters, scale, base = load_lora(workdir, params, step, with_base=True, dtype=dtype)
    return config, jax.jit(merge, static_argnums=2, out_shardings=shardings)(base, adapters, scale)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, dtype, sharding=s), abstract, shardings)
  return config, checkpoint.restore_params(checkpoint_dir(workdir), abstract, params, step)


def is_lora_run(workdir: str) -> bool:
  """True for the workdir of a LoRA student (config.student = "lora"): its checkpoints hold an
  adapter, and model/lcm_jax.json names the base UNet folder (the teacher's)."""
  return is_workdir(workdir) and model_info(workdir).get("student") == "lora"


def base_unet_folder(workdir: str) -> str:
  """The base UNet folder of a LoRA run (the teacher's unet/, as model/lcm_jax.json records it;
  if it has moved, the teacher's name is resolved again)."""
  info = model_info(workdir)
  folder = info.get("base_unet") or ""
  if os.path.isfile(os.path.join(folder, "config.json")):
    return folder
  if info.get("teacher"):
    from lcm_jax.sd_pipeline import resolve_pipeline_folder
    teacher = os.path.join(resolve_pipeline_folder(info["teacher"], variant=info.get("variant") or None), "unet")
    if os.path.isfile(os.path.join(teacher, "config.json")):
      return teacher
  raise LcmJaxError(f"{workdir} is a LoRA run on the base UNet {folder or '?'} (its teacher "
                    f"{info.get('teacher')!r}), which is no longer there; the workdir holds only the adapter")


def load_lora(workdir: str, params: str = "ema", step: int | None = None, *, with_base: bool = False,
              dtype=jnp.float32):
  """The adapter of a LoRA run's latest (or `step`) checkpoint: (adapters, scale alpha / rank),
  and with `with_base` the base UNet's parameters (`dtype`) as well, on this process's first device.

  Raises:
    LcmJaxError if `workdir` is not the workdir of a LoRA run.
  """
  from lcm_jax.lora import abstract_lora, lora_scale
  from lcm_jax.sd_pipeline import load_component
  if not is_lora_run(workdir):
    raise LcmJaxError(f"{workdir} is not the workdir of a LoRA run (config.student = 'lora'): it has no adapter "
                      "to export or load; export its full UNet without --lora-only")
  settings = model_info(workdir)["lora"]
  config = unet_config(workdir)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  base_abstract = abstract_params(build_module("unet", config, param_dtype=dtype))
  abstract = abstract_lora(base_abstract, int(settings["rank"]), tuple(settings["targets"]))
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32, sharding=device), abstract)
  adapters = checkpoint.restore_params(checkpoint_dir(workdir), abstract, params, step)
  scale = lora_scale(int(settings["rank"]), float(settings["alpha"]))
  if not with_base:
    return adapters, scale
  _, base, _ = load_component(base_unet_folder(workdir), "unet", param_dtype=dtype,
                              variant=model_info(workdir).get("variant") or None)
  return adapters, scale, base


def load_pipeline_from_workdir(workdir: str, params: str = "ema", step: int | None = None, *,
                               dtype=jnp.float32, param_dtype=jnp.float32) -> Pipeline:
  """A whole `Pipeline` from a workdir: the checkpoint's UNet ("ema" or "online" parameters)
  with the workdir's model/ (VAE, text encoder, tokenizer, LCMScheduler config)."""
  config, unet_params = load_unet(workdir, params, step, dtype=param_dtype)
  pipe = load_pipeline_folder(model_dir(workdir), dtype=dtype, param_dtype=param_dtype,
                              variant=model_info(workdir).get("variant") or None,
                              components=("vae", "text_encoder", "tokenizer", "scheduler"))
  pipe.unet = build_module("unet", config, dtype=dtype, param_dtype=param_dtype)
  pipe.params["unet"] = unet_params
  pipe.configs["unet"] = config
  return pipe


def export_lora(workdir: str, output: str, *, params: str = "ema", dtype: str = "fp32",
                overwrite: bool = False) -> str:
  """Writes the adapter of a LoRA run's latest checkpoint as `output/pytorch_lora_weights.safetensors`
  (diffusers' format, alpha / rank folded into B: `python -m lcm_jax.export --lora-only`).

  Args:
    params: "ema" (the target adapter) or "online" (the student's).
    dtype: "fp32", "fp16" or "bf16".
    overwrite: replace a non-empty `output` folder.
  Returns:
    the file's path.
  """
  from lcm_jax.lora import save_diffusers_lora
  from lcm_jax.sd_pipeline import EXPORT_DTYPES, check_output_folder
  if dtype not in EXPORT_DTYPES:
    raise LcmJaxError(f"unknown export dtype {dtype!r}; choose from {', '.join(EXPORT_DTYPES)}")
  check_output_folder(output, overwrite)
  adapters, scale = load_lora(os.path.expanduser(workdir), params)
  if overwrite and os.path.isdir(output):
    shutil.rmtree(output)
  return save_diffusers_lora(output, adapters, scale, dtype=EXPORT_DTYPES[dtype])
