r"""Per-chip memory and FLOPs of the real training step, compiled for a TPU topology (or N CPU
devices) without the hardware and without weights.

    python -m lcm_jax.bench.memory_plan --config=configs/sd21_768.py --topology=v5e:2x4
    python -m lcm_jax.bench.memory_plan --config=configs/sd21_base_512.py --topology=v4:2x2x1 \
        --config.mesh.fsdp=4 --config.grad_accum_steps=2
    python -m lcm_jax.bench.memory_plan --config=configs/tiny.py --topology=cpu:8 \
        --config.teacher=path/to/tiny-pipeline --config.data.path=unused

It builds the run exactly as `python -m lcm_jax.train` would (the same `lcm_jax.training`
functions: sources, student, frozen models, train state and its shardings from the config's
rule table, the jitted step with batch preparation and the consistency loss), but with
`jax.ShapeDtypeStruct`s in place of weights, and compiles the step for the named topology:

* `--topology=v5e:2x4` (or v4:2x2x1, v5p:2x2x1, v6e:2x4, ...): the TPU compiler itself
  (libtpu, `pip install 'lcm-jax[plan]'`) compiles for TPU devices that need not exist
  (`jax.experimental.topologies`); its `memory_analysis()` and `cost_analysis()` are the numbers.
* `--topology=cpu:N`: N forced host devices (XLA_FLAGS), compiled by the CPU backend.

The teacher may be a local diffusers folder or a hub id of `lcm_jax.bench.architectures`
(configs only: nothing is downloaded). Prints per chip: arguments (parameters, optimiser
state, EMA target, frozen models, batch), outputs, temporaries and their total against the
chip's HBM; FLOPs per step; and the roofline step time and samples/s at the chip's peak bf16
FLOP/s. `--sampling` adds the 4-step LCM sampling function at batch 1 and 8 on one chip.
`--output plan.json` writes everything.

**The step in parts** (`--part=frozen|student|update|all`; default `--part=step`, the whole
step). A whole SD 2.1 step can take the TPU compiler hours and most of a small machine's
memory, so the step can be compiled in three parts, each with the real step's shardings and
the trainer's own code (`part_steps`):

* `frozen`: the no-gradient half of the loss: batch preparation, the draws, the guided
  teacher's solver step (LCD) and the EMA target's forward, per microbatch; its outputs are
  the tensors the student's loss needs (z_{t_{n+k}}, t_{n+k}, the context, the guidance
  embedding, the target f_theta-(z_{t_n})).
* `student`: the student's forward and backward on those tensors (the config's microbatches,
  remat and attention): the loss and the float32 grads in the parameters' shardings.
* `update`: `lcm_jax.train_step.make_train_step` itself on the grads: clipping, AdamW, the
  EMA update and the metrics, the state donated.

Per chip, the *persistent* bytes P are the train state (student, Adam moments, EMA target) and
the frozen models (teacher, ...), as laid out by the compiler; each part's *transient* bytes T_p
are its arguments beyond P (batch, carried tensors, grads) + its outputs that alias no input +
its temporaries. The combined estimate is

    peak ~= P + max_p T_p      (P counted once; FLOPs: the sum of the parts)

which is exactly the peak of running the three parts one after another. The fused step does
the same arithmetic on the same buffers, so it needs as much, unless XLA's scheduler keeps
one part's buffers alive while it runs another (e.g. prefetches the student's gathered
weights during the teacher's forward): that overlap is not bounded here. `--combine=a.json,
b.json,c.json` adds up parts compiled by separate runs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import tempfile
import time
from typing import Any

GIB = 2 ** 30
# HBM per chip a program may use and peak dense bf16 FLOP/s per chip. v4 and v5e: what the TPU
# compiler reports as available in its out-of-memory errors (32 and 16 GiB published, less
# what the runtime reserves); v5p and v6e: the published figures.
CHIPS = {"v4": (30.75 * GIB, 275e12), "v5e": (15.75 * GIB, 197e12), "v5litepod": (15.75 * GIB, 197e12),
         "v5p": (95 * GIB, 459e12), "v6e": (32 * GIB, 918e12)}
MEGACORE = ("v4", "v5p")


def force_cpu_devices(argv: list[str]) -> None:
  """`--topology=cpu:N` needs N host devices, and `--buffer_assignment_dir` the compiler's dumps,
  both of which XLA reads from XLA_FLAGS at JAX's import."""
  dump = next((a.split("=", 1)[1] for a in argv if a.startswith("--buffer_assignment_dir=")), "")
  if dump:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={dump}").strip()
  topology = next((a.split("=", 1)[1] for a in argv if a.startswith("--topology=")), "")
  if topology.startswith("cpu:"):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={topology.split(':')[1]}").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def topology_devices(topology: str) -> tuple[list, str]:
  """(devices, chip kind) for "cpu:N" or a TPU topology name such as "v5e:2x4"."""
  import jax
  from lcm_jax.errors import LcmJaxError
  if topology.startswith("cpu:"):
    n = int(topology.split(":")[1])
    devices = jax.devices("cpu")
    if len(devices) < n:
      raise LcmJaxError(f"--topology={topology}: only {len(devices)} CPU devices (XLA_FLAGS is read at import)")
    return devices[:n], "cpu"
  from lcm_jax.models import attention
  # Attention backends and block sizes are chosen for the target, not for this CPU host.
  attention.set_target_platform("tpu")
  try:
    from jax.experimental import topologies
    # v4 and v5p chips run as one device of two TensorCores (megacore), as a real slice
    # presents them; without this the description has a device per TensorCore.
    options = {"chip_config_name": "megacore"} if topology.split(":")[0] in MEGACORE else {}
    desc = topologies.get_topology_desc(topology_name=topology, platform="tpu", **options)
  except Exception as e:  # noqa: BLE001  libtpu missing, or an unknown topology name
    raise LcmJaxError(f"cannot describe TPU topology {topology!r} ({type(e).__name__}: {str(e).splitlines()[0]}); "
                      "install libtpu with `pip install 'lcm-jax[plan]'` and use names such as v5e:2x4, "
                      "v4:2x2x1, v5p:2x2x1") from None
  return list(desc.devices), topology.split(":")[0]


