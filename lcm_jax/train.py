r"""Trains a latent consistency model: distillation (LCD) or fine-tuning (LCF).

    python -m lcm_jax.train --config=configs/sd21_768.py --workdir=runs/sd21_768 \
        --config.data.path='/data/laion/{00000..01210}.tar' [--config.a.b=value ...]

The same command runs on one CPU, one GPU or every host of a TPU pod (see launch/). A
restart with the same workdir resumes from its latest checkpoint (parameters, EMA target,
optimiser, step, random key and data position), and SIGTERM (preemption) saves a checkpoint
at the next step boundary and exits cleanly. Everything lands in the workdir: checkpoints,
TensorBoard events, sample grids and `model/`, which with a checkpoint makes a diffusers
`LatentConsistencyModelPipeline` (`lcm_jax.checkpoint.pipeline_from_workdir`).

`train()` reads top to bottom in sections, big_vision style: start-up, checks (all before
anything is loaded or compiled), mesh and data, weights, state, the jitted step, the loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from jax.experimental import multihost_utils
from ml_collections import config_flags
from tqdm import tqdm

from lcm_jax import checkpoint as ckpt
from lcm_jax import cli
from lcm_jax.data import make_train_data
from lcm_jax.errors import LcmJaxError
from lcm_jax.losses import ConsistencyLossConfig, make_loss_fn, student_params_from_teacher
from lcm_jax.models.unet import UNetConfig
from lcm_jax.models.vae import AutoencoderKL, VAEConfig
from lcm_jax.pipeline import (Pipeline, read_json, abstract_params, build_module, load_component,
                              resolve_pipeline_folder)
from lcm_jax.schedule import schedule_from_config
from lcm_jax.sharding import (batch_sharding, initialize_distributed, local_batch_size, make_global_batch,
                              make_mesh, param_shardings, replicated)
from lcm_jax.text_to_image import TextToImage
from lcm_jax.tokenizer import load_tokenizer, tokenize
from lcm_jax.train_step import create_train_state, make_optimizer, make_train_step, train_state_shardings

FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config: a Python file with get_config(arg), e.g. configs/sd21_768.py "
    "or configs/tiny.py:arg. Override any key with --config.a.b=value.", lock_config=True)
flags.DEFINE_string("workdir", None, "Folder for checkpoints, TensorBoard events, samples and the "
                    "model's configs. Re-running with the same workdir resumes the run.")

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
MODES = ("lcd", "lcf")
UNCONDS = ("empty_prompt", "zeros")
LATENTS_FORMAT = "latents"
# The arrays each batch format sends to the devices; anything else (num_skipped, ...) stays on the host.
IMAGE_KEYS = ("pixels", "input_ids")
LATENT_KEYS = ("latent_mean", "latent_logvar", "context")


# ---------------------------------------------------------------------------------------
# Checks that need no weights.

def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises LcmJaxError for a config value no run can use (before anything is loaded)."""
  def positive_int(key, value, allow_zero=False):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < (0 if allow_zero else 1):
      raise LcmJaxError(f"config.{key} must be a {'non-negative' if allow_zero else 'positive'} integer, "
                        f"got {value!r}")

  if config.mode not in MODES:
    raise LcmJaxError(f"config.mode must be one of {', '.join(MODES)}, got {config.mode!r}")
  if config.mode == "lcd" and not config.teacher:
    raise LcmJaxError("config.teacher is empty: LCD needs a teacher (a diffusers pipeline folder or "
                      "hub id); pass --config.teacher=...")
  if config.mode == "lcf" and not config.init_from:
    raise LcmJaxError("config.init_from is empty: LCF fine-tunes an existing LCM (a pipeline folder or "
                      "a workdir); pass --config.init_from=...")
  if config.init_params not in ckpt.PARAMS_CHOICES:
    raise LcmJaxError(f"config.init_params must be one of {', '.join(ckpt.PARAMS_CHOICES)}, "
                      f"got {config.init_params!r}")
  if not config.data.path:
    raise LcmJaxError("config.data.path is empty: pass --config.data.path=...")
  for key in ("resolution", "batch_size", "num_train_steps", "checkpoint_every", "keep_checkpoints",
              "log_every"):
    positive_int(key, config[key])
  positive_int("sample_every", config.sample_every, allow_zero=True)
  for key in ("teacher_dtype", "compute_dtype", "target_dtype"):
    if config.precision[key] not in DTYPES:
      raise LcmJaxError(f"config.precision.{key} must be one of {', '.join(DTYPES)}, "
                        f"got {config.precision[key]!r}")
  if config.loss.uncond not in UNCONDS:
    raise LcmJaxError(f"config.loss.uncond must be one of {', '.join(UNCONDS)}, got {config.loss.uncond!r}")
  if not 0.0 <= config.ema_decay <= 1.0:
    raise LcmJaxError(f"config.ema_decay must be in [0, 1], got {config.ema_decay}")
  if config.sample_every and not config.sample_prompts:
    raise LcmJaxError("config.sample_prompts is empty but config.sample_every asks for sample grids")
  loss_config(config, guidance_embedding_dim=config.loss.guidance_embedding_dim)  # its own checks


