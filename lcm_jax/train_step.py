"""Train state and the jitted, sharded distillation step, generic over the loss.

One UNet definition serves three parameter trees: the frozen teacher (inside `frozen`),
the student `params` (trained; fp32 master weights) and the EMA target `target_params`
(theta-). A step follows diffusers' `train_lcm_distill_sd_wds.py`:

  loss, grads = value_and_grad(loss_fn)(student)       # target, frozen: no gradient
  updates = AdamW(clip_by_global_norm(grads))          # clipping inside the optimiser
  student <- student + updates
  target  <- decay * target + (1 - decay) * student    # from the *updated* student

The loss plugs in as `loss_fn(student_params, target_params, frozen, batch, rng) ->
(loss, aux_metrics)`, so LCD, LCF and test losses share this machinery.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from lcm_jax.errors import LcmJaxError
from lcm_jax.sharding import batch_sharding, replicated

LossFn = Callable[[Any, Any, Any, Any, jax.Array], tuple[jax.Array, Mapping[str, jax.Array]]]

SCHEDULES = ("constant", "warmup_constant", "warmup_cosine")


@flax.struct.dataclass
class TrainState:
  """Everything a step changes; a pytree, so it can be jitted, sharded and checkpointed.

  Attributes:
    step: [] int32, optimiser steps taken so far.
    params: the student's parameters (fp32 master weights).
    target_params: the EMA target theta-, same tree as `params` (fp32 or bf16).
    opt_state: the optimiser's state (Adam moments shaped like `params`, step counts, lr).
    rng: base PRNG key; step n uses `jax.random.fold_in(rng, n)`, so a resumed run draws
      the same noise as an uninterrupted one.
  """
  step: jax.Array
  params: Any
  target_params: Any
  opt_state: optax.OptState
  rng: jax.Array


# ---------------------------------------------------------------------------------------
# Optimiser.

def make_lr_schedule(learning_rate: float, schedule: str = "constant", warmup_steps: int = 0,
                     total_steps: int | None = None) -> optax.Schedule:
  """Step -> learning rate, matching diffusers' `get_scheduler` of the same kind.

  * "constant": `learning_rate` throughout (warmup_steps must be 0).
  * "warmup_constant": linear from 0 over `warmup_steps`, then constant
    (diffusers "constant_with_warmup").
  * "warmup_cosine": linear warm-up, then half a cosine to 0 at `total_steps`
    (diffusers "cosine"; `total_steps` counts the warm-up).
  """
  if schedule not in SCHEDULES:
    raise LcmJaxError(f"unknown learning-rate schedule {schedule!r}; choose one of {SCHEDULES}")
  if warmup_steps < 0:
    raise LcmJaxError(f"warmup_steps must be >= 0, got {warmup_steps}")
  if schedule == "constant":
    if warmup_steps:
      raise LcmJaxError("the 'constant' schedule has no warm-up; use 'warmup_constant'")
    return optax.constant_schedule(learning_rate)
  if schedule == "warmup_constant":
    if warmup_steps == 0:
      # optax's linear schedule over 0 steps would stay at its initial value, 0.
      return optax.constant_schedule(learning_rate)
    return optax.warmup_constant_schedule(0.0, learning_rate, warmup_steps)
  if total_steps is None or total_steps <= warmup_steps:
    raise LcmJaxError(f"the 'warmup_cosine' schedule needs total_steps > warmup_steps "
                      f"({warmup_steps}), got {total_steps}")
  return optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup_steps, total_steps,
                                            end_value=0.0)


def make_optimizer(learning_rate: float, warmup_steps: int = 0, schedule: str = "constant",
                   total_steps: int | None = None, b1: float = 0.9, b2: float = 0.999,
                   eps: float = 1e-8, weight_decay: float = 1e-2,
                   max_grad_norm: float | None = 1.0) -> optax.GradientTransformation:
  """AdamW (decoupled weight decay on every parameter, as torch.optim.AdamW) after clipping
  the global gradient norm to `max_grad_norm` (None or 0: no clipping).

  The learning rate is injected into the optimiser state, so `learning_rate_of(opt_state)`
  gives the rate the last update used and a restored state resumes its schedule.
  """
  lr_schedule = make_lr_schedule(learning_rate, schedule, warmup_steps, total_steps)

  def clipped_adamw(learning_rate):
    adamw = optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    if not max_grad_norm:
      return adamw
    return optax.chain(optax.clip_by_global_norm(max_grad_norm), adamw)

  return optax.inject_hyperparams(clipped_adamw)(learning_rate=lr_schedule)


def learning_rate_of(opt_state: optax.OptState) -> jax.Array | None:
  """[] float32, the rate of the last update of a `make_optimizer` state; None if the
  optimiser does not record one."""
  hyperparams = getattr(opt_state, "hyperparams", None)
  if isinstance(hyperparams, Mapping):
    return hyperparams.get("learning_rate")
  return None


# ---------------------------------------------------------------------------------------
# State.

def create_train_state(student_params: Any, optimizer: optax.GradientTransformation,
                       rng: jax.Array, target_params: Any = None,
                       target_dtype: Any = None) -> TrainState:
  """A fresh state at step 0; the EMA target starts as a copy of the student.

  Every leaf is a copy, so the caller's trees survive the step's donation of the state.

  Pure, so it can run under `jax.jit(..., out_shardings=train_state_shardings(...))` to
  build each leaf straight into its sharding.

  Args:
    student_params: the student's initial (fp32) parameters.
    optimizer: e.g. from `make_optimizer`; its state is initialised from `student_params`.
    rng: a PRNG key (`jax.random.PRNGKey(seed)`).
    target_params: initial target, if not the student (e.g. a teacher that the student
      does not copy exactly).
    target_dtype: cast the target to this (e.g. bf16 to halve its memory). Note that with
      decay 0.999943 a bf16 target barely moves: each update is 5.7e-5 of the student-target
      gap, well below bf16's 2^-8 relative resolution.
  """
  def copy(p, dtype=None):
    return jnp.array(p, dtype=jnp.result_type(p) if dtype is None else dtype, copy=True)

  # The state owns fresh buffers: each step donates them, so none may be shared with the
  # caller's trees (e.g. the teacher the student was initialised from, or the key).
  params = jax.tree.map(copy, student_params)
  source = student_params if target_params is None else target_params
  target = jax.tree.map(lambda p: copy(p, target_dtype), source)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, target_params=target,
                    opt_state=optimizer.init(params), rng=jax.random.clone(rng))


def ema_update(target: Any, params: Any, decay: float | jax.Array) -> Any:
  """theta- <- decay * theta- + (1 - decay) * theta, leafwise, in the target's dtype."""
  updated = optax.incremental_update(params, target, step_size=1.0 - decay)
  return jax.tree.map(lambda new, old: new.astype(old.dtype), updated, target)