def write_config_folder(folder: str, configs: dict) -> str:
  """A diffusers pipeline folder holding only configs (no weights): what the trainer's source
  resolution reads before it loads anything."""
  from lcm_jax.tokenizer import write_word_tokenizer
  index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
           "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
           "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDIMScheduler"]}
  files = {"model_index.json": index, "unet/config.json": configs["unet"], "vae/config.json": configs["vae"],
           "text_encoder/config.json": configs["text_encoder"],
           "scheduler/scheduler_config.json": configs["scheduler"]}
  for name, content in files.items():
    os.makedirs(os.path.dirname(os.path.join(folder, name)), exist_ok=True)
    with open(os.path.join(folder, name), "w") as f:
      json.dump(content, f)
  write_word_tokenizer(os.path.join(folder, "tokenizer"), ["a"], configs["text_encoder"]["max_position_embeddings"])
  return folder


def resolve_teacher(config, scratch: str) -> None:
  """Points config.teacher at a config-only folder when it names a known hub architecture."""
  from lcm_jax.bench.architectures import KNOWN_PIPELINES
  from lcm_jax.errors import LcmJaxError
  if config.teacher and not os.path.isdir(os.path.expanduser(config.teacher)):
    if config.teacher not in KNOWN_PIPELINES:
      raise LcmJaxError(f"config.teacher={config.teacher!r} is neither a local folder nor one of the known "
                        f"architectures ({', '.join(KNOWN_PIPELINES)})")
    with config.unlocked():
      config.teacher = write_config_folder(os.path.join(scratch, "teacher"), KNOWN_PIPELINES[config.teacher])


@dataclasses.dataclass
class Compiled:
  """What the compiler says of one executable, per chip. When the TPU compiler refuses it for
  lack of memory, only its temporaries (from the error) are known and `error` holds the message."""
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  flops: float
  compile_seconds: float
  error: str | None = None
  source: str = "memory_analysis"  # or "buffer_assignment" (BufferAssignmentWatch)

  @property
  def total_bytes(self) -> int:
    # Donated inputs alias outputs: counted once.
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

  @classmethod
  def of(cls, lowered, flops: float | None = None, dump_dir: str | None = None, module: str = "") -> "Compiled":
    """Compiles `lowered`; `flops` (per chip) replaces the compiler's count when given. With
    `dump_dir` (the process's --xla_dump_to) the numbers are read from the buffer assignment of
    the HLO module `module` (jit_<function name>) as soon as the compiler writes it, before code
    generation ends (see BufferAssignmentWatch)."""
    start = time.perf_counter()
    try:
      if dump_dir:
        found = BufferAssignmentWatch(dump_dir, module).compile(lowered)
        if isinstance(found, dict):
          return cls(**found, flops=flops or 0.0, compile_seconds=time.perf_counter() - start,
                     source="buffer_assignment")
        executable = found
      else:
        executable = lowered.compile()
    except Exception as e:  # noqa: BLE001  XLA's RESOURCE_EXHAUSTED comes as a runtime error
      message = " ".join(str(e).split())
      needed = re.search(r"HLO temporaries \(([\d.]+)G\)", message)
      if "RESOURCE_EXHAUSTED" not in message or not needed:
        raise
      return cls(0, 0, 0, int(float(needed.group(1)) * GIB), flops or 0.0, time.perf_counter() - start,
                 error=message[message.index("RESOURCE_EXHAUSTED"):][:300])
    seconds = time.perf_counter() - start
    memory = executable.memory_analysis()
    cost = executable.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return cls(argument_bytes=int(memory.argument_size_in_bytes), output_bytes=int(memory.output_size_in_bytes),
               alias_bytes=int(memory.alias_size_in_bytes), temp_bytes=int(memory.temp_size_in_bytes),
               flops=flops if flops is not None else float((cost or {}).get("flops", 0.0)),
               compile_seconds=seconds)


def parse_buffer_assignment(text: str) -> dict:
  """Per-device bytes of device memory (HBM: memory space 0) in an XLA buffer-assignment dump:
  entry parameters, outputs that alias no parameter (maybe-live-out), and the rest (constants
  and thread-local values included, as the TPU compiler's memory-usage report counts them) as
  temporaries. Allocations in other memory spaces (", color N": the TPU's VMEM, SMEM) are
  on-chip scratch, not HBM."""
  out = {"argument_bytes": 0, "output_bytes": 0, "alias_bytes": 0, "temp_bytes": 0}
  for size, flags in re.findall(r"^allocation \d+: size (\d+)([^\n]*)", text, flags=re.M):
    if re.search(r", color [1-9]", flags):
      continue
    key = ("argument_bytes" if ", parameter " in flags else
           "output_bytes" if ", maybe-live-out" in flags and ", thread-local" not in flags else "temp_bytes")
    out[key] += int(size)
  return out