def loss_config(config: ml_collections.ConfigDict, guidance_embedding_dim: int) -> ConsistencyLossConfig:
  """The `ConsistencyLossConfig` of `config.loss` (validated by its constructor)."""
  c = config.loss
  return ConsistencyLossConfig(
      solver=c.solver, skipping_step=c.skipping_step, omega_min=c.omega_min, omega_max=c.omega_max,
      distance=c.distance, huber_c=c.huber_c, timestep_scaling=c.timestep_scaling,
      guidance_embedding_dim=guidance_embedding_dim, caption_dropout=c.caption_dropout)


def resolution_multiple(unet_config: Mapping, vae_config: Mapping) -> int:
  """The resolutions training can take are multiples of this: the VAE's downsampling factor
  times the UNet's (2 per down block but the last), so every skip connection lines up
  (64 for Stable Diffusion: 8 x 2^3)."""
  vae_blocks = len(VAEConfig.from_dict(vae_config).block_out_channels)
  unet_blocks = len(UNetConfig.from_dict(unet_config).block_out_channels)
  return 2 ** (vae_blocks - 1) * 2 ** (unet_blocks - 1)


def check_resolution(resolution: int, unet_config: Mapping, vae_config: Mapping) -> None:
  multiple = resolution_multiple(unet_config, vae_config)
  if resolution % multiple:
    below, above = resolution // multiple * multiple, (resolution // multiple + 1) * multiple
    raise LcmJaxError(
        f"config.resolution={resolution} is not a multiple of {multiple} (the VAE's downsampling factor "
        f"x 2 per UNet down block but the last); use e.g. {below or above} or {above}")


def check_batch_size(batch_size: int, mesh: jax.sharding.Mesh) -> None:
  devices = int(np.prod(list(mesh.shape.values())))
  if batch_size % devices:
    raise LcmJaxError(
        f"config.batch_size={batch_size} is not divisible by the {devices} data-parallel devices "
        f"(mesh data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']}); use a multiple of {devices}")
  local_batch_size(batch_size)  # and by the number of processes


