"""A training run's workdir: Orbax checkpoints, preemption, and models read back out of it.

Layout of a workdir (written by `python -m lcm_jax.train`):

    WORKDIR/
      config.json              the run's config (also inside every checkpoint)
      model/                   a diffusers `LatentConsistencyModelPipeline` folder without UNet
                               weights: model_index.json, unet/config.json (with
                               time_cond_proj_dim), scheduler/ (LCMScheduler), and the base
                               pipeline's vae/, text_encoder/, tokenizer/ (hard links or copies)
      checkpoints/<step>/      Orbax: params, target_params (EMA), train (step, rng, optimiser
                               state), config (JSON), data (the data iterator, one file per process)
      samples/step_XXXXXXX.png sample grids
      events.out.tfevents.*    TensorBoard

`pipeline_from_workdir(workdir)` turns a workdir into a whole `lcm_jax.pipeline.Pipeline` (UNet
from the latest checkpoint), which `lcm_jax.pipeline.save_pipeline` writes as a diffusers folder.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from lcm_jax.errors import LcmJaxError
from lcm_jax.pipeline import read_json

CHECKPOINT_DIR = "checkpoints"
MODEL_DIR = "model"
# Extra facts about model/ that diffusers does not need (it ignores unknown files).
MODEL_INFO_FILE = "lcm_jax.json"
PARAMS_CHOICES = {"ema": "target_params", "online": "params"}
# Checkpoint items holding arrays. The UNets are items of their own, so that sampling and
# export read one of them without the optimiser state.
STATE_ITEMS = ("params", "target_params", "train")

# LCMScheduler's constructor arguments: the keys its scheduler_config.json may carry.
LCM_SCHEDULER_KEYS = (
    "num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
    "original_inference_steps", "clip_sample", "clip_sample_range", "set_alpha_to_one",
    "steps_offset", "prediction_type", "thresholding", "dynamic_thresholding_ratio",
    "sample_max_value", "timestep_spacing", "timestep_scaling", "rescale_betas_zero_snr")


# ---------------------------------------------------------------------------------------
# The data iterator inside an Orbax checkpoint.

class DataIteratorHandler(ocp.CheckpointHandler):
  """Saves and restores a data iterator's state, one JSON file per process.

  The iterator needs `get_state()` and `set_state(state)`; the state is a JSON-able value or
  bytes (grain's `DataLoader` iterator gives bytes, its `DatasetIterator` a dict). Every
  process writes its own file, because each reads its own shard of the data.
  """

  def save(self, directory: epath.Path, args: "DataIteratorSave"):
    state = args.item.get_state()
    record = ({"bytes": state.decode()} if isinstance(state, bytes) else {"json": state})
    path = epath.Path(directory) / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    path.write_text(json.dumps(record))

  def restore(self, directory: epath.Path, args: "DataIteratorRestore"):
    path = epath.Path(directory) / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    if not path.exists():
      raise LcmJaxError(f"{path} is missing: the checkpoint was written by a run with another "
                        f"number of processes ({jax.process_count()} now)")
    record = json.loads(path.read_text())
    args.item.set_state(record["bytes"].encode() if "bytes" in record else record["json"])
    return args.item

  def metadata(self, directory: epath.Path):
    return None

  def finalize(self, directory: epath.Path):
    pass

  def close(self):
    pass


@ocp.args.register_with_handler(DataIteratorHandler, for_save=True)
@dataclasses.dataclass
class DataIteratorSave(ocp.args.CheckpointArgs):
  item: Any


@ocp.args.register_with_handler(DataIteratorHandler, for_restore=True)
@dataclasses.dataclass
class DataIteratorRestore(ocp.args.CheckpointArgs):
  item: Any


# ---------------------------------------------------------------------------------------
# Saving and restoring the train state.

def checkpoint_dir(workdir: str) -> str:
  return os.path.join(workdir, CHECKPOINT_DIR)


def make_manager(workdir: str, keep: int = 3, *, read_only: bool = False) -> ocp.CheckpointManager:
  """An async Orbax `CheckpointManager` on `workdir/checkpoints` that keeps the last `keep`."""
  if read_only:  # the options Orbax would otherwise reset, warning about each
    options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0,
                                           max_to_keep=None, enable_async_checkpointing=False)
  else:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True)
  handlers = {name: ocp.StandardCheckpointHandler() for name in STATE_ITEMS}
  handlers.update(config=ocp.JsonCheckpointHandler(), data=DataIteratorHandler())
  verbosity = logging.get_verbosity()
  if read_only:
    logging.set_verbosity(logging.ERROR)  # Orbax warns that a read-only manager is read-only
  try:
    return ocp.CheckpointManager(os.path.abspath(checkpoint_dir(workdir)), options=options, item_handlers=handlers)
  finally:
    logging.set_verbosity(verbosity)


def latest_step(workdir: str) -> int | None:
  """The step of the newest finished checkpoint in `workdir`, or None."""
  if not os.path.isdir(checkpoint_dir(workdir)):
    return None
  manager = make_manager(workdir, read_only=True)
  try:
    return manager.latest_step()
  finally:
    manager.close()


def save_checkpoint(manager: ocp.CheckpointManager, state, config: Mapping[str, Any],
                    data_iterator=None) -> None:
  """Starts an async save of `state` (a `lcm_jax.train_step.TrainState`) at `state.step`.

  The arrays are copied off the devices before this returns, so the next (donating) step
  may run at once; the files are written in the background. The data iterator's state is
  taken now, so it must have yielded exactly the batches the state has trained on.
  """
  items = dict(
      params=ocp.args.StandardSave(state.params),
      target_params=ocp.args.StandardSave(state.target_params),
      train=ocp.args.StandardSave({"step": state.step, "rng": state.rng,
                                   "opt_state": state.opt_state}),
      config=ocp.args.JsonSave(dict(config)))
  if data_iterator is not None:
    items["data"] = DataIteratorSave(data_iterator)
  manager.save(int(jax.device_get(state.step)), args=ocp.args.Composite(**items), force=True)


def restore_checkpoint(manager: ocp.CheckpointManager, abstract_state, data_iterator=None,
                       step: int | None = None):
  """Restores the latest (or `step`) checkpoint straight into `abstract_state`'s shardings.

  Args:
    abstract_state: a `TrainState` of `jax.ShapeDtypeStruct`s carrying `.sharding` (from
      `jax.eval_shape` plus `train_state_shardings`); nothing is materialised twice.
    data_iterator: restored in place (its `set_state`) when given.
  Returns:
    (state, the saved config dict).
  """
  step = manager.latest_step() if step is None else step
  if step is None:
    raise LcmJaxError(f"no checkpoint in {manager.directory}")
  items = dict(
      params=ocp.args.StandardRestore(abstract_state.params),
      target_params=ocp.args.StandardRestore(abstract_state.target_params),
      train=ocp.args.StandardRestore({"step": abstract_state.step, "rng": abstract_state.rng,
                                      "opt_state": abstract_state.opt_state}),
      config=ocp.args.JsonRestore())
  if data_iterator is not None:
    items["data"] = DataIteratorRestore(data_iterator)
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  train = restored["train"]
  state = abstract_state.replace(step=train["step"], rng=train["rng"], opt_state=train["opt_state"],
                                 params=restored["params"], target_params=restored["target_params"])
  return state, restored["config"]


# ---------------------------------------------------------------------------------------
# Preemption.

class PreemptionWatcher:
  """Turns SIGTERM (what a preempted VM or a scheduler sends) and Ctrl-C into a flag the loop reads.

  The handler only sets the flag: the loop saves a checkpoint at the next step boundary and
  returns, so nothing is written from inside a signal handler. A second Ctrl-C interrupts at
  once (KeyboardInterrupt). Use as a context manager; the previous handlers come back on exit.
  """

  def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)):
    self.signals = signals
    self.requested = False
    self._previous: dict[int, Any] = {}

  def _handle(self, signum, frame):
    del frame
    if self.requested and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.requested = True
    print(f"received {signal.Signals(signum).name}: saving a checkpoint after this step", flush=True)

  def __enter__(self):
    for s in self.signals:
      self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc):
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    return False


# ---------------------------------------------------------------------------------------
# The model folder of a workdir.

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
                       info: Mapping[str, Any]) -> str:
  """Writes `workdir/model/`: everything of the trained pipeline except the UNet weights.

  Args:
    base_folder: the local diffusers folder whose vae/, text_encoder/ and tokenizer/ the
      model uses (the teacher's).
    base_model_index: its model_index.json.
    unet_config: the student's unet/config.json (with time_cond_proj_dim).
    scheduler_config: the LCMScheduler config (`lcm_scheduler_config`).
    info: extra facts kept in model/lcm_jax.json (e.g. the weights variant, the teacher).
  Returns:
    the folder's path.
  """
  out = os.path.join(workdir, MODEL_DIR)
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
  index.update(_class_name="LatentConsistencyModelPipeline", unet=["diffusers", "UNet2DConditionModel"],
               scheduler=["diffusers", "LCMScheduler"], safety_checker=[None, None],
               feature_extractor=[None, None], requires_safety_checker=False)
  for sub, name, content in (("", "model_index.json", index), ("unet", "config.json", unet_config),
                             ("scheduler", "scheduler_config.json", scheduler_config),
                             ("", MODEL_INFO_FILE, info)):
    os.makedirs(os.path.join(out, sub), exist_ok=True)
    with open(os.path.join(out, sub, name), "w") as f:
      json.dump(dict(content), f, indent=2, sort_keys=True)
  return out


def is_workdir(path: str) -> bool:
  """True if `path` looks like a training workdir (has model/ and checkpoints/)."""
  return (os.path.isdir(os.path.join(path, CHECKPOINT_DIR))
          and os.path.isfile(os.path.join(path, MODEL_DIR, "unet", "config.json")))


def load_workdir_unet(workdir: str, params: str = "ema", step: int | None = None,
                      dtype=jnp.float32) -> tuple[dict, dict]:
  """The student UNet of a workdir's latest (or `step`) checkpoint.

  Args:
    params: "ema" (the EMA target theta-, what the paper samples with) or "online" (the
      student the optimiser updates).
    dtype: the dtype of the returned parameters (restored on the first local device).
  Returns:
    (unet config dict with time_cond_proj_dim, parameter tree).
  Raises:
    LcmJaxError if `workdir` is not a workdir or has no checkpoint.
  """
  from lcm_jax.pipeline import abstract_params, build_module
  if params not in PARAMS_CHOICES:
    raise LcmJaxError(f"params must be one of {', '.join(PARAMS_CHOICES)}, got {params!r}")
  if not is_workdir(workdir):
    raise LcmJaxError(f"{workdir} is not a training workdir (no {MODEL_DIR}/unet/config.json "
                      f"and {CHECKPOINT_DIR}/)")
  config = read_json(os.path.join(workdir, MODEL_DIR, "unet", "config.json"))
  manager = make_manager(workdir, read_only=True)
  try:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise LcmJaxError(f"{workdir} has no finished checkpoint yet")
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype, sharding=device),
                            abstract_params(build_module("unet", config)))
    item = PARAMS_CHOICES[params]
    restored = manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.StandardRestore(abstract)}))
  finally:
    manager.close()
  return config, restored[item]


def pipeline_from_workdir(workdir: str, params: str = "ema", step: int | None = None, *,
                          dtype=jnp.float32, param_dtype=jnp.float32):
  """A whole `lcm_jax.pipeline.Pipeline` from a workdir: the checkpoint's UNet ("ema" or
  "online" parameters) with the workdir's model/ (VAE, text encoder, tokenizer, LCMScheduler
  config). `save_pipeline` writes it as a folder that diffusers'
  `LatentConsistencyModelPipeline.from_pretrained` loads.
  """
  from lcm_jax.pipeline import build_module, load_pipeline
  unet_config, unet_params = load_workdir_unet(workdir, params, step, dtype=param_dtype)
  folder = os.path.join(workdir, MODEL_DIR)
  info = read_json(os.path.join(folder, MODEL_INFO_FILE))
  pipe = load_pipeline(folder, dtype=dtype, param_dtype=param_dtype, variant=info.get("variant") or None,
                       components=("vae", "text_encoder", "tokenizer", "scheduler"))
  pipe.unet = build_module("unet", unet_config, dtype=dtype, param_dtype=param_dtype)
  pipe.params["unet"] = unet_params
  pipe.configs["unet"] = unet_config
  return pipe