def train_state_shardings(optimizer: optax.GradientTransformation, abstract_params: Any,
                          param_shardings: Any, mesh: Mesh,
                          target_shardings: Any = None) -> TrainState:
  """A `TrainState` of shardings for `jax.jit` in/out_shardings.

  The Adam moments (and any other parameter-shaped optimiser state) follow their parameter's
  sharding; counters, the learning rate, the step and the key are replicated.

  Args:
    optimizer: the optimiser whose state is laid out.
    abstract_params: the student tree of arrays or `jax.ShapeDtypeStruct`s.
    param_shardings: tree like `abstract_params` of `NamedSharding` (`param_shardings()`).
    mesh: the device mesh.
    target_shardings: the target's shardings; default the student's.
  """
  rep = replicated(mesh)
  abstract_opt_state = jax.eval_shape(optimizer.init, abstract_params)
  opt_shardings = optax.tree_utils.tree_map_params(
      optimizer, lambda _, sharding: sharding, abstract_opt_state, param_shardings,
      transform_non_params=lambda _: rep,
      is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
  return TrainState(step=rep, params=param_shardings,
                    target_params=param_shardings if target_shardings is None else target_shardings,
                    opt_state=opt_shardings, rng=rep)


# ---------------------------------------------------------------------------------------
# Step.

def accumulated_value_and_grad(loss_fn: LossFn, params: Any, target: Any, frozen: Any, batch: Any,
                               rng: jax.Array, num_microbatches: int = 1) -> tuple[tuple[jax.Array, dict], Any]:
  """((loss, aux), grads) of `loss_fn` w.r.t. `params`, over `num_microbatches` equal slices
  of `batch` (every leaf split on its leading dim) scanned one after another.

  The result is the mean over microbatches of each one's loss, metrics and gradient (fp32
  accumulators); with equal microbatches of a per-example mean loss that equals the whole
  batch's gradient. Microbatch i holds examples i, i + M, i + 2M, ... Microbatch i draws its randomness from fold_in(rng, i); one microbatch
  uses `rng` itself, so M = 1 is exactly the plain step.
  """
  def value_and_grad(micro, key):
    def objective(p):
      loss, aux = loss_fn(p, target, frozen, micro, key)
      return jnp.asarray(loss, jnp.float32), dict(aux or {})
    return jax.value_and_grad(objective, has_aux=True)(params)

  if num_microbatches == 1:
    return value_and_grad(batch, rng)
  sizes = {x.shape[0] for x in jax.tree.leaves(batch)}
  if len(sizes) != 1 or next(iter(sizes)) % num_microbatches:
    raise LcmJaxError(f"the batch's leading sizes {sorted(sizes)} do not split into {num_microbatches} "
                      "equal microbatches (grad_accum_steps)")
  # Strided microbatches (i takes examples i, i + M, ...): each device's contiguous share of
  # the batch then feeds every microbatch equally, so no microbatch waits on a few devices
  # and nothing moves between devices.
  micro_batches = jax.tree.map(lambda x: x.reshape(-1, num_microbatches, *x.shape[1:]).swapaxes(0, 1), batch)
  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)

  def body(carry, xs):
    i, micro = xs
    (loss, aux), grads = value_and_grad(micro, jax.random.fold_in(rng, i))
    total_grads, total_loss, total_aux = carry
    total_grads = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), total_grads, grads)
    total_aux = jax.tree.map(lambda a, v: a + jnp.asarray(v, jnp.float32), total_aux, aux)
    return (total_grads, total_loss + loss, total_aux), None

  aux_shapes = jax.eval_shape(lambda: value_and_grad(jax.tree.map(lambda x: x[0], micro_batches), rng)[0][1])
  zero_aux = jax.tree.map(lambda a: jnp.zeros((), jnp.float32), aux_shapes)
  (grads, loss, aux), _ = jax.lax.scan(body, (zeros, jnp.zeros((), jnp.float32), zero_aux),
                                       (jnp.arange(num_microbatches, dtype=jnp.uint32), micro_batches))
  mean = lambda x: x / num_microbatches
  grads = jax.tree.map(lambda g, p: mean(g).astype(p.dtype), grads, params)
  return (mean(loss), jax.tree.map(mean, aux)), grads