# ---------------------------------------------------------------------------------------
# Where the weights come from.

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
    student_unet_config: the student's unet config (with time_cond_proj_dim).
    vae_config: the VAE config of `base`.
  """
  base: str
  base_variant: str | None
  teacher: str | None
  init_folder: str | None
  init_workdir: str | None
  student_unet_config: dict
  vae_config: dict


def resolve_sources(config: ml_collections.ConfigDict) -> Sources:
  """Finds every folder the run needs and reads their configs (no weights)."""
  variant = config.teacher_variant or None
  teacher = resolve_pipeline_folder(config.teacher, variant=variant) if config.teacher else None
  init_folder = init_workdir = None
  if config.init_from:
    if ckpt.is_workdir(config.init_from):
      init_workdir = config.init_from
    else:
      init_folder = resolve_pipeline_folder(config.init_from)

  if init_workdir:
    init_model = os.path.join(init_workdir, ckpt.MODEL_DIR)
    student_config = read_json(os.path.join(init_model, "unet", "config.json"))
    init_base, init_variant = init_model, read_json(os.path.join(init_model, ckpt.MODEL_INFO_FILE)).get("variant")
  elif init_folder:
    student_config = read_json(os.path.join(init_folder, "unet", "config.json"))
    init_base, init_variant = init_folder, None
  else:
    student_config = dict(read_json(os.path.join(teacher, "unet", "config.json")),
                          time_cond_proj_dim=int(config.loss.guidance_embedding_dim))
    init_base = init_variant = None
  if not student_config.get("time_cond_proj_dim"):
    raise LcmJaxError(f"config.init_from={config.init_from!r} is not an LCM: its UNet config has no "
                      "time_cond_proj_dim (the guidance input); distil it with mode=lcd first")
  base, base_variant = (teacher, variant) if teacher else (init_base, init_variant)
  vae_config = read_json(os.path.join(base, "vae", "config.json"))
  return Sources(base=base, base_variant=base_variant or None, teacher=teacher if config.mode == "lcd" else None,
                 init_folder=init_folder, init_workdir=init_workdir, student_unet_config=student_config,
                 vae_config=vae_config)


def sharded_placer(abstract: Any, mesh: jax.sharding.Mesh) -> Callable[[tuple[str, ...], np.ndarray], jax.Array]:
  """A `place` for `load_component`: puts each loaded leaf straight into its rule-table sharding."""
  shardings = param_shardings(abstract, mesh)
  flat = {tuple(str(getattr(k, "key", k)) for k in path): s
          for path, s in jax.tree_util.tree_flatten_with_path(shardings)[0]}
  return lambda path, array: jax.device_put(array, flat[tuple(path)])


def load_sharded(folder: str, component: str, mesh, *, dtype, param_dtype, variant=None, config=None):
  """(module, params) of one component folder, each parameter placed in its sharding."""
  config = read_json(os.path.join(folder, "config.json")) if config is None else config
  abstract = abstract_params(build_module(component, config, dtype=dtype, param_dtype=param_dtype))
  module, params, _ = load_component(folder, component, dtype=dtype, param_dtype=param_dtype, variant=variant,
                                     place=sharded_placer(abstract, mesh))
  return module, params


# ---------------------------------------------------------------------------------------
# Batch preparation inside the step.

def sample_latents(mean: jax.Array, logvar: jax.Array, rng: jax.Array, scaling_factor: float) -> jax.Array:
  """A draw from the VAE posterior times the scaling factor: z = (mean + exp(logvar / 2) eps) s.

  Both data paths (images encoded in the step, and a latent cache of moments) go through
  this one function, so they train on the same latents given the same key. [B, h, w, C] float32.
  """
  mean, logvar = mean.astype(jnp.float32), logvar.astype(jnp.float32)
  eps = jax.random.normal(rng, mean.shape, jnp.float32)
  return (mean + jnp.exp(0.5 * logvar) * eps) * scaling_factor


def make_batch_preparation(vae, text_encoder, scaling_factor: float):
  """`prepare(frozen, batch, rng) -> {"latents" [B, h, w, C], "context" [B, L, D]}`.

  Image batches ({"pixels" [B, R, R, 3] in [-1, 1], "input_ids" [B, L]}) are encoded with the
  frozen VAE (`frozen["vae"]`) and text encoder (`frozen["text_encoder"]`); latent batches
  ({"latent_mean", "latent_logvar" [B, h, w, C], "context" [B, L, D]}) need neither.
  """
  def prepare(frozen, batch, rng):
    if "pixels" in batch:
      mean, logvar = vae.apply({"params": frozen["vae"]}, batch["pixels"].astype(vae.dtype),
                               method=AutoencoderKL.encode)
      context = text_encoder.apply({"params": frozen["text_encoder"]}, batch["input_ids"])[0]
    else:
      mean, logvar, context = batch["latent_mean"], batch["latent_logvar"], batch["context"]
    return {"latents": sample_latents(mean, logvar, rng, scaling_factor), "context": context}

  return prepare


def unet_apply(module):
  """The `apply_fn(params, z, t, context, timestep_cond)` of lcm_jax.losses for a UNet module."""
  return lambda params, z, t, context, timestep_cond: module.apply({"params": params}, z, t, context,
                                                                    timestep_cond)


def check_first_batch(batch: Mapping[str, np.ndarray], *, latents_format: bool, local_batch: int,
                      resolution: int, latent_hw: int, latent_channels: int, context_dim: int) -> None:
  """Raises LcmJaxError if the data's arrays do not fit the models (before compiling)."""
  keys = LATENT_KEYS if latents_format else IMAGE_KEYS
  missing = [k for k in keys if k not in batch]
  if missing:
    raise LcmJaxError(f"the data pipeline's batches lack {missing} (got {sorted(batch)})")
  if latents_format:
    want = (local_batch, latent_hw, latent_hw, latent_channels)
    for k in ("latent_mean", "latent_logvar"):
      if tuple(batch[k].shape) != want:
        raise LcmJaxError(f"the latent cache's {k} is {tuple(batch[k].shape)}, training needs {want} "
                          f"(resolution {resolution}); re-cache the data at this resolution with this VAE")
    if batch["context"].shape[-1] != context_dim:
      raise LcmJaxError(f"the latent cache's text embeddings have width {batch['context'].shape[-1]}, "
                        f"the UNet takes {context_dim}: the cache was made with another text encoder")
  elif tuple(batch["pixels"].shape) != (local_batch, resolution, resolution, 3):
    raise LcmJaxError(f"the data pipeline gives pixels {tuple(batch['pixels'].shape)}, expected "
                      f"{(local_batch, resolution, resolution, 3)}")


