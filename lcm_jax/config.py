"""Training configs: the defaults every config starts from, argument parsing, and validation.

A config file (configs/*.py) is Python with `get_config(arg)` returning an
`ml_collections.ConfigDict` (big_vision style):

    from lcm_jax import config as config_lib

    def get_config(arg=None):
      arg = config_lib.parse_arg(arg, runlocal=False)
      c = config_lib.base_config()
      c.teacher = "stabilityai/stable-diffusion-2-1"
      ...
      return config_lib.runlocal(c) if arg.runlocal else c

`python -m lcm_jax.train --config=configs/sd21_768.py:runlocal` passes "runlocal" as `arg`;
`--config.a.b=value` overrides any key. Where a default comes from: "paper" is Luo et al. 2023
(arXiv 2310.04378), Sec. 5.1 and the appendix; "diffusers" is the defaults of its
`train_lcm_distill_sd_wds.py`. docs/hyperparameters.md compares them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np

from lcm_jax.data import default_data_config
from lcm_jax.errors import LcmJaxError
from lcm_jax.lora import DEFAULT_TARGETS as LORA_TARGETS
from lcm_jax.models.attention import BACKENDS as ATTENTION_BACKENDS
from lcm_jax.sharding import DEFAULT_RULES

DTYPES = ("float32", "bfloat16", "float16")
MODES = ("lcd", "lcf", "guided_distill")
TEACHER_MODES = ("lcd", "guided_distill")  # modes that distil config.teacher
UNCONDS = ("empty_prompt", "zeros")
STUDENTS = ("full", "lora")

# Fixed prompts of the sample grids written during training (rows of workdir/samples/*.png).
SAMPLE_PROMPTS = (
    "a photo of an astronaut riding a horse on the moon",
    "a watercolor painting of a lighthouse at dawn",
    "a close-up portrait of an old man with a grey beard, studio lighting",
    "a bowl of ramen on a wooden table, 35mm photograph",
)


def base_config() -> ml_collections.ConfigDict:
  """Every key the trainer reads, with its default (the paper's where it gives one)."""
  c = ml_collections.ConfigDict()

  # What to train, from what, on what.
  c.teacher = ""            # diffusers pipeline folder or hub id (LCD: the teacher; LCF: optional
                            # source of the VAE/text encoder, else init_from's)
  c.teacher_variant = ""    # weights variant of the teacher folder, e.g. "fp16"
  c.teacher_revision = ""   # hub revision of a teacher hub id (branch, tag or commit); the token comes
                            # from HF_TOKEN or `hf auth login`, never the config (saved in the workdir)
  c.init_from = ""          # optional: an LCM pipeline folder or a workdir to start the student from
  c.init_params = "ema"     # which parameters of an init_from workdir: "ema" or "online"
  c.mode = "lcd"            # "lcd" (Algorithm 1), "lcf" (Algorithm 4) or "guided_distill" (lcm_jax.guided_distill)
  c.student = "full"        # "full", or "lora": LCM-LoRA, the frozen teacher + an adapter (lcd only)
  c.lora = lora_defaults()  # rank, alpha, targets of a LoRA student
  c.data = default_data_config()  # path, format, center_crop, random_flip, ... (lcm_jax.data)
  c.resolution = 512        # pixels; must be a multiple of VAE factor x 2^(UNet down blocks - 1)
  c.batch_size = 72         # global; paper: 72 at 512, 16 at 768
  c.grad_accum_steps = 1    # > 1: the batch runs as this many microbatches, one optimiser step
  c.num_train_steps = 100_000  # paper: 100k iterations
  c.seed = 0

  c.loss = loss_defaults()        # the consistency loss: solver, skipping step, omega range, ...

  c.guided_distill = guided_distill_defaults()  # mode "guided_distill" only

  c.optimizer = optimizer_defaults()  # AdamW after global-norm clipping

  c.ema_decay = 0.999943          # paper (diffusers: 0.95)

  # Dtypes: "float32", "bfloat16" or "float16".
  c.precision = ml_collections.ConfigDict()
  c.precision.teacher_dtype = "bfloat16"  # frozen teacher UNet, VAE and text encoder (params and compute)
  c.precision.compute_dtype = "bfloat16"  # student activations (its master weights stay float32)
  c.precision.target_dtype = "float32"    # EMA target; bf16 cannot resolve a 0.999943 update

  # Device mesh (lcm_jax.sharding): batch over data x fsdp; parameters split over fsdp.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1                # -1: all devices left after fsdp
  c.mesh.fsdp = 1
  # Which parameters are split over "fsdp": (regex, "fsdp" | "replicated") pairs, first match
  # wins, searched in '/'-joined parameter paths (lcm_jax.sharding).
  c.mesh.rules = tuple(DEFAULT_RULES)
  # With fsdp > 1: all-gather the sharded kernels (in the compute dtype) where they are used,
  # rather than letting XLA reshard activations to match them (lcm_jax.train_step.compute_view).
  c.mesh.gather_params = True
  c.remat = True                  # recompute the student's block activations in the backward pass
  # Attention of the UNets and the VAE (lcm_jax.models.attention): "auto" picks cuDNN on GPU,
  # the Pallas splash kernel on TPU and the memory-bounded "chunked" path elsewhere; "xla"
  # materialises the logits (the reference; it does not fit SD at 768 px).
  c.attention = "auto"

  # Checkpoints, logs, samples.
  c.checkpoint_every = 1000
  c.keep_checkpoints = 3
  c.log_every = 50
  c.sample_every = 1000           # 0: never
  c.sample_prompts = SAMPLE_PROMPTS
  c.sample_steps = (1, 2, 4)      # LCM steps, one column each
  c.sample_guidance_scale = 8.5   # diffusers' LatentConsistencyModelPipeline default (omega = 7.5)
  c.compilation_cache_dir = "~/.cache/lcm_jax/jax_cache"  # "" disables the persistent cache
  # Resuming a workdir with other values of keys outside RESUME_SAFE_KEYS (the model, the
  # loss, the data, ...) is refused unless this is set.
  c.resume_with_changes = False
  return c


def loss_defaults() -> ml_collections.ConfigDict:
  """The consistency loss (lcm_jax.losses.ConsistencyLossConfig), the paper's values where it gives them."""
  o = ml_collections.ConfigDict()
  o.solver = "ddim"          # paper: DDIM is the augmented PF-ODE solver of its main results
  o.skipping_step = 20       # paper: k = 20 (50 solver points on 1000 timesteps)
  o.omega_min = 2.0          # paper: omega ~ U[2, 14] (diffusers samples [5, 15])
  o.omega_max = 14.0
  o.distance = "l2"          # "l2" or "huber" (pseudo-Huber); diffusers' default is l2
  o.huber_c = 0.001          # diffusers
  o.caption_dropout = 0.0    # diffusers parses --proportion_empty_prompts but applies 0
  o.lcf_data_anchor = 0.0    # LCF: share of samples whose target is the data itself (0: Algorithm 4)
  o.uncond = "empty_prompt"  # unconditional context: the empty prompt's embedding, or "zeros"
  o.cond_proj_init = "zeros" # the student's new guidance input: "zeros" or "torch_default"
  o.guidance_embedding_dim = 256  # time_cond_proj_dim of the student (LCM checkpoints: 256)
  o.timestep_scaling = 10.0  # boundary scalings c_skip/c_out at s = 10 t (diffusers, LCMScheduler)
  return o


def optimizer_defaults() -> ml_collections.ConfigDict:
  """AdamW after global-norm clipping (lcm_jax.train_step.make_optimizer)."""
  o = ml_collections.ConfigDict()
  o.lr = 8e-6           # paper
  o.b1 = 0.9            # diffusers (torch AdamW defaults)
  o.b2 = 0.999
  o.eps = 1e-8
  o.weight_decay = 1e-2  # diffusers --adam_weight_decay
  o.max_grad_norm = 1.0  # diffusers
  o.schedule = "constant"  # "constant", "warmup_constant" or "warmup_cosine"
  o.warmup_steps = 0
  return o


def guided_distill_defaults() -> ml_collections.ConfigDict:
  """Guided-Distill (mode "guided_distill", lcm_jax.guided_distill.GuidedDistillConfig): stage 1
  (w-conditioned student of the guided teacher) for stage1_steps, then log2(initial_steps)
  progressive-distillation rounds of round_steps each, halving the DDIM steps down to 1;
  num_train_steps must be their sum. omega ~ U[loss.omega_min, loss.omega_max]."""
  g = ml_collections.ConfigDict()
  g.stage1_steps = 250
  g.round_steps = 150
  g.initial_steps = 32
  return g


def lora_defaults() -> ml_collections.ConfigDict:
  """config.lora: the adapter of a LoRA student (config.student = "lora"; LCM-LoRA, Luo et al.
  2023, arXiv 2311.05556): the frozen teacher plus alpha / rank x A @ B on the `targets`
  layers, without guidance input (lcm_jax.lora, docs/lora.md). Defaults: diffusers'
  train_lcm_distill_lora_sd_wds.py."""
  c = ml_collections.ConfigDict()
  c.rank = 64                # --lora_rank
  c.alpha = 64.0             # --lora_alpha (the rank); the adapter's delta is scaled by alpha / rank
  c.targets = tuple(LORA_TARGETS)  # module-name suffixes (PEFT's rule): the script's layer set
  return c


# Keys a resumed run may change freely: schedules of logs, checkpoints and samples, the run's
# length, the learning rate, and how the step is laid out on the devices (not what it computes).
RESUME_SAFE_KEYS = (
    "num_train_steps", "optimizer.lr", "log_every", "checkpoint_every", "keep_checkpoints", "sample_every",
    "sample_prompts", "sample_steps", "sample_guidance_scale", "compilation_cache_dir", "resume_with_changes",
    "mesh.data", "mesh.fsdp", "mesh.rules", "mesh.gather_params", "remat", "attention", "grad_accum_steps",
    "data.num_workers", "data.read_threads", "data.prefetch_buffer_size", "data.worker_buffer_size")


def flatten_dotted(tree: Mapping[str, Any]) -> dict[str, Any]:
  """A nested config (or its JSON) -> {"loss.ema_decay": value, ...}: its leaves by dotted path."""
  from lcm_jax.weights import flatten_tree
  return {".".join(path): value for path, value in flatten_tree(tree).items()}


def _later_key_defaults() -> dict[str, Any]:
  """The defaults, flattened as in a saved config, of keys added after the first releases (a
  workdir saved before them ran with these values)."""
  import json
  flat = flatten_dotted(json.loads(base_config().to_json_best_effort()))
  return {k: v for k, v in flat.items() if k.startswith("guided_distill.") or k == "loss.lcf_data_anchor"}


def config_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> tuple[list[str], list[str]]:
  """(safe, unsafe) descriptions "key: old -> new" of the leaves that differ between two JSON
  configs; safe ones are in RESUME_SAFE_KEYS."""
  old, new = flatten_dotted(saved), flatten_dotted(current)
  safe, unsafe = [], []
  later_defaults = _later_key_defaults()
  for key in sorted(set(old) | set(new)):
    if key not in old and new[key] == "":
      continue  # a key added to the configs after the run started, left at its empty default
    if key not in old and new[key] == later_defaults.get(key, ()):
      continue  # a key added to the configs after the run started, at its default (what the run used)
    if key not in old and (key == "student" and new[key] == "full" or key.startswith("lora.")
                           and old.get("student", "full") == "full"):
      continue  # a run from before LoRA students: a full student, to which lora.* mean nothing
    if old.get(key) != new.get(key):
      (safe if key in RESUME_SAFE_KEYS else unsafe).append(f"{key}: {old.get(key)!r} -> {new.get(key)!r}")
  return safe, unsafe


# ---------------------------------------------------------------------------------------
# Arguments of get_config and the CPU-sized variant.

def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """big_vision-style config arguments: "runlocal", "runlocal,lcf" or "size=16,lcf=True".

  Each comma-separated item is `name=value` or a bare `name` (True); every name must be a
  keyword of `defaults`, and each value is converted to its default's type.
  """
  parsed = ml_collections.ConfigDict(dict(defaults))
  for item in filter(None, (arg or "").split(",")):
    name, sep, value = item.partition("=")
    name = name.strip()
    if name not in defaults:
      raise ValueError(f"unknown config argument {name!r}; this config takes {', '.join(defaults) or 'none'}")
    default = defaults[name]
    if not sep:
      converted: Any = True
    elif isinstance(default, bool):
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"config argument {name} takes true or false, got {value!r}")
      converted = value.lower() in ("true", "1")
    else:
      converted = type(default)(value) if default is not None else value
    parsed[name] = converted
  return parsed