class BufferAssignmentWatch:
  """Compiles in a thread and returns the memory numbers once the compiler has dumped the
  module's buffer assignment (`--xla_dump_to`), without waiting for code generation.

  The TPU compiler assigns buffers after its HLO passes (a minute for an SD 2.1 part here) and
  then spends most of its time (hours on a small host) generating each kernel's code. The
  numbers are the buffer assignment's HBM allocations (`parse_buffer_assignment`): what the
  compiler's own out-of-memory check reads (its memory-usage report sums the same
  allocations). They are the HLO-level plan: code generation can still move small buffers to
  on-chip memory or add scratch (on the tiny test UNet the finished compile's memory_analysis()
  differed by tens of MiB either way); at SD scale that is small against GiBs of activations.
  The process must exit after its report (`os._exit`): the compile thread cannot be stopped.
  """

  def __init__(self, dump_dir: str, module: str, poll_seconds: float = 5.0):
    self.dump_dir, self.module, self.poll_seconds = dump_dir, module, poll_seconds

  def find(self) -> str | None:
    import glob
    files = sorted(glob.glob(os.path.join(self.dump_dir, f"*.{self.module}.*buffer-assignment.txt")))
    return files[0] if files else None

  def compile(self, lowered):
    import threading
    done: list = []
    thread = threading.Thread(target=lambda: done.append(_try(lowered.compile)), daemon=True)
    thread.start()
    last_size = -1
    while True:
      thread.join(self.poll_seconds)
      if done:
        ok, value = done[0]
        if not ok:
          raise value
        return value
      path = self.find()
      if path:
        size = os.path.getsize(path)
        if size == last_size and size > 0:
          with open(path) as f:
            return parse_buffer_assignment(f.read())
        last_size = size


def _try(fn):
  try:
    return True, fn()
  except Exception as e:  # noqa: BLE001  re-raised in the caller's thread
    return False, e


@dataclasses.dataclass
class Run:
  """A run as the trainer builds it (`lcm_jax.training`), with `jax.ShapeDtypeStruct`s that
  carry their shardings in place of arrays: the state, the frozen models and the step's batch."""
  config: Any
  sources: Any
  mesh: Any
  schedule: Any
  student: Any
  frozen: Any
  optimizer: Any
  state_shardings: Any
  state: Any
  batch: dict
  latents_format: bool


def build_run(config, devices) -> Run:
  """The run's pieces for `devices`, from the config alone (the trainer's own code)."""
  import jax

  from lcm_jax.config import check_config
  from lcm_jax.schedule import schedule_from_config
  from lcm_jax.sd_pipeline import read_json
  from lcm_jax.sharding import batch_sharding, make_mesh
  from lcm_jax.train_step import train_state_shardings
  from lcm_jax.training.batches import device_keys
  from lcm_jax.training.frozen import abstract_frozen_models
  from lcm_jax.training.sources import check_batch_size, check_resolution, resolve_sources
  from lcm_jax.training.state import build_optimizer, build_student, state_initializer
  from lcm_jax.training.trainer import LATENTS_FORMAT

  check_config(config)
  sources = resolve_sources(config)
  check_resolution(config.resolution, sources.student_unet_config, sources.vae_config)
  mesh = make_mesh(config.mesh.data, config.mesh.fsdp, devices=devices)
  check_batch_size(config.batch_size, mesh, config.grad_accum_steps)
  latents_format = config.data.format == LATENTS_FORMAT
  text_length = int(read_json(os.path.join(sources.base, "text_encoder", "config.json"))
                    .get("max_position_embeddings", 77))
  student = build_student(config, sources, mesh)
  frozen = abstract_frozen_models(config, sources, mesh, latents_format=latents_format, context_length=text_length)
  optimizer = build_optimizer(config)
  shardings = train_state_shardings(optimizer, student.abstract, student.shardings, mesh)
  state = jax.eval_shape(state_initializer(config, optimizer), student.abstract, jax.random.PRNGKey(0))
  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, shardings)
  batch = abstract_batch(config, sources, student, latents_format, text_length, batch_sharding(mesh))
  batch = {k: batch[k] for k in device_keys(latents_format)}
  return Run(config=config, sources=sources, mesh=mesh, schedule=schedule_from_config(sources.scheduler_config),
             student=student, frozen=frozen, optimizer=optimizer, state_shardings=shardings, state=state,
             batch=batch, latents_format=latents_format)


def lower_train_step(config, devices):
  """The run's jitted step, lowered on abstract arguments for `devices` (the trainer's own code)."""
  from lcm_jax.training.trainer import make_step
  run = build_run(config, devices)
  step, _ = make_step(config, run.schedule, run.mesh, run.student, run.frozen, run.state_shardings,
                      run.latents_format)
  return step.lower(run.state, run.frozen.arrays, run.batch), run.mesh