# ---------------------------------------------------------------------------------------
# Logs and samples.

class MetricWriter:
  """TensorBoard scalars and images in the workdir (process 0 only; a no-op elsewhere)."""

  def __init__(self, workdir: str, enabled: bool):
    self._writer = None
    if enabled:
      try:
        from tensorboardX import SummaryWriter
      except ImportError:
        raise LcmJaxError("TensorBoard logging needs tensorboardX: pip install tensorboardX") from None
      self._writer = SummaryWriter(logdir=workdir, flush_secs=30)

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    if self._writer:
      for name, value in values.items():
        self._writer.add_scalar(name, float(value), step)

  def image(self, step: int, name: str, image: np.ndarray) -> None:
    if self._writer:
      self._writer.add_image(name, image, step, dataformats="HWC")

  def close(self) -> None:
    if self._writer:
      self._writer.close()


def to_sampling_device(tree: Any) -> Any:
  """A copy of `tree` on this process's first device, for sampling outside the mesh.

  Multi-process: every process must call it (it all-gathers the shards); single-process it
  just moves (or keeps) the arrays on one device.
  """
  if jax.process_count() > 1:
    tree = multihost_utils.process_allgather(tree, tiled=True)
  return jax.device_put(tree, jax.local_devices()[0])


def sample_grid(text_to_image, prompts, steps, guidance_scale: float, resolution: int) -> np.ndarray:
  """uint8 [len(prompts) R, len(steps) R, 3]: one row per prompt, one column per LCM step count,
  the same seed everywhere (so columns differ only by the number of steps)."""
  columns = [text_to_image(list(prompts), sampler="lcm", num_steps=int(n), guidance_scale=guidance_scale,
                           height=resolution, width=resolution, seed=0) for n in steps]
  grid = np.stack(columns, axis=1)  # [P, S, R, R, 3]
  p, s, h, w, c = grid.shape
  return grid.transpose(0, 2, 1, 3, 4).reshape(p * h, s * w, c)


def save_png(path: str, image: np.ndarray) -> None:
  from PIL import Image
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(image).save(path)


def next_batch(data_iter, step: int) -> dict:
  try:
    return next(data_iter)
  except StopIteration:
    raise LcmJaxError(f"the data ran out at step {step}; the pipeline must repeat its data") from None


def mean_metrics(pending: list[dict]) -> dict[str, float]:
  """Averages a list of per-step metric dicts (device scalars) on the host."""
  host = jax.device_get(pending)
  return {k: float(np.mean([m[k] for m in host])) for k in host[0]}


# ---------------------------------------------------------------------------------------
# The run.

