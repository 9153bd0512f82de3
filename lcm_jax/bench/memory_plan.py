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
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import tempfile
import time

GIB = 2 ** 30
# HBM per chip a program may use and peak dense bf16 FLOP/s per chip. v4 and v5e: what the TPU
# compiler reports as available in its out-of-memory errors (32 and 16 GiB published, less
# what the runtime reserves); v5p and v6e: the published figures.
CHIPS = {"v4": (30.75 * GIB, 275e12), "v5e": (15.75 * GIB, 197e12), "v5litepod": (15.75 * GIB, 197e12),
         "v5p": (95 * GIB, 459e12), "v6e": (32 * GIB, 918e12)}


def force_cpu_devices(argv: list[str]) -> None:
  """`--topology=cpu:N` needs N host devices, which XLA reads from XLA_FLAGS at JAX's import."""
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
    desc = topologies.get_topology_desc(topology_name=topology, platform="tpu")
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

  @property
  def total_bytes(self) -> int:
    # Donated inputs alias outputs: counted once.
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

  @classmethod
  def of(cls, lowered, flops: float | None = None) -> "Compiled":
    """Compiles `lowered`; `flops` (per chip) replaces the compiler's count when given."""
    start = time.perf_counter()
    try:
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


def lower_train_step(config, devices):
  """The run's jitted step, lowered on abstract arguments for `devices` (the trainer's own code)."""
  import jax

  from lcm_jax.config import check_config
  from lcm_jax.sharding import batch_sharding, make_mesh
  from lcm_jax.training.batches import device_keys
  from lcm_jax.training.frozen import abstract_frozen_models
  from lcm_jax.training.sources import check_batch_size, check_resolution, resolve_sources
  from lcm_jax.sd_pipeline import read_json
  from lcm_jax.training.state import build_optimizer, build_student, state_initializer
  from lcm_jax.training.trainer import LATENTS_FORMAT, make_step
  from lcm_jax.schedule import schedule_from_config
  from lcm_jax.train_step import train_state_shardings

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
  step, _ = make_step(config, schedule_from_config(sources.scheduler_config), mesh, student, frozen, shardings,
                      latents_format)
  batch = abstract_batch(config, sources, student, latents_format, text_length, batch_sharding(mesh))
  batch = {k: batch[k] for k in device_keys(latents_format)}
  return step.lower(state, frozen.arrays, batch), mesh


def step_flops(config, devices) -> float:
  """FLOPs per chip of one step, counted on the step's HLO before partitioning, with the
  attention materialised and one microbatch: the same arithmetic as the compiled step, in a
  form XLA's cost analysis counts whole (it counts a loop's body once, so the chunked
  attention's and the microbatch scans, and a Pallas kernel's custom call, would undercount).
  Recomputation (remat) is included; collectives are not. Lowered for one CPU device (the
  TPU client does not analyse unpartitioned HLO); the count does not depend on the devices."""
  import jax
  flat = config.copy_and_resolve_references()
  with flat.unlocked():
    flat.attention, flat.grad_accum_steps, flat.mesh.data, flat.mesh.fsdp = "xla", 1, 1, 1
  lowered, _ = lower_train_step(flat, jax.devices("cpu")[:1])
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


def report(name: str, compiled: Compiled, chip: str, samples: int) -> dict:
  """One printed line per executable, and its numbers as a dict."""
  hbm, peak = CHIPS.get(chip, (None, None))
  out = dict(dataclasses.asdict(compiled), total_bytes=compiled.total_bytes, hbm_bytes=hbm)
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


def plan(config, topology: str, sampling: bool) -> dict:
  """Compiles the step (and optionally sampling) for the topology and reports per chip."""
  devices, chip = topology_devices(topology)
  with tempfile.TemporaryDirectory() as scratch:
    resolve_teacher(config, scratch)
    flops = step_flops(config, devices)
    lowered, mesh = lower_train_step(config, devices)
    per_chip = config.batch_size / len(devices)
    print(f"{topology} ({len(devices)} chips), mesh {dict(mesh.shape)}, global batch {config.batch_size} "
          f"({per_chip:g} per chip, {config.grad_accum_steps} microbatch(es)), resolution {config.resolution}, "
          f"remat {config.remat}, attention {config.attention}, data {config.data.format}; compiling the train step ...", flush=True)
    result = {"topology": topology, "chips": len(devices), "mesh": dict(mesh.shape), "batch_size": config.batch_size,
              "grad_accum_steps": config.grad_accum_steps, "resolution": config.resolution,
              "remat": config.remat, "attention": config.attention, "data_format": config.data.format,
              "precision": dict(config.precision), "train_step": report("train step", Compiled.of(lowered, flops), chip,
                                                                        per_chip)}
    if sampling:
      for batch in (1, 8):
        result[f"lcm_4_steps_batch_{batch}"] = report(f"LCM 4 steps, batch {batch}, one chip",
                                                      Compiled.of(lower_sampling(config, devices[0], batch)),
                                                      chip, batch)
  return result


def define_flags():
  from absl import flags
  from ml_collections import config_flags
  config = config_flags.DEFINE_config_file("config", None, "Training config, as for python -m lcm_jax.train.",
                                           lock_config=True)
  flags.DEFINE_string("topology", "cpu:8", "A TPU topology (v4:2x2x1, v5e:2x4, v5p:2x2x1, v6e:2x4, ...) or cpu:N.")
  flags.DEFINE_integer("batch_size", None, "Global batch (default: the config's).")
  flags.DEFINE_bool("sampling", False, "Also compile 4-step LCM sampling at batch 1 and 8 on one chip.")
  flags.DEFINE_string("output", None, "Write the plan as JSON here.")
  return config


def main(config_flag) -> None:
  from absl import flags

  from lcm_jax.errors import LcmJaxError
  config = config_flag.value
  if config is None:
    raise LcmJaxError("--config is required, e.g. --config=configs/sd21_768.py")
  FLAGS = flags.FLAGS
  if FLAGS.batch_size:
    with config.unlocked():
      config.batch_size = FLAGS.batch_size
  result = plan(config, FLAGS.topology, FLAGS.sampling)
  if FLAGS.output:
    with open(FLAGS.output, "w") as f:
      json.dump(result, f, indent=2)
    print(f"wrote {FLAGS.output}")


if __name__ == "__main__":
  force_cpu_devices(sys.argv)
  from lcm_jax import cli
  _config_flag = define_flags()
  sys.argv = cli.parse_flags_with_config(sys.argv)
  cli.run(lambda argv: main(_config_flag))