def flat_config(config):
  """The config as FLOPs are counted: materialised attention, one microbatch, one device."""
  flat = config.copy_and_resolve_references()
  with flat.unlocked():
    flat.attention, flat.grad_accum_steps, flat.mesh.data, flat.mesh.fsdp = "xla", 1, 1, 1
  return flat


def step_flops(config, devices) -> float:
  """FLOPs per chip of one step, counted on the step's HLO before partitioning, with the
  attention materialised and one microbatch: the same arithmetic as the compiled step, in a
  form XLA's cost analysis counts whole (it counts a loop's body once, so the chunked
  attention's and the microbatch scans, and a Pallas kernel's custom call, would undercount).
  Recomputation (remat) is included; collectives are not. Lowered for one CPU device (the
  TPU client does not analyse unpartitioned HLO); the count does not depend on the devices."""
  import jax
  lowered, _ = lower_train_step(flat_config(config), jax.devices("cpu")[:1])
  cost = lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float((cost or {}).get("flops", 0.0)) / len(devices)


def abstract_batch(config, sources, student, latents_format: bool, text_length: int, sharding) -> dict:
  """The global batch the step takes, as `jax.ShapeDtypeStruct`s."""
  import jax
  import jax.numpy as jnp

  from lcm_jax.models.vae import downsampling_factor
  b, r = config.batch_size, config.resolution
  unet = student.module.config
  if latents_format:
    h = r // downsampling_factor(sources.vae_config)
    latents = jax.ShapeDtypeStruct((b, h, h, int(unet.in_channels)), jnp.float32, sharding=sharding)
    context = jax.ShapeDtypeStruct((b, text_length, int(unet.cross_attention_dim)), jnp.float32, sharding=sharding)
    return {"latent_mean": latents, "latent_logvar": latents, "context": context}
  return {"pixels": jax.ShapeDtypeStruct((b, r, r, 3), jnp.float32, sharding=sharding),
          "input_ids": jax.ShapeDtypeStruct((b, text_length), jnp.int32, sharding=sharding)}


def lower_sampling(config, device, batch: int, num_steps: int = 4):
  """The LCM sampling function of `lcm_jax.text_to_image` (the sampler loop and the VAE
  decode; the text encoder runs apart) for the run's student, lowered for one device."""
  import jax
  import numpy as np

  from lcm_jax.models.vae import downsampling_factor
  from lcm_jax.sd_pipeline import Pipeline, abstract_params, build_module, read_json
  from lcm_jax.text_to_image import TextToImage
  from lcm_jax.tokenizer import load_tokenizer
  from lcm_jax.training.sources import resolve_sources
  from lcm_jax.workdir import lcm_scheduler_config

  sources = resolve_sources(config)
  dtype = jax.numpy.dtype(config.precision.teacher_dtype)
  placed = jax.sharding.SingleDeviceSharding(device)
  modules = {"unet": build_module("unet", sources.student_unet_config, dtype=dtype, param_dtype=dtype),
             "vae": build_module("vae", sources.vae_config, dtype=dtype, param_dtype=dtype),
             "text_encoder": build_module("text_encoder", read_json(os.path.join(sources.base, "text_encoder",
                                                                                     "config.json")),
                                          dtype=dtype, param_dtype=dtype)}
  scheduler = lcm_scheduler_config(sources.scheduler_config, original_inference_steps=50,
                                   timestep_scaling=config.loss.timestep_scaling)
  pipe = Pipeline(**modules, tokenizer=load_tokenizer(os.path.join(sources.base, "tokenizer")),
                  params={k: abstract_params(m) for k, m in modules.items()},
                  configs={"unet": sources.student_unet_config, "vae": sources.vae_config, "scheduler": scheduler})
  t2i = TextToImage(pipe)
  size = config.resolution - config.resolution % downsampling_factor(sources.vae_config)
  specs = t2i._arg_specs("lcm", batch, size, size, False)
  specs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=placed), specs)
  return jax.jit(t2i._generate_fn("lcm", num_steps, False)).lower(*specs)


# ---------------------------------------------------------------------------------------
# The step in parts: compiled one at a time, added up.

PARTS = ("frozen", "student", "update")