def cpu_settings(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """What any CPU run wants: float32 (bf16 is slower than fp32 on CPUs and not bit-reproducible),
  no rematerialisation, data decoded in this process, no persistent compilation cache."""
  for key in ("teacher_dtype", "compute_dtype", "target_dtype"):
    c.precision[key] = "float32"
  c.remat = False
  c.data.num_workers = 0
  c.compilation_cache_dir = ""
  return c


def runlocal(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks a real config to a run that finishes on a CPU in seconds (give a tiny teacher and
  data on the command line): the smallest SD resolution, 2 images a step (data-parallel, one
  microbatch), 4 steps with a checkpoint every 2, a log every step, no sample grids; the loss
  and optimiser are unchanged."""
  cpu_settings(c)
  c.resolution = 64
  c.batch_size = 2
  c.mesh.data, c.mesh.fsdp = -1, 1
  c.grad_accum_steps = 1
  c.num_train_steps = 4
  c.checkpoint_every = 2
  c.keep_checkpoints = 2
  c.log_every = 1
  c.sample_every = 0
  c.data.read_threads = 2
  return c


# ---------------------------------------------------------------------------------------
# Validation, before anything is loaded.

def unknown_keys(config: ml_collections.ConfigDict, base: ml_collections.ConfigDict | None = None,
                 prefix: str = "") -> list[str]:
  """Keys of `config` that `base_config()` does not have (typos in a config file), dotted."""
  base = base_config() if base is None else base
  out = []
  for key in config.keys():
    name = prefix + key
    if key not in base:
      out.append(name)
    elif isinstance(config[key], ml_collections.ConfigDict) and isinstance(base[key], ml_collections.ConfigDict):
      out.extend(unknown_keys(config[key], base[key], name + "."))
  return out


def _positive_int(key: str, value: Any, allow_zero: bool = False) -> None:
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < (0 if allow_zero else 1):
    raise LcmJaxError(f"config.{key} must be a {'non-negative' if allow_zero else 'positive'} integer, "
                      f"got {value!r}")


def _one_of(key: str, value: Any, choices: tuple[str, ...] | Mapping[str, Any]) -> None:
  if value not in choices:
    raise LcmJaxError(f"config.{key} must be one of {', '.join(choices)}, got {value!r}")


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises LcmJaxError for a config no run can use (before anything is loaded)."""
  unknown = unknown_keys(config)
  if unknown:
    raise LcmJaxError(f"the config has keys the trainer does not know: {', '.join(unknown)} (a typo?)")
  _one_of("mode", config.mode, MODES)
  if config.mode in TEACHER_MODES and not config.teacher:
    raise LcmJaxError(f"config.teacher is empty: {config.mode} needs a teacher (a diffusers pipeline folder or "
                      "hub id); pass --config.teacher=...")
  if config.mode == "lcf" and not config.init_from:
    raise LcmJaxError("config.init_from is empty: LCF fine-tunes an existing LCM (a pipeline folder or "
                      "a workdir); pass --config.init_from=...")
  _one_of("init_params", config.init_params, ("ema", "online"))
  check_student(config)
  if not config.data.path:
    raise LcmJaxError("config.data.path is empty: pass --config.data.path=...")
  for key in ("resolution", "batch_size", "grad_accum_steps", "num_train_steps", "checkpoint_every",
              "keep_checkpoints", "log_every"):
    _positive_int(key, config[key])
  _positive_int("sample_every", config.sample_every, allow_zero=True)
  for key in ("teacher_dtype", "compute_dtype", "target_dtype"):
    _one_of(f"precision.{key}", config.precision[key], DTYPES)
  _one_of("loss.uncond", config.loss.uncond, UNCONDS)
  _one_of("attention", config.attention, ATTENTION_BACKENDS)
  if not 0.0 <= config.ema_decay <= 1.0:
    raise LcmJaxError(f"config.ema_decay must be in [0, 1], got {config.ema_decay}")
  if config.sample_every and not config.sample_prompts:
    raise LcmJaxError("config.sample_prompts is empty but config.sample_every asks for sample grids")
  loss_config(config, guidance_embedding_dim=config.loss.guidance_embedding_dim)  # its own checks
  if config.mode == "guided_distill":
    gd = guided_distill_config(config, config.loss.guidance_embedding_dim)  # its own checks
    if config.num_train_steps != gd.total_steps:
      raise LcmJaxError(f"config.num_train_steps={config.num_train_steps} must be guided_distill.stage1_steps + "
                        f"log2(initial_steps) x round_steps = {gd.total_steps} (stage 1 and {gd.num_rounds} rounds)")


def check_student(config: ml_collections.ConfigDict) -> None:
  """config.student and, for a LoRA student, config.lora (rank, alpha, targets) and the mode."""
  _one_of("student", config.student, STUDENTS)
  if config.student != "lora":
    return
  if config.mode != "lcd":
    raise LcmJaxError(f"config.student='lora' distils an adapter from the teacher: it needs mode 'lcd', "
                      f"got {config.mode!r}")
  if config.init_from:
    raise LcmJaxError("config.init_from is set, but a LoRA student starts from a fresh adapter on the "
                      "teacher; leave init_from empty")
  from lcm_jax.lora import lora_scale
  try:
    lora_scale(config.lora.rank, config.lora.alpha)
  except LcmJaxError as e:
    raise LcmJaxError(f"config.lora: {e}") from None
  targets = config.lora.targets
  if (isinstance(targets, str) or not isinstance(targets, (tuple, list)) or not targets
      or any(not isinstance(t, str) or not t for t in targets)):
    raise LcmJaxError(f"config.lora.targets must be a non-empty list of module names (e.g. "
                      f"{', '.join(LORA_TARGETS[:3])}), got {targets!r}")


def guided_distill_config(config: ml_collections.ConfigDict, guidance_embedding_dim: int):
  """The `lcm_jax.guided_distill.GuidedDistillConfig` of `config.guided_distill` and the omega range."""
  from lcm_jax.guided_distill import GuidedDistillConfig
  g = config.guided_distill
  return GuidedDistillConfig(stage1_steps=g.stage1_steps, round_steps=g.round_steps, initial_steps=g.initial_steps,
                             omega_min=config.loss.omega_min, omega_max=config.loss.omega_max,
                             guidance_embedding_dim=guidance_embedding_dim)


def loss_config(config: ml_collections.ConfigDict, guidance_embedding_dim: int):
  """The `lcm_jax.losses.ConsistencyLossConfig` of `config.loss` (validated by its constructor)."""
  from lcm_jax.losses import ConsistencyLossConfig
  c = config.loss
  return ConsistencyLossConfig(
      solver=c.solver, skipping_step=c.skipping_step, omega_min=c.omega_min, omega_max=c.omega_max,
      distance=c.distance, huber_c=c.huber_c, timestep_scaling=c.timestep_scaling,
      guidance_embedding_dim=guidance_embedding_dim, caption_dropout=c.caption_dropout,
      lcf_data_anchor=c.get("lcf_data_anchor", 0.0))