def compute_view(tree: Any, mesh: Mesh, kernel_dtype: Any = None) -> Any:
  """Parameters as every device computes with them under FSDP: whole (constrained to be
  replicated, so XLA all-gathers the fsdp-sharded ones where they are used), with matmul and
  conv kernels first cast to `kernel_dtype` (what flax's Dense and Conv do at use anyway, so
  the result is unchanged, and the all-gather moves half the bytes of float32).

  Without this, XLA's sharding propagation may instead follow the kernels' output-channel
  split into the activations and reshard those, which costs far more memory than the weights.
  Gradients flow back through it as reduce-scatters onto the sharded parameters.
  """
  def leaf(path, x):
    name = getattr(path[-1], "key", None) if path else None
    if kernel_dtype is not None and name == "kernel" and jnp.issubdtype(x.dtype, jnp.floating):
      return x.astype(kernel_dtype)
    return x
  tree = jax.tree_util.tree_map_with_path(leaf, tree)
  return jax.lax.with_sharding_constraint(tree, replicated(mesh))


def _step_metrics(loss, grad_norm, opt_state, aux: dict) -> dict:
  """The step's metrics: loss, grad_norm, lr (when the optimiser records it) and the loss's aux."""
  metrics = {"loss": loss, "grad_norm": grad_norm}
  lr = learning_rate_of(opt_state)
  if lr is not None:
    metrics["lr"] = jnp.asarray(lr, jnp.float32)
  clashes = sorted(set(aux) & set(metrics))
  if clashes:
    raise LcmJaxError(f"the loss's aux metrics {clashes} clash with the step's own metrics")
  metrics.update({k: jnp.asarray(v, jnp.float32) for k, v in aux.items()})
  return metrics