def loss_pieces(run):
  """(carried, student_loss): the step's consistency loss (`lcm_jax.losses`, LCD or LCF, full or
  LoRA student) cut where the gradient starts.

  carried(target_params, frozen, batch, rng) -> {"z_start", "start", "context", "w_embedding",
    "target"}: batch preparation, the draws, the guided teacher's solver step (LCD) and the EMA
    target's forward f_theta-(z_target): everything that takes no gradient, from the rng the
    step's loss receives (the same split into posterior and loss keys as the trainer's).
  student_loss(params, frozen, carried, rng) -> (loss, {}): f_theta(z_start) against the
    carried target, the distance of the config.
  The two together compute exactly the trainer's loss (tests/test_memory_plan.py checks it).
  """
  import jax
  import jax.numpy as jnp

  from lcm_jax.config import loss_config
  from lcm_jax.consistency import guidance_embedding
  from lcm_jax.errors import LcmJaxError
  from lcm_jax.losses import (apply_caption_dropout, consistency_function, distance, draw, guided_teacher, interval,
                              lora_student_apply, noisy)
  from lcm_jax.solvers import SOLVERS
  from lcm_jax.training.batches import make_batch_preparation
  from lcm_jax.training.trainer import guidance_dim, unet_apply

  config, schedule, frozen_models = run.config, run.schedule, run.frozen
  if config.mode not in ("lcd", "lcf"):
    raise LcmJaxError(f"--part compiles LCD and LCF steps, not mode {config.mode!r}; use --part=step")
  lc = loss_config(config, guidance_dim(config, run.student.module.config))
  apply = unet_apply(run.student.module)
  if run.student.lora_scale is not None:  # the adapters on the frozen teacher, as make_loss_fn's LoRA loss
    apply = lora_student_apply(apply, run.student.lora_scale)
    with_base = lambda p, frozen: {"base": frozen["teacher"], "lora": p}
  else:
    with_base = lambda p, frozen: p
  prepare = make_batch_preparation(frozen_models.vae, frozen_models.text_encoder, frozen_models.scaling_factor)

  def carried(target_params, frozen, batch, rng):
    posterior_rng, loss_rng = jax.random.split(rng)
    prepared = prepare(frozen, batch, posterior_rng)
    latents = prepared["latents"]
    draws = draw(loss_rng, latents, schedule, lc)
    start, target_t = interval(schedule, lc, draws.index)
    context = apply_caption_dropout(prepared["context"], frozen["uncond_context"], draws.drop)
    w_embedding = guidance_embedding(draws.omega, lc.guidance_embedding_dim)
    z_start = noisy(schedule, latents, draws.noise, start)
    if config.mode == "lcd":
      model_fn = guided_teacher(unet_apply(frozen_models.teacher), frozen["teacher"], context,
                                frozen["uncond_context"], draws.omega, schedule)
      z_target = SOLVERS[lc.solver](schedule, z_start, start, target_t, model_fn)
    else:
      z_target = noisy(schedule, latents, draws.noise, target_t)
    target = consistency_function(apply, with_base(target_params, frozen), z_target, target_t, context, w_embedding,
                                  schedule, lc)
    if config.mode == "lcf" and lc.lcf_data_anchor:
      anchor = jax.random.bernoulli(jax.random.fold_in(loss_rng, 1), lc.lcf_data_anchor, draws.drop.shape)
      target = jnp.where(anchor[:, None, None, None], latents.astype(jnp.float32), target)
    return {"z_start": z_start, "start": start, "context": context, "w_embedding": w_embedding, "target": target}

  def student_loss(params, frozen, carry, rng):
    del rng
    prediction = consistency_function(apply, with_base(params, frozen), carry["z_start"], carry["start"],
                                      carry["context"], carry["w_embedding"], schedule, lc)
    return distance(prediction, carry["target"], lc), {}

  return carried, student_loss


def part_steps(run) -> dict:
  """The jitted parts of the run's step, each with the real step's shardings (`make_train_step`):

  frozen(state, frozen, batch) -> carried: the no-gradient half of the loss (teacher, EMA
    target), microbatch by microbatch as the step scans them, returned in batch order;
  student(state, frozen, carried) -> (grads, loss): the student's forward and backward
    (`accumulated_value_and_grad`: the config's microbatches, remat and attention), grads in
    the parameters' shardings;
  update(state, grads, {}) -> (state, metrics): the step's own optimiser, EMA and metrics code
    (`make_train_step` itself, state donated), on a loss linear in the parameters,
    sum <params, grads>, whose gradient is the given grads (its cost: 2 FLOPs a parameter).
  The frozen and student parts take the whole state and the frozen models as arguments
  (keep_unused), so their argument bytes less the persistent bytes are their own inputs.
  """
  import jax
  import jax.numpy as jnp

  from lcm_jax.sharding import batch_sharding, replicated
  from lcm_jax.train_step import _on_mesh, accumulated_value_and_grad, make_train_step

  config, mesh = run.config, run.mesh
  m = config.grad_accum_steps
  carried, student_loss = loss_pieces(run)
  on_mesh = lambda fn: _on_mesh(fn, mesh, config.mesh.gather_params, jnp.dtype(config.precision.compute_dtype))
  carried_on_mesh = on_mesh(lambda _, target, frozen, batch, rng: carried(target, frozen, batch, rng))
  student_on_mesh = on_mesh(lambda params, _, frozen, carry, rng: student_loss(params, frozen, carry, rng))

  def frozen_part(state, frozen, batch):
    rng = jax.random.fold_in(state.rng, state.step)
    target, frozen = jax.lax.stop_gradient(state.target_params), jax.lax.stop_gradient(frozen)
    if m == 1:
      return carried_on_mesh({}, target, frozen, batch, rng)
    micro = jax.tree.map(lambda x: x.reshape(-1, m, *x.shape[1:]).swapaxes(0, 1), batch)  # as the step's scan
    body = lambda _, xs: (None, carried_on_mesh({}, target, frozen, xs[1], jax.random.fold_in(rng, xs[0])))
    _, out = jax.lax.scan(body, None, (jnp.arange(m, dtype=jnp.uint32), micro))
    return jax.tree.map(lambda x: x.swapaxes(0, 1).reshape(-1, *x.shape[2:]), out)

  def student_part(state, frozen, carry):
    rng = jax.random.fold_in(state.rng, state.step)
    (loss, _), grads = accumulated_value_and_grad(student_on_mesh, state.params, {}, jax.lax.stop_gradient(frozen),
                                                  carry, rng, m)
    return grads, loss

  def linear_loss(params, target, grads, batch, rng):
    del target, batch, rng
    dots = jax.tree.map(lambda p, g: jnp.vdot(p.astype(jnp.float32), jax.lax.stop_gradient(g).astype(jnp.float32)),
                        params, grads)
    return sum(jax.tree.leaves(dots)), {}

  rep, data = replicated(mesh), batch_sharding(mesh)
  frozen_shardings = jax.tree.map(lambda x: x.sharding, run.frozen.arrays)
  ins = (run.state_shardings, frozen_shardings, data)
  return {"frozen": jax.jit(frozen_part, in_shardings=ins, out_shardings=data, keep_unused=True),
          "student": jax.jit(student_part, in_shardings=ins, out_shardings=(run.student.shardings, rep),
                             keep_unused=True),
          "update": make_train_step(linear_loss, run.optimizer, config.ema_decay, mesh=mesh,
                                    state_shardings=run.state_shardings, frozen_shardings=run.student.shardings,
                                    batch_shardings=rep, gather_params=False)}


