"""The trained side of a run: the student UNet, its optimiser, and the train state (fresh or restored)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from lcm_jax import checkpoint, lora
from lcm_jax import workdir as workdir_lib
from lcm_jax.losses import student_params_from_teacher
from lcm_jax.sd_pipeline import abstract_params, build_module
from lcm_jax.sharding import param_shardings
from lcm_jax.train_step import (
  TrainState,
  create_train_state,
  make_optimizer,
  train_state_shardings,
)
from lcm_jax.training.frozen import FrozenModels, load_sharded
from lcm_jax.training.sources import Sources


@dataclasses.dataclass
class Student:
  """The student UNet: module (compute dtype, fp32 master weights), abstract parameters and
  their shardings on the mesh.

  A LoRA student (config.student = "lora") is the teacher's UNet plus an adapter: `abstract`
  and `shardings` are the adapter's (`lcm_jax.lora.abstract_lora`), the only trained
  parameters (and the only ones in the optimiser state, the target and the checkpoints);
  the base is the frozen teacher's parameters; `lora_scale` is alpha / rank (None for a
  full student).
  """
  module: Any
  abstract: Any
  shardings: Any
  lora_scale: float | None = None


def build_student(config: ml_collections.ConfigDict, sources: Sources, mesh: jax.sharding.Mesh) -> Student:
  module = build_module("unet", sources.student_unet_config, dtype=jnp.dtype(config.precision.compute_dtype),
                        param_dtype=jnp.float32, remat=config.remat,
                        attention=config.attention)
  abstract, scale = abstract_params(module), None
  if config.get("student") == "lora":
    abstract = lora.abstract_lora(abstract, int(config.lora.rank), tuple(config.lora.targets))
    scale = lora.lora_scale(int(config.lora.rank), float(config.lora.alpha))
  return Student(module=module, abstract=abstract,
                 shardings=param_shardings(abstract, mesh, rules=tuple(config.mesh.rules)), lora_scale=scale)


def build_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """AdamW after global-norm clipping, with config.optimizer's learning-rate schedule."""
  o = config.optimizer
  return make_optimizer(o.lr, warmup_steps=o.warmup_steps, schedule=o.schedule, total_steps=config.num_train_steps,
                        b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                        max_grad_norm=o.max_grad_norm or None)


def state_initializer(config: ml_collections.ConfigDict,
                      optimizer: optax.GradientTransformation) -> Callable[[Any, jax.Array], TrainState]:
  target_dtype = jnp.dtype(config.precision.target_dtype)
  return lambda params, rng: create_train_state(params, optimizer, rng, target_dtype=target_dtype)


def restore_state(manager, config: ml_collections.ConfigDict, student: Student, optimizer, state_shardings,
                  data_state, *, warn, set_aside) -> tuple[TrainState, int]:
  """(state, step) of the newest restorable checkpoint, read straight into its shardings
  (damaged newer ones are reported and handed to `set_aside`)."""
  abstract = jax.eval_shape(state_initializer(config, optimizer), student.abstract, jax.random.PRNGKey(config.seed))
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_shardings)
  state, _, step = checkpoint.restore_newest(manager, abstract, data_state, warn=warn, set_aside=set_aside)
  return state, step


def fresh_state(config: ml_collections.ConfigDict, sources: Sources, student: Student, frozen: FrozenModels,
                optimizer, state_shardings, mesh: jax.sharding.Mesh) -> TrainState:
  """A new train state: the student starts from `config.init_from` (a workdir or an LCM
  folder) or as a copy of the teacher with the new guidance input (`loss.cond_proj_init`);
  a LoRA student as a fresh adapter (`lcm_jax.lora.init_lora`)."""
  rng = jax.random.PRNGKey(config.seed)
  if student.lora_scale is not None:  # PEFT's init (B = 0): the student starts as the teacher
    init_params = lora.init_lora(jax.random.fold_in(rng, 1), frozen.arrays["teacher"], int(config.lora.rank),
                                 tuple(config.lora.targets))
  elif sources.init_workdir:
    _, init_params = workdir_lib.load_unet(sources.init_workdir, config.init_params,
                                           sharding=lambda abstract: student.shardings)
  elif sources.init_folder:
    _, init_params = load_sharded(os.path.join(sources.init_folder, "unet"), "unet", mesh,
                                  dtype=jnp.dtype(config.precision.compute_dtype), param_dtype=jnp.float32,
                                  config=sources.student_unet_config, rules=tuple(config.mesh.rules))
  else:
    init_params = student_params_from_teacher(frozen.teacher_fp32, student.abstract, jax.random.fold_in(rng, 1),
                                              init=config.loss.cond_proj_init)
  return jax.jit(state_initializer(config, optimizer), out_shardings=state_shardings)(init_params, rng)


def init_or_restore(config, sources: Sources, student: Student, frozen: FrozenModels, mesh, manager,
                    data_state, workdir: str, resume_step: int | None, log) -> tuple[TrainState, Any]:
  """(state, state shardings): restored from the workdir's newest restorable checkpoint when
  it has one (`resume_step`), else fresh."""
  optimizer = build_optimizer(config)
  shardings = train_state_shardings(optimizer, student.abstract, student.shardings, mesh)
  if resume_step is None:
    return fresh_state(config, sources, student, frozen, optimizer, shardings, mesh), shardings

  def set_aside(step: int) -> None:
    if jax.process_index() == 0:
      log(f"moved it to {workdir_lib.set_aside_checkpoint(workdir, step)}")

  state, step = restore_state(manager, config, student, optimizer, shardings, data_state,
                              warn=lambda m: print(m, flush=True) if jax.process_index() == 0 else None,
                              set_aside=set_aside)
  if step != resume_step:
    checkpoint.sync_processes("set_aside_damaged_checkpoints")
    manager.reload()  # it listed the steps set aside
  log(f"resumed {workdir} at step {step}")
  return state, shardings
