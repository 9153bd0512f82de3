"""`train(config, workdir)`: a training run (LCD or LCF) as a few named phases.

    plan = plan_run(config, workdir)          # checks: everything that needs no weights
    data = open_data(plan)                    # the data loader (each process its slice)
    frozen = load_frozen_models(...)          # teacher, VAE, text encoder onto the mesh
    state = init_or_restore(...)              # the student, optimiser and EMA target
    step_fn = compile_step(...)               # the jitted, sharded step, on the first batch
    Loop(...).run(state, ...)                 # steps, logs, grids, checkpoints

Each phase is a function of its own module (lcm_jax.training.*); `python -m lcm_jax.train`
is the command-line front of this function.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import tqdm

from lcm_jax import checkpoint, guided_distill
from lcm_jax import workdir as workdir_lib
from lcm_jax.config import check_config, config_changes, guided_distill_config, loss_config
from lcm_jax.data import make_train_data
from lcm_jax.errors import LcmJaxError
from lcm_jax.losses import make_loss_fn
from lcm_jax.models.unet import UNetConfig
from lcm_jax.models.vae import downsampling_factor
from lcm_jax.schedule import Schedule, schedule_from_config
from lcm_jax.sharding import (
  batch_sharding,
  initialize_distributed,
  local_batch_size,
  make_global_batch,
  make_mesh,
)
from lcm_jax.tokenizer import load_tokenizer
from lcm_jax.train_step import TrainState, make_train_step
from lcm_jax.training.batches import (
  check_first_batch,
  device_keys,
  make_batch_preparation,
  next_batch,
)
from lcm_jax.training.frozen import FrozenModels, load_frozen_models
from lcm_jax.training.logs import MetricWriter, SkipLog, console, skip_log_path
from lcm_jax.training.loop import Loop
from lcm_jax.training.samples import SampleWriter
from lcm_jax.training.sources import (
  Sources,
  check_batch_size,
  check_resolution,
  resolve_sources,
)
from lcm_jax.training.state import (
  Student,
  build_optimizer,
  build_student,
  init_or_restore,
)

LATENTS_FORMAT = "latents"


@dataclasses.dataclass
class RunPlan:
  """What a run is, known before any weight is read: its folders, mesh, schedule and resume point."""
  config: ml_collections.ConfigDict
  workdir: str
  sources: Sources
  mesh: jax.sharding.Mesh
  schedule: Schedule
  resume_step: int | None
  latents_format: bool
  config_json: dict
  log: Callable[..., None]

  @property
  def is_main(self) -> bool:
    return jax.process_index() == 0


def train(config: ml_collections.ConfigDict, workdir: str, *, stop_after_steps: int | None = None,
          on_batch: Callable[[int, Mapping[str, np.ndarray]], None] | None = None) -> TrainState:
  """Trains as `config` says, in `workdir`, resuming from its latest checkpoint if it has one.

  Args:
    config: the ConfigDict of a configs/*.py file (`lcm_jax.config.base_config` plus changes).
    workdir: where everything is written (created if missing; layout in `lcm_jax.workdir`).
    stop_after_steps: stop, with a checkpoint, after this many steps of this call, as a
      preemption would (the tests' restart); None runs to config.num_train_steps.
    on_batch: called with (step, host batch) before each step (the tests record the data
      order with it).
  Returns:
    the final `lcm_jax.train_step.TrainState`.
  """
  initialize_distributed()  # multi-host runs meet the coordinator before anything touches a device
  if config.compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", os.path.abspath(os.path.expanduser(config.compilation_cache_dir)))
  plan = plan_run(config, workdir)
  with contextlib.ExitStack() as cleanup:  # closes the data, checkpoints and logs on every exit
    tokenizer = load_tokenizer(os.path.join(plan.sources.base, "tokenizer"))
    train_data, data_iter, data_state = open_data(plan, tokenizer, cleanup)
    plan.log(f"loading models from {plan.sources.base} ...")
    start = time.perf_counter()
    frozen = load_frozen_models(config, plan.sources, plan.mesh, tokenizer=tokenizer,
                                latents_format=plan.latents_format)
    check_latent_cache(plan, train_data, frozen.scaling_factor)
    plan.log(f"loaded the frozen models in {time.perf_counter() - start:.1f}s")
    student = build_student(config, plan.sources, plan.mesh)
    manager = checkpoint.make_manager(workdir_lib.checkpoint_dir(workdir), keep=config.keep_checkpoints)
    cleanup.callback(manager.close)
    cleanup.callback(manager.wait_until_finished)  # runs first: pending async saves finish
    state, state_shardings = init_or_restore(config, plan.sources, student, frozen, plan.mesh, manager, data_state,
                                             workdir, plan.resume_step, plan.log)
    frozen.teacher_fp32 = None  # the student has its copy; free the float32 teacher
    write_workdir(plan)
    step = int(jax.device_get(state.step))
    if step >= config.num_train_steps:
      plan.log(f"{workdir} is already at step {step} of {config.num_train_steps}; nothing to do")
      return state
    preemption = cleanup.enter_context(checkpoint.PreemptionWatcher())
    skipped_before = restored_skip_count(data_state)
    host_batch = next_batch(data_iter, step)
    step_fn, to_device = compile_step(plan, student, frozen, state, state_shardings, host_batch)
    loop = make_loop(plan, cleanup, frozen, tokenizer, step_fn, to_device, data_iter, data_state, manager, step,
                     skipped_before)
    return loop.run(state, host_batch, preemption, stop_after_steps=stop_after_steps, on_batch=on_batch)


# ---------------------------------------------------------------------------------------
# Phases.

def plan_run(config: ml_collections.ConfigDict, workdir: str) -> RunPlan:
  """Every check that needs no weights: the config, the model folders' configs, the
  resolution, the mesh and the batch size. Nothing is written or loaded."""
  if not workdir:
    raise LcmJaxError("--workdir is empty")
  workdir_lib.check_workdir_path(workdir)
  check_config(config)
  sources = resolve_sources(config)
  check_resolution(config.resolution, sources.student_unet_config, sources.vae_config)
  mesh = make_mesh(config.mesh.data, config.mesh.fsdp)
  check_batch_size(config.batch_size, mesh, config.grad_accum_steps)
  schedule = schedule_from_config(sources.scheduler_config)
  loss_config(config, guidance_dim(config, sources.student_unet_config))  # checks the loss against the model
  config_json = json.loads(config.to_json_best_effort())
  resume_step = workdir_lib.latest_step(workdir)
  log = console(jax.process_index() == 0, workdir)
  if resume_step is not None:
    check_resumable(workdir, config_json, log)
  return RunPlan(config=config, workdir=workdir, sources=sources, mesh=mesh, schedule=schedule,
                 resume_step=resume_step, latents_format=config.data.format == LATENTS_FORMAT,
                 config_json=config_json, log=log)


def check_resumable(workdir: str, config_json: dict, log) -> None:
  """A workdir resumes only with the config it was started with, up to `RESUME_SAFE_KEYS`
  (or anything, with config.resume_with_changes): one line naming what differs."""
  saved = workdir_lib.saved_config(workdir)
  if saved is None:
    return
  safe, unsafe = config_changes(saved, config_json)
  if unsafe and not config_json.get("resume_with_changes"):
    raise LcmJaxError(f"{workdir} was trained with another config: {'; '.join(unsafe)}. Use a new --workdir, or "
                      "pass --config.resume_with_changes=true to resume anyway")
  if safe or unsafe:
    log(f"resuming {workdir} with config changes: {'; '.join(safe + unsafe)}")


def open_data(plan: RunPlan, tokenizer, cleanup: contextlib.ExitStack):
  """(loader, iterator, checkpointable) of this process's share of the training data."""
  config = plan.config
  train_data = make_train_data(config.data, resolution=config.resolution, global_batch_size=config.batch_size,
                               seed=config.seed, tokenizer=None if plan.latents_format else tokenizer,
                               process_index=jax.process_index(), process_count=jax.process_count())
  cleanup.callback(getattr(train_data, "close", lambda: None))
  data_iter = train_data if hasattr(train_data, "__next__") else iter(train_data)
  data_state = train_data if hasattr(train_data, "get_state") else data_iter
  return train_data, data_iter, data_state


def check_latent_cache(plan: RunPlan, train_data, scaling_factor: float) -> None:
  """A latent cache must have been written with this model's VAE scaling factor."""
  if not plan.latents_format:
    return
  cache_scaling = float(train_data.latents_metadata.get("vae_scaling_factor", scaling_factor))
  if not np.isclose(cache_scaling, scaling_factor):
    raise LcmJaxError(f"the latent cache {plan.config.data.path} was written with a VAE whose scaling factor is "
                      f"{cache_scaling}, the model's VAE has {scaling_factor}: re-cache with this model")


def lcm_scheduler_of(plan: RunPlan) -> dict:
  """The LCMScheduler config of the trained model (the teacher's schedule, the run's k and scaling)."""
  return workdir_lib.lcm_scheduler_config(
      plan.sources.scheduler_config,
      original_inference_steps=plan.schedule.num_train_timesteps // plan.config.loss.skipping_step,
      timestep_scaling=plan.config.loss.timestep_scaling)


def write_workdir(plan: RunPlan) -> None:
  """WORKDIR/config.json and model/ (all of the pipeline but the UNet weights), on process 0,
  once the state exists (a run that fails before it leaves no config behind)."""
  if not plan.is_main:
    return
  config, sources = plan.config, plan.sources
  os.makedirs(plan.workdir, exist_ok=True)
  workdir_lib.write_config(plan.workdir, plan.config_json)
  if plan.resume_step is None or not workdir_lib.is_workdir(plan.workdir):
    workdir_lib.write_model_folder(
        plan.workdir, sources.base, sources.model_index, sources.student_unet_config, lcm_scheduler_of(plan),
        info={"variant": sources.base_variant, "teacher": config.teacher, "init_from": config.init_from,
              "mode": config.mode, **lora_info(config, sources)},
        pipeline_class="StableDiffusionPipeline" if config.get("student") == "lora" else None)


def lora_info(config: ml_collections.ConfigDict, sources: Sources) -> dict:
  """model/lcm_jax.json's facts about a LoRA student: the adapter's settings and the base UNet
  folder (the teacher's; its weights are not copied into the workdir)."""
  if config.get("student") != "lora":
    return {}
  return {"student": "lora", "base_unet": os.path.abspath(os.path.join(sources.teacher, "unet")),
          "lora": {"rank": int(config.lora.rank), "alpha": float(config.lora.alpha),
                   "targets": list(config.lora.targets)}}


def guidance_dim(config: ml_collections.ConfigDict, unet_config) -> int:
  """The guidance embedding's width: the student UNet's time_cond_proj_dim (a LoRA student has
  none: the loss draws omega but its embedding is not used, so config.loss's width)."""
  dim = unet_config["time_cond_proj_dim"] if isinstance(unet_config, dict) else unet_config.time_cond_proj_dim
  return int(dim) if dim else int(config.loss.guidance_embedding_dim)


def unet_apply(module):
  """The `apply_fn(params, z, t, context, timestep_cond)` of lcm_jax.losses for a UNet module."""
  return lambda params, z, t, context, timestep_cond: module.apply({"params": params}, z, t, context,
                                                                    timestep_cond)


def make_step(config: ml_collections.ConfigDict, schedule: Schedule, mesh: jax.sharding.Mesh, student: Student,
              frozen: FrozenModels, state_shardings, latents_format: bool,
              gd_stage: int | None = None) -> tuple[Callable, Callable[[dict], dict]]:
  """(the jitted, sharded step, host batch -> device batch): batch preparation (VAE and text
  encoder for image batches, the posterior draw) and the consistency loss in one step. Works
  on abstract arrays too (`lcm_jax.bench.memory_plan` compiles it without weights).
  gd_stage: Guided-Distill only: the stage the step is compiled for (None: either, chosen
  on the device by the step count; `guided_distill.make_loss_fn`)."""
  unet_config = student.module.config
  ema_decay, loss_takes_step = config.ema_decay, False
  if config.mode == "guided_distill":
    gd_config = guided_distill_config(config, int(unet_config.time_cond_proj_dim))
    consistency_loss = guided_distill.make_loss_fn(unet_apply(student.module), unet_apply(frozen.teacher), schedule,
                                                   gd_config, stage=gd_stage)
    # The train state's target is the round's teacher: frozen, replaced by the student at each round's end.
    ema_decay, loss_takes_step = functools.partial(guided_distill.target_decay, config=gd_config), True
  else:
    consistency_loss = make_loss_fn(config.mode, unet_apply(student.module), schedule,
                                    loss_config(config, guidance_dim(config, unet_config)),
                                    unet_apply(frozen.teacher) if frozen.teacher is not None else None,
                                    lora_scale=student.lora_scale)
  prepare = make_batch_preparation(frozen.vae, frozen.text_encoder, frozen.scaling_factor)

  def loss_fn(student_params, target_params, frozen_arrays, batch, rng, **kwargs):
    posterior_rng, loss_rng = jax.random.split(rng)
    return consistency_loss(student_params, target_params, frozen_arrays, prepare(frozen_arrays, batch, posterior_rng),
                            loss_rng, **kwargs)

  data_sharding = batch_sharding(mesh)
  train_step = make_train_step(loss_fn, build_optimizer(config), ema_decay, mesh=mesh,
                               state_shardings=state_shardings,
                               frozen_shardings=jax.tree.map(lambda x: x.sharding, frozen.arrays),
                               batch_shardings=data_sharding, grad_accum_steps=config.grad_accum_steps,
                               gather_params=config.mesh.gather_params,
                               kernel_dtype=jnp.dtype(config.precision.compute_dtype),
                               loss_takes_step=loss_takes_step)
  keys = device_keys(latents_format)
  return train_step, lambda b: make_global_batch({k: b[k] for k in keys}, data_sharding)


def compile_step(plan: RunPlan, student: Student, frozen: FrozenModels, state: TrainState, state_shardings,
                 host_batch: dict) -> tuple[Callable, Callable[[dict], dict]]:
  """(compiled step, host batch -> device batch), compiled on the shapes of the first batch
  after checking them against the models."""
  config, sources = plan.config, plan.sources
  unet_config = UNetConfig.from_dict(sources.student_unet_config)
  check_first_batch(host_batch, latents_format=plan.latents_format, local_batch=local_batch_size(config.batch_size),
                    resolution=config.resolution,
                    latent_hw=config.resolution // downsampling_factor(sources.vae_config),
                    latent_channels=int(unet_config.in_channels), context_dim=int(unet_config.cross_attention_dim))
  make = functools.partial(make_step, config, plan.schedule, plan.mesh, student, frozen, state_shardings,
                           plan.latents_format)
  if config.mode == "guided_distill":
    gd_config = guided_distill_config(config, int(student.module.config.time_cond_proj_dim))
    staged = StagedStep(make, gd_config, state, frozen.arrays, host_batch, plan.log)
    return staged, staged.to_device
  train_step, to_device = make()
  return compile_logged(train_step, state, frozen.arrays, to_device(host_batch), plan.log), to_device


def compile_logged(train_step, state: TrainState, frozen_arrays, device_batch, log,
                   what: str = "the train step") -> Callable:
  """`train_step` compiled ahead of time on these arguments' shapes, its time logged."""
  log(f"compiling {what} ...")
  start = time.perf_counter()
  compiled = train_step.lower(state, frozen_arrays, device_batch).compile()
  log(f"compiled in {time.perf_counter() - start:.1f}s")
  return compiled


class StagedStep:
  """Guided-Distill's step as one compiled function per stage, chosen on the host by the step
  count (stage 1, then the progressive rounds): a stage chosen inside the compiled step (a
  `lax.cond`) ran ~10x slower on CPU. The stage of the first step is compiled at once, the
  other on its first call. Called as the compiled step: (state, frozen, batch) -> (state, metrics)."""

  def __init__(self, make: Callable, gd_config, state: TrainState, frozen_arrays, host_batch: dict, log):
    self.make, self.gd_config, self.log = make, gd_config, log
    self.next_step = int(jax.device_get(state.step))
    self.compiled: dict[int, Callable] = {}
    self.to_device = None  # host batch -> device batch (the same for both stages)
    stage = guided_distill.stage_of(self.next_step, gd_config)
    self._compile(stage, state, frozen_arrays, host_batch)

  def _compile(self, stage: int, state, frozen_arrays, batch: dict, on_device: bool = False) -> Callable:
    train_step, self.to_device = self.make(gd_stage=stage)
    self.compiled[stage] = compile_logged(train_step, state, frozen_arrays,
                                          batch if on_device else self.to_device(batch), self.log,
                                          f"the train step (Guided-Distill stage {stage})")
    return self.compiled[stage]

  def __call__(self, state: TrainState, frozen_arrays, batch) -> tuple[TrainState, dict]:
    stage = guided_distill.stage_of(self.next_step, self.gd_config)
    step_fn = self.compiled.get(stage) or self._compile(stage, state, frozen_arrays, batch, on_device=True)
    self.next_step += 1
    return step_fn(state, frozen_arrays, batch)


def make_loop(plan: RunPlan, cleanup: contextlib.ExitStack, frozen: FrozenModels, tokenizer, step_fn, to_device,
              data_iter, data_state, manager, step: int, skipped_before: int = 0) -> Loop:
  """The loop with its writers (TensorBoard, sample grids, progress bar), closed by `cleanup`."""
  config = plan.config
  writer = MetricWriter(plan.workdir, enabled=plan.is_main)
  cleanup.callback(writer.close)
  write_samples = None
  if config.sample_every:
    write_samples = SampleWriter(config, plan.workdir, frozen, tokenizer, plan.sources.student_unet_config,
                                 plan.sources.vae_config, lcm_scheduler_of(plan), writer, plan.is_main, plan.log)
  progress = cleanup.enter_context(tqdm(total=config.num_train_steps, initial=step, disable=not plan.is_main,
                                        unit="step", dynamic_ncols=True, desc=config.mode))
  skip_log = SkipLog(skip_log_path(plan.workdir, jax.process_index()), skipped_before, plan.log)
  return Loop(config=config, config_json=plan.config_json, step_fn=step_fn, frozen_arrays=frozen.arrays,
              to_device=to_device, data_iter=data_iter, data_state=data_state, manager=manager,
              metric_writer=writer, write_samples=write_samples, progress=progress, log=plan.log,
              skip_log=skip_log)


def restored_skip_count(data_state) -> int:
  """The records this process skipped before the data position training starts from (0 for a
  fresh run, or for data that does not count them); read before the first batch."""
  try:
    return int(data_state.get_state()["iterator"]["num_skipped"])
  except (AttributeError, KeyError, TypeError):
    return 0