def part_arguments(run, steps: dict) -> dict:
  """Each part's abstract arguments (the carried tensors and the grads with their shardings)."""
  import jax

  from lcm_jax.sharding import batch_sharding
  with_sharding = lambda tree, s: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree)
  carried = with_sharding(jax.eval_shape(steps["frozen"], run.state, run.frozen.arrays, run.batch),
                          batch_sharding(run.mesh))
  return {"frozen": (run.state, run.frozen.arrays, run.batch), "student": (run.state, run.frozen.arrays, carried),
          "update": (run.state, run.state.params, {})}


def persistent_bytes(run) -> dict:
  """Per chip, as the compiler lays them out: the train state (student, optimiser state, EMA
  target, step, key) and the frozen models' arrays, from an executable that only takes them."""
  import jax
  frozen_shardings = jax.tree.map(lambda x: x.sharding, run.frozen.arrays)
  out = {}
  for name, tree, shardings in (("state", run.state, run.state_shardings),
                                ("frozen_models", run.frozen.arrays, frozen_shardings)):
    lowered = jax.jit(lambda x: None, in_shardings=(shardings,), keep_unused=True).lower(tree)
    out[name] = int(lowered.compile().memory_analysis().argument_size_in_bytes)
  return out


def part_flops(config, devices, parts) -> dict:
  """FLOPs per chip of each part, counted as `step_flops` counts the whole step."""
  import jax
  run = build_run(flat_config(config), jax.devices("cpu")[:1])
  steps = part_steps(run)
  args = part_arguments(run, steps)
  out = {}
  for name in parts:
    cost = steps[name].lower(*args[name]).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    out[name] = float((cost or {}).get("flops", 0.0)) / len(devices)
  return out


def transient_bytes(part: str, compiled: dict, persistent: dict) -> int:
  """A part's own bytes per chip beyond the persistent ones: its non-state inputs (batch,
  carried tensors, grads), its outputs that alias no input, and its temporaries."""
  state_args = persistent["state"] + (0 if part == "update" else persistent["frozen_models"])
  if compiled.get("error"):  # only the temporaries are known
    return compiled["temp_bytes"]
  return compiled["argument_bytes"] - state_args + compiled["output_bytes"] - compiled["alias_bytes"] + \
      compiled["temp_bytes"]


def combine(result: dict, chip: str) -> dict:
  """The combined estimate of the step's peak per chip from its parts: persistent bytes (state
  and frozen models, counted once) + the largest part's transient bytes. It is the peak of the
  step run as its three parts one after another; the fused step does the same arithmetic on the
  same buffers, so it needs as much unless XLA keeps a part's buffers alive into the next (not
  bounded here). FLOPs: the sum of the parts'."""
  hbm, peak = CHIPS.get(chip, (None, None))
  parts, persistent = result["parts"], result["persistent_bytes"]
  transient = {name: transient_bytes(name, p, persistent) for name, p in parts.items()}
  largest = max(transient, key=transient.get)
  total = persistent["state"] + persistent["frozen_models"] + transient[largest]
  flops = sum(p["flops"] for p in parts.values())
  out = {"parts": sorted(parts), "complete": sorted(parts) == sorted(PARTS), "transient_bytes": transient,
         "largest_part": largest, "total_bytes": total, "flops": flops, "hbm_bytes": hbm,
         "any_part_refused": any(p.get("error") for p in parts.values())}
  gib = lambda n: f"{n / GIB:.2f} GiB"
  line = (f"COMBINED ESTIMATE (from the parts, not a compile of the fused step): persistent state "
          f"{gib(persistent['state'])} + frozen models {gib(persistent['frozen_models'])} (counted once) + the "
          f"largest part's transient bytes ({largest}: {gib(transient[largest])}) = {gib(total)} per chip")
  if not out["complete"]:
    line += f" [only the parts {', '.join(sorted(parts))}]"
  if hbm:
    out["fits"] = total <= hbm and not out["any_part_refused"]
    out["headroom"] = 1 - total / hbm
    line += f" of {hbm / GIB:.2f} GiB ({'fits' if out['fits'] else 'DOES NOT FIT'}, headroom {100 * out['headroom']:.0f}%)"
  line += f"; {flops / 1e12:.3g} TFLOP per chip (sum of the parts)"
  if peak and flops and out["complete"]:
    out["roofline_seconds"] = flops / peak
    out["roofline_samples_per_second_per_chip"] = result["batch_size"] / result["chips"] / out["roofline_seconds"]
    line += f", roofline {out['roofline_samples_per_second_per_chip']:.3g} samples/s/chip"
  print(line, flush=True)
  return out