def _on_mesh(loss_fn: LossFn, mesh: Mesh | None, gather_params: bool, kernel_dtype: Any) -> LossFn:
  """The loss as the step traces it: under the mesh as the abstract mesh (kernels XLA cannot
  partition, such as Pallas attention, shard_map themselves over it) and, with gather_params
  on an fsdp axis, on the `compute_view` of the parameters."""
  if mesh is None:
    return loss_fn
  gather = gather_params and mesh.shape.get("fsdp", 1) > 1

  def step_loss(params, target, frozen, batch, rng, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      if gather:
        # The frozen models are stored in their compute dtype already; only the student and
        # its target (float32 master weights) are cast.
        params, target = compute_view(params, mesh, kernel_dtype), compute_view(target, mesh, kernel_dtype)
        frozen = compute_view(frozen, mesh)
      return loss_fn(params, target, frozen, batch, rng, **kwargs)
  return step_loss


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation,
                    ema_decay: float | Callable[[jax.Array], jax.Array], *, mesh: Mesh | None = None,
                    state_shardings: TrainState | None = None, frozen_shardings: Any = None,
                    batch_shardings: Any = None, donate: bool = True, grad_accum_steps: int = 1,
                    gather_params: bool = True, kernel_dtype: Any = None, loss_takes_step: bool = False):
  """The jitted `step(state, frozen, batch) -> (new_state, metrics)`.

  Args:
    loss_fn: `(student_params, target_params, frozen, batch, rng) -> (loss [], aux)`, aux a
      dict of scalar metrics. Differentiated w.r.t. the student only.
    optimizer: e.g. `make_optimizer(...)` (gradient clipping belongs inside it).
    ema_decay: mu in theta- <- mu theta- + (1 - mu) theta (paper 0.999943, diffusers 0.95), or a
      function of the step count after the update -> mu (Guided-Distill freezes the target
      with 1 and copies the student with 0; lcm_jax.guided_distill.target_decay).
    loss_takes_step: call `loss_fn(..., rng, step=state.step)` (the steps taken before this one).
    mesh: with a mesh the step is compiled with explicit shardings: `state_shardings`
      (default replicated), `frozen_shardings` (default replicated) and `batch_shardings`
      (default: every batch leaf split on its leading dim over ("data", "fsdp")). Inputs
      must already carry these shardings (`jax.device_put` or a jitted initialiser).
    donate: donate the input state's buffers to the new state (the old one is unusable).
    gather_params: on a mesh with an "fsdp" axis of more than one device, give the loss the
      `compute_view` of the student, target and frozen parameters (whole) instead of their
      fsdp shards.
    kernel_dtype: the student's compute dtype: its and the target's kernels are gathered in it
      (None: as stored).
    grad_accum_steps: M > 1 splits the batch into M equal microbatches along its leading
      dim, runs them one after another (`lax.scan`, so activations are those of one
      microbatch) and averages their gradients in float32 before one optimiser step; the
      loss and metrics are microbatch means. Microbatch i draws from `fold_in(step key, i)`;
      M = 1 draws from the step key itself.

  Returns:
    The `jax.jit`-wrapped step (it has `.lower(...)` for ahead-of-time compilation).
    metrics: {"loss", "grad_norm" (before clipping), "lr" (when the optimiser records it),
    **aux}, float32 scalars.
  """

  step_loss = _on_mesh(loss_fn, mesh, gather_params, kernel_dtype)

  def train_step(state: TrainState, frozen: Any, batch: Any) -> tuple[TrainState, dict]:
    rng = jax.random.fold_in(state.rng, state.step)
    # Only the student is differentiated; stop_gradient also keeps any custom VJP inside
    # the loss from reaching into the target or the teacher.
    target = jax.lax.stop_gradient(state.target_params)
    frozen = jax.lax.stop_gradient(frozen)

    objective = functools.partial(step_loss, step=state.step) if loss_takes_step else step_loss
    (loss, aux), grads = accumulated_value_and_grad(objective, state.params, target, frozen, batch, rng,
                                                    grad_accum_steps)
    grad_norm = optax.tree.norm(jax.tree.map(lambda g: g.astype(jnp.float32), grads))
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # After the optimiser step, from the updated student (diffusers' order).
    decay = ema_decay(state.step + 1) if callable(ema_decay) else ema_decay
    target_params = ema_update(state.target_params, params, decay)

    metrics = _step_metrics(loss, grad_norm, opt_state, aux)
    new_state = state.replace(step=state.step + 1, params=params, target_params=target_params,
                              opt_state=opt_state)
    return new_state, metrics

  if not isinstance(grad_accum_steps, int) or grad_accum_steps < 1:
    raise LcmJaxError(f"grad_accum_steps must be a positive integer, got {grad_accum_steps!r}")
  donate_argnums = (0,) if donate else ()
  if mesh is None:
    if any(s is not None for s in (state_shardings, frozen_shardings, batch_shardings)):
      raise LcmJaxError("shardings were given without a mesh; pass mesh= as well")
    return jax.jit(train_step, donate_argnums=donate_argnums)
  rep = replicated(mesh)
  state_shardings = rep if state_shardings is None else state_shardings
  frozen_shardings = rep if frozen_shardings is None else frozen_shardings
  batch_shardings = batch_sharding(mesh) if batch_shardings is None else batch_shardings
  return jax.jit(train_step, donate_argnums=donate_argnums,
                 in_shardings=(state_shardings, frozen_shardings, batch_shardings),
                 out_shardings=(state_shardings, rep))