def train(config: ml_collections.ConfigDict, workdir: str, *, stop_after_steps: int | None = None,
          on_batch: Callable[[int, Mapping[str, np.ndarray]], None] | None = None):
  """Trains as `config` says, in `workdir`, resuming from its latest checkpoint if it has one.

  Args:
    config: the ConfigDict of a configs/*.py file.
    workdir: where everything is written (created if missing).
    stop_after_steps: stop, with a checkpoint, after this many steps of this call, as a
      preemption would (the tests' restart); None runs to config.num_train_steps.
    on_batch: called with (step, host batch) before each step (the tests record the data
      order with it).
  Returns:
    the final `lcm_jax.train_step.TrainState`.
  """
  # --- Start-up. Multi-host runs must meet the coordinator before anything touches a device.
  initialize_distributed()
  if config.compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", os.path.abspath(os.path.expanduser(config.compilation_cache_dir)))
  is_main = jax.process_index() == 0
  log = (lambda *a: print(*a, flush=True)) if is_main else (lambda *a: None)

  # --- Checks: every one runs before any weights are loaded or anything is compiled.
  if not workdir:
    raise LcmJaxError("--workdir is empty")
  check_config(config)
  resume_step = ckpt.latest_step(workdir)
  sources = resolve_sources(config)
  check_resolution(config.resolution, sources.student_unet_config, sources.vae_config)
  mesh = make_mesh(config.mesh.data, config.mesh.fsdp)
  check_batch_size(config.batch_size, mesh)
  latents_format = config.data.format == LATENTS_FORMAT
  teacher_dtype, compute_dtype, target_dtype = (DTYPES[config.precision[k]]
                                                for k in ("teacher_dtype", "compute_dtype", "target_dtype"))
  student_config = sources.student_unet_config
  student_loss_config = loss_config(config, int(student_config["time_cond_proj_dim"]))
  base_scheduler = read_json(os.path.join(sources.base, "scheduler", "scheduler_config.json"))
  schedule = schedule_from_config(base_scheduler)
  optimizer = make_optimizer(
      config.optimizer.lr, warmup_steps=config.optimizer.warmup_steps, schedule=config.optimizer.schedule,
      total_steps=config.num_train_steps, b1=config.optimizer.b1, b2=config.optimizer.b2,
      eps=config.optimizer.eps, weight_decay=config.optimizer.weight_decay,
      max_grad_norm=config.optimizer.max_grad_norm or None)

  with contextlib.ExitStack() as cleanup:  # closes the data, checkpoints and logs on every exit
    # --- Data. Each process reads its own shard; the data module checks its path here.
    tokenizer = load_tokenizer(os.path.join(sources.base, "tokenizer"))
    train_data = make_train_data(config.data, resolution=config.resolution, global_batch_size=config.batch_size,
                                 seed=config.seed, tokenizer=None if latents_format else tokenizer,
                                 process_index=jax.process_index(), process_count=jax.process_count())
    cleanup.callback(getattr(train_data, "close", lambda: None))
    data_iter = train_data if hasattr(train_data, "__next__") else iter(train_data)
    data_state = train_data if hasattr(train_data, "get_state") else data_iter

    # --- The workdir: model/ (all of the pipeline but the UNet weights) and the config.
    config_json = json.loads(config.to_json_best_effort())
    lcm_scheduler = ckpt.lcm_scheduler_config(
        base_scheduler, original_inference_steps=schedule.num_train_timesteps // config.loss.skipping_step,
        timestep_scaling=config.loss.timestep_scaling)
    if is_main:
      os.makedirs(workdir, exist_ok=True)
      with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(config_json, f, indent=2, sort_keys=True)
      if resume_step is None or not ckpt.is_workdir(workdir):
        ckpt.write_model_folder(
            workdir, sources.base, read_json(os.path.join(sources.base, "model_index.json")), student_config,
            lcm_scheduler, info={"variant": sources.base_variant, "teacher": config.teacher,
                                 "init_from": config.init_from, "mode": config.mode})

    # --- Frozen models: the teacher UNet (LCD), and the VAE + text encoder when images are
    # encoded in the step, the unconditional context needs the empty prompt, or samples are drawn.
    log(f"loading models from {sources.base} ...")
    load_start = time.perf_counter()
    needs_text = not latents_format or config.loss.uncond == "empty_prompt" or config.sample_every > 0
    needs_vae = not latents_format or config.sample_every > 0
    frozen_kw = dict(dtype=teacher_dtype, param_dtype=teacher_dtype, variant=sources.base_variant)
    vae, vae_params = (load_sharded(os.path.join(sources.base, "vae"), "vae", mesh, **frozen_kw)
                       if needs_vae else (None, None))
    text_encoder, text_params = (load_sharded(os.path.join(sources.base, "text_encoder"), "text_encoder", mesh,
                                              **frozen_kw) if needs_text else (None, None))
    scaling_factor = float(sources.vae_config.get("scaling_factor", 0.18215))
    if latents_format:
      cache_scaling = float(train_data.latents_metadata.get("vae_scaling_factor", scaling_factor))
      if not np.isclose(cache_scaling, scaling_factor):
        raise LcmJaxError(f"the latent cache {config.data.path} was written with a VAE whose scaling factor is "
                          f"{cache_scaling}, the model's VAE has {scaling_factor}: re-cache with this model")
    seq_len, context_dim = tokenizer.model_max_length, int(UNetConfig.from_dict(student_config).cross_attention_dim)
    if config.loss.uncond == "empty_prompt":
      ids = tokenize(tokenizer, [""])
      uncond_context = jax.jit(lambda p, i: text_encoder.apply({"params": p}, i)[0])(text_params, ids)
    else:
      uncond_context = jnp.zeros((1, seq_len, context_dim), compute_dtype)
    frozen = {"uncond_context": jax.device_put(uncond_context, replicated(mesh))}
    if not latents_format:
      frozen["vae"], frozen["text_encoder"] = vae_params, text_params

    # The UNet weights are read in float32: the student copies them (master weights), the
    # teacher is a cast of them. A resumed run reads only the teacher's.
    student = build_module("unet", student_config, dtype=compute_dtype, param_dtype=jnp.float32, remat=config.remat)
    student_abstract = abstract_params(student)
    student_shardings = param_shardings(student_abstract, mesh)
    teacher, teacher_fp32 = None, None
    if sources.teacher:
      teacher_unet = os.path.join(sources.teacher, "unet")
      teacher_config = read_json(os.path.join(teacher_unet, "config.json"))
      teacher = build_module("unet", teacher_config, dtype=teacher_dtype, param_dtype=teacher_dtype)
      _, teacher_fp32 = load_sharded(teacher_unet, "unet", mesh, dtype=teacher_dtype, param_dtype=jnp.float32,
                                     variant=sources.base_variant, config=teacher_config)
      cast = lambda tree: jax.tree.map(lambda x: x.astype(teacher_dtype), tree)
      frozen["teacher"] = jax.jit(cast, out_shardings=jax.tree.map(lambda x: x.sharding, teacher_fp32))(teacher_fp32)
    log(f"loaded the frozen models in {time.perf_counter() - load_start:.1f}s")

    # --- Train state: restored from the workdir, or a fresh student (teacher copy or init_from).
    state_shardings = train_state_shardings(optimizer, student_abstract, student_shardings, mesh)
    init_state = lambda params, rng: create_train_state(params, optimizer, rng, target_dtype=target_dtype)
    manager = ckpt.make_manager(workdir, keep=config.keep_checkpoints)
    cleanup.callback(manager.close)
    cleanup.callback(manager.wait_until_finished)  # runs first: pending async saves finish
    rng = jax.random.PRNGKey(config.seed)
    if resume_step is not None:
      abstract_state = jax.eval_shape(init_state, student_abstract, rng)
      abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                    abstract_state, state_shardings)
      state, saved_config = ckpt.restore_checkpoint(manager, abstract_state, data_state, step=resume_step)
      changed = sorted(k for k in set(saved_config) | set(config_json) if saved_config.get(k) != config_json.get(k))
      log(f"resumed {workdir} at step {resume_step}" + (f" (config changed: {', '.join(changed)})" if changed else ""))
    else:
      if sources.init_workdir:
        _, init_params = ckpt.load_workdir_unet(sources.init_workdir, config.init_params)
      elif sources.init_folder:
        _, init_params = load_sharded(os.path.join(sources.init_folder, "unet"), "unet", mesh, dtype=compute_dtype,
                                      param_dtype=jnp.float32, config=student_config)
      else:
        init_params = student_params_from_teacher(teacher_fp32, student_abstract, jax.random.fold_in(rng, 1),
                                                  init=config.loss.cond_proj_init)
      state = jax.jit(init_state, out_shardings=state_shardings)(init_params, rng)
      del init_params
    del teacher_fp32

    # --- The step: batch preparation (VAE + text encoder for images) and the loss, jitted.
    consistency_loss = make_loss_fn(config.mode, unet_apply(student), schedule, student_loss_config,
                                    unet_apply(teacher) if teacher is not None else None)
    prepare = make_batch_preparation(vae, text_encoder, scaling_factor)

    def loss_fn(student_params, target_params, frozen, batch, rng):
      posterior_rng, loss_rng = jax.random.split(rng)
      return consistency_loss(student_params, target_params, frozen, prepare(frozen, batch, posterior_rng), loss_rng)

    data_sharding = batch_sharding(mesh)
    train_step = make_train_step(loss_fn, optimizer, config.ema_decay, mesh=mesh, state_shardings=state_shardings,
                                 frozen_shardings=jax.tree.map(lambda x: x.sharding, frozen),
                                 batch_shardings=data_sharding)
    device_keys = LATENT_KEYS if latents_format else IMAGE_KEYS

    # --- Sampling: the EMA target through the LCM sampler, on one device of process 0.
    text_to_image = None
    if config.sample_every:
      sample_pipe = Pipeline(
          unet=build_module("unet", student_config, dtype=compute_dtype, param_dtype=target_dtype),
          vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
          params={"vae": to_sampling_device(vae_params), "text_encoder": to_sampling_device(text_params)},
          configs={"unet": student_config, "vae": sources.vae_config, "scheduler": lcm_scheduler})
      text_to_image = TextToImage(sample_pipe) if is_main else None

    def write_samples(step: int, target_params) -> None:
      target = to_sampling_device(target_params)  # every process: it may all-gather
      if text_to_image is None:
        return
      start = time.perf_counter()
      text_to_image.pipe.params["unet"] = target
      grid = sample_grid(text_to_image, config.sample_prompts, config.sample_steps, config.sample_guidance_scale,
                         config.resolution)
      path = os.path.join(workdir, "samples", f"step_{step:07d}.png")
      save_png(path, grid)
      writer.image(step, "samples/ema_lcm_" + "_".join(str(n) for n in config.sample_steps) + "_steps", grid)
      log(f"step {step}: wrote {path} ({time.perf_counter() - start:.1f}s)")

    # --- Compile, on the shapes of the first batch (checked against the models first).
    step = int(jax.device_get(state.step))
    if step >= config.num_train_steps:
      log(f"{workdir} is already at step {step} of {config.num_train_steps}; nothing to do")
      return state
    preemption = cleanup.enter_context(ckpt.PreemptionWatcher())
    host_batch = next_batch(data_iter, step)
    latent_hw = config.resolution // (2 ** (len(VAEConfig.from_dict(sources.vae_config).block_out_channels) - 1))
    check_first_batch(host_batch, latents_format=latents_format, local_batch=local_batch_size(config.batch_size),
                      resolution=config.resolution, latent_hw=latent_hw,
                      latent_channels=int(UNetConfig.from_dict(student_config).in_channels), context_dim=context_dim)
    device_batch = lambda b: make_global_batch({k: b[k] for k in device_keys}, data_sharding)
    log("compiling the train step ...")
    start = time.perf_counter()
    compiled = train_step.lower(state, frozen, device_batch(host_batch)).compile()
    log(f"compiled in {time.perf_counter() - start:.1f}s")

    # --- The loop. A step's checkpoint is saved before the next batch is read, so the saved
    # data position is exactly the batches the saved state has trained on.
    writer = MetricWriter(workdir, enabled=is_main)
    cleanup.callback(writer.close)
    progress = cleanup.enter_context(tqdm(total=config.num_train_steps, initial=step, disable=not is_main,
                                          unit="step", dynamic_ncols=True, desc=config.mode))
    pending, skipped, steps_this_run = [], 0, 0
    last_log_time, last_log_step = time.perf_counter(), step
    while True:
      if on_batch is not None:
        on_batch(step, host_batch)
      skipped = int(host_batch.get("num_skipped", skipped))  # this process's total since the run began
      state, metrics = compiled(state, frozen, device_batch(host_batch))
      step += 1
      steps_this_run += 1
      pending.append(metrics)
      progress.update(1)

      if step % config.log_every == 0 or step == config.num_train_steps:
        values = mean_metrics(pending)  # waits for the step: the timings below are real
        now = time.perf_counter()
        step_time = (now - last_log_time) / (step - last_log_step)
        last_log_time, last_log_step, pending = now, step, []
        skipped_all = (int(np.sum(multihost_utils.process_allgather(np.int64(skipped))))
                       if jax.process_count() > 1 else skipped)
        scalars = {f"train/{k}": v for k, v in values.items()}
        scalars.update({"perf/samples_per_sec": config.batch_size / step_time, "perf/step_time": step_time,
                        "data/skipped_records": skipped_all})
        writer.scalars(step, scalars)
        progress.set_postfix(loss=f"{values['loss']:.4g}", samples_s=f"{config.batch_size / step_time:.3g}")
      if config.sample_every and (step % config.sample_every == 0 or step == config.num_train_steps):
        write_samples(step, state.target_params)

      stop = preemption.requested
      if jax.process_count() > 1:  # every process must stop at the same step to save together
        stop = bool(np.max(multihost_utils.process_allgather(np.int32(stop))))
      stop = stop or steps_this_run == stop_after_steps
      if step % config.checkpoint_every == 0 or step == config.num_train_steps or stop:
        ckpt.save_checkpoint(manager, state, config_json, data_state)
      if stop:
        log(f"stopped at step {step} with a checkpoint; rerun with the same workdir to resume")
      if stop or step == config.num_train_steps:
        break
      host_batch = next_batch(data_iter, step)
    return state