MODULES = {"frozen": "jit_frozen_part", "student": "jit_student_part", "update": "jit_train_step",
           "step": "jit_train_step"}


def plan_parts(config, devices, chip: str, parts, dump_dir: str | None = None) -> dict:
  """Compiles the named parts one after another; their reports and the persistent bytes."""
  run = build_run(config, devices)
  steps = part_steps(run)
  args = part_arguments(run, steps)
  persistent = persistent_bytes(run)
  print(f"persistent per chip: train state {persistent['state'] / GIB:.3f} GiB, frozen models "
        f"{persistent['frozen_models'] / GIB:.3f} GiB", flush=True)
  flops = part_flops(config, devices, parts)
  result = {"persistent_bytes": persistent, "parts": {}}
  for name in parts:
    print(f"compiling the {name} part ...", flush=True)
    start = time.perf_counter()
    lowered = steps[name].lower(*args[name])
    lower_seconds = time.perf_counter() - start
    out = report(f"{name} part", Compiled.of(lowered, flops[name], dump_dir, MODULES[name]), chip,
                 config.batch_size / len(devices))
    out["lower_seconds"] = lower_seconds
    out["transient_bytes"] = transient_bytes(name, out, persistent)
    print(f"{name} part: transient (its own inputs, outputs and temporaries beyond the persistent state) "
          f"{out['transient_bytes'] / GIB:.3f} GiB per chip", flush=True)
    result["parts"][name] = out
  return result


def report(name: str, compiled: Compiled, chip: str, samples: int) -> dict:
  """One printed line per executable, and its numbers as a dict."""
  hbm, peak = CHIPS.get(chip, (None, None))
  out = dict(dataclasses.asdict(compiled), total_bytes=compiled.total_bytes, hbm_bytes=hbm)
  if compiled.source == "buffer_assignment":
    name += " (from the buffer assignment; code generation not waited for)"
  if compiled.error:
    out["fits"] = False
    print(f"{name}: DOES NOT FIT: the compiler needs {compiled.temp_bytes / GIB:.2f} GiB of temporaries alone "
          f"({compiled.error}; after {compiled.compile_seconds:.0f}s)", flush=True)
    return out
  size = lambda n: f"{n / GIB:.2f} GiB" if n >= GIB / 100 else f"{n / 2 ** 20:.2f} MiB"
  line = (f"{name}: arguments {size(compiled.argument_bytes)}, outputs {size(compiled.output_bytes)} "
          f"(aliased {size(compiled.alias_bytes)}), temporaries {size(compiled.temp_bytes)}, "
          f"total {size(compiled.total_bytes)} per chip")
  if hbm:
    out["fits"] = compiled.total_bytes <= hbm
    out["headroom"] = 1 - compiled.total_bytes / hbm
    line += f" of {hbm / GIB:.2f} GiB ({'fits' if out['fits'] else 'DOES NOT FIT'}, headroom {100 * out['headroom']:.0f}%)"
  line += f"; {compiled.flops / 1e12:.3g} TFLOP per chip"
  if peak and compiled.flops:
    out["roofline_seconds"] = compiled.flops / peak
    out["roofline_samples_per_second_per_chip"] = samples / out["roofline_seconds"]
    line += (f", roofline {out['roofline_seconds'] * 1e3:.3g} ms = "
             f"{out['roofline_samples_per_second_per_chip']:.3g} samples/s/chip")
  print(line + f" (compiled in {compiled.compile_seconds:.0f}s)", flush=True)
  return out


def plan(config, topology: str, sampling: bool, part: str = "step", dump_dir: str | None = None) -> dict:
  """Compiles the step, or its parts (`part`: one of PARTS, or "all"; "state": only the persistent
  bytes), and optionally sampling, for the topology; reports per chip."""
  from lcm_jax.errors import LcmJaxError
  from lcm_jax.sharding import make_mesh
  if part not in ("step", "all", "state", *PARTS):
    raise LcmJaxError(f"--part={part!r}: choose step, all, state or one of {', '.join(PARTS)}")
  if dump_dir and (part == "all" or sampling):
    raise LcmJaxError("--buffer_assignment_dir leaves each compile running in the background: compile one "
                      "part (or the step) per process, without --sampling")
  devices, chip = topology_devices(topology)
  with tempfile.TemporaryDirectory() as scratch:
    resolve_teacher(config, scratch)
    mesh = make_mesh(config.mesh.data, config.mesh.fsdp, devices=devices)
    per_chip = config.batch_size / len(devices)
    print(f"{topology} ({len(devices)} chips), mesh {dict(mesh.shape)}, global batch {config.batch_size} "
          f"({per_chip:g} per chip, {config.grad_accum_steps} microbatch(es)), resolution {config.resolution}, "
          f"remat {config.remat}, attention {config.attention}, data {config.data.format}; compiling "
          f"{'the train step' if part == 'step' else 'the part(s) ' + part} ...", flush=True)
    result = {"topology": topology, "chips": len(devices), "mesh": dict(mesh.shape), "batch_size": config.batch_size,
              "grad_accum_steps": config.grad_accum_steps, "resolution": config.resolution,
              "remat": config.remat, "attention": config.attention, "data_format": config.data.format,
              "student": config.get("student", "full"), "mode": config.mode,
              "precision": dict(config.precision), "part": part}
    if part == "state":
      result["persistent_bytes"] = persistent_bytes(build_run(config, devices))
      print(f"persistent per chip: train state {result['persistent_bytes']['state'] / GIB:.3f} GiB, frozen models "
            f"{result['persistent_bytes']['frozen_models'] / GIB:.3f} GiB", flush=True)
    elif part == "step":
      lowered, _ = lower_train_step(config, devices)
      result["train_step"] = report("train step", Compiled.of(lowered, step_flops(config, devices), dump_dir,
                                                               MODULES["step"]), chip, per_chip)
    else:
      result.update(plan_parts(config, devices, chip, PARTS if part == "all" else (part,), dump_dir))
      if part == "all":
        result["train_step_flops"] = step_flops(config, devices)
      result["combined"] = combine(result, chip)
    if sampling:
      for batch in (1, 8):
        result[f"lcm_4_steps_batch_{batch}"] = report(f"LCM 4 steps, batch {batch}, one chip",
                                                      Compiled.of(lower_sampling(config, devices[0], batch)),
                                                      chip, batch)
  return result