# ---------------------------------------------------------------------------------------
# Command line.

def main(argv: list[str]) -> None:
  del argv
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
  try:
    config = _CONFIG.value
    config.keys()  # a config file that failed to load raises here
  except (IOError, AttributeError) as e:
    raise LcmJaxError(f"cannot load --config: {e}") from None
  if config is None:
    raise LcmJaxError("--config is required, e.g. --config=configs/tiny.py")
  train(config, FLAGS.workdir)


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing with every error as one line (config_flags reports an unknown
  `--config.key` with a traceback, and absl a bad value on two lines). Returns the
  arguments left: the program name and any positional arguments."""
  config_arg = next((a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")), None)
  if config_arg is not None and not os.path.isfile(config_arg.split(":")[0]):
    cli.fail(f"config file {config_arg.split(':')[0]} does not exist")
  app.define_help_flags()  # --help, --helpshort, ... (app.run would define them only after this parse)
  try:
    with cli.help_exits_zero():
      rest = FLAGS(argv)
  except flags.Error as e:
    cli.fail(f"{e} (see --help)")
  except (AttributeError, KeyError) as e:  # config_flags: a --config.a.b naming no key
    text = str(e).replace("\\n", " ").replace("\\", "")
    name = re.search(r"'(\w+)'", text)
    name = name.group(1) if name else ""
    flag = next((a.split("=")[0] for a in argv[1:] if a.startswith("--config.")
                 and name in a.split("=")[0].split(".")), "a --config. flag")
    suggestion = re.search(r'Did you mean "(\w+)"', text)
    cli.fail(f"unknown config key {flag}" + (f' (did you mean "{suggestion.group(1)}"?)' if suggestion else ""))
  except Exception as e:  # noqa: BLE001  config_flags raises TypeError/ValueError for bad values
    cli.fail(f"bad flags: {' '.join(str(e).split())}")
  if FLAGS.workdir is None:
    cli.fail("--workdir is required")
  return rest


if __name__ == "__main__":
  # Flags are parsed here, so that their errors are one line; cli.run (which reports
  # LcmJaxError as one line) gets only the program name and any positional arguments.
  sys.argv = parse_flags(sys.argv)
  cli.run(main)