SAME_RUN_KEYS = ("topology", "chips", "mesh", "batch_size", "grad_accum_steps", "resolution", "remat", "attention",
                 "data_format", "student", "mode", "precision", "persistent_bytes")


def combine_files(paths: list[str]) -> dict:
  """The combined estimate of part plans written by separate runs (`--part=frozen`, ...) of
  the same config and topology."""
  from lcm_jax.errors import LcmJaxError
  results = []
  for path in paths:
    with open(path) as f:
      results.append(json.load(f))
  first = results[0]
  for path, r in zip(paths, results):
    if "parts" not in r:
      raise LcmJaxError(f"{path} is not a --part plan")
    differ = [k for k in SAME_RUN_KEYS if r.get(k) != first.get(k)]
    if differ:
      raise LcmJaxError(f"{path} is another run than {paths[0]}: {', '.join(differ)} differ")
  merged = {k: v for k, v in first.items() if k not in ("parts", "combined", "part")}
  merged["part"] = "combined"
  merged["parts"] = {name: p for r in results for name, p in r["parts"].items()}
  merged["combined"] = combine(merged, first["topology"].split(":")[0])
  return merged


def define_flags():
  from absl import flags
  from ml_collections import config_flags
  config = config_flags.DEFINE_config_file("config", None, "Training config, as for python -m lcm_jax.train.",
                                           lock_config=True)
  flags.DEFINE_string("topology", "cpu:8", "A TPU topology (v4:2x2x1, v5e:2x4, v5p:2x2x1, v6e:2x4, ...) or cpu:N.")
  flags.DEFINE_integer("batch_size", None, "Global batch (default: the config's).")
  flags.DEFINE_bool("sampling", False, "Also compile 4-step LCM sampling at batch 1 and 8 on one chip.")
  flags.DEFINE_string("output", None, "Write the plan as JSON here.")
  flags.DEFINE_string("part", "step", "step: the whole train step; frozen, student or update: one part of it "
                      "(teacher and EMA target / student forward and backward / optimiser and EMA update); all: "
                      "the three parts one after another and their combined estimate; state: only the persistent bytes "
                      "(train state and frozen models per chip).")
  flags.DEFINE_string("buffer_assignment_dir", None,
                      "Dump the compiler's HLO here (--xla_dump_to) and report each compile from its buffer "
                      "assignment as soon as it is written, then exit without waiting for code generation "
                      "(one part or the step per process).")
  flags.DEFINE_list("combine", None, "Part plans (--output JSONs of --part runs) to add up instead of compiling.")
  return config


def main(config_flag) -> None:
  from absl import flags

  from lcm_jax.errors import LcmJaxError
  FLAGS = flags.FLAGS
  if FLAGS.combine:
    result = combine_files(FLAGS.combine)
    if FLAGS.output:
      with open(FLAGS.output, "w") as f:
        json.dump(result, f, indent=2)
      print(f"wrote {FLAGS.output}")
    return
  config = config_flag.value
  if config is None:
    raise LcmJaxError("--config is required, e.g. --config=configs/sd21_768.py")
  if FLAGS.batch_size:
    with config.unlocked():
      config.batch_size = FLAGS.batch_size
  result = plan(config, FLAGS.topology, FLAGS.sampling, FLAGS.part, FLAGS.buffer_assignment_dir)
  if FLAGS.output:
    with open(FLAGS.output, "w") as f:
      json.dump(result, f, indent=2)
    print(f"wrote {FLAGS.output}")
  if FLAGS.buffer_assignment_dir:
    sys.stdout.flush()
    os._exit(0)  # the compiler's code generation goes on in a thread that cannot be stopped


if __name__ == "__main__":
  force_cpu_devices(sys.argv)
  from lcm_jax import cli
  _config_flag = define_flags()
  sys.argv = cli.parse_flags_with_config(sys.argv)
  cli.run(lambda argv: main(_config_flag))
