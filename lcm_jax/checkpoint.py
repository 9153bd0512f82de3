"""Orbax checkpoints of a training run: the train state, the data iterator's position, preemption.

A checkpoint folder (`WORKDIR/checkpoints/`, see `lcm_jax.workdir`) holds one Orbax step
folder per saved step, with these items:

    params          the student (online) UNet parameters
    target_params   the EMA target theta- (what sampling and export use by default)
    train           step, rng and the optimiser state
    config          the run's config (JSON)
    data            the data iterator's state, one file per process

The UNets are items of their own so that sampling and export read one of them without the
optimiser state. This module knows nothing of the rest of a workdir.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from lcm_jax import jsonfile
from lcm_jax.errors import LcmJaxError

# Checkpoint items holding arrays.
STATE_ITEMS = ("params", "target_params", "train")
# The UNet items by the names users choose them with.
PARAMS_CHOICES = {"ema": "target_params", "online": "params"}


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
    if path.exists():
      args.item.set_state(self._read(path))
      return args.item
    # Written by another number of processes: an iterator that can resume from all of their
    # states (lcm_jax.data.TrainData) gets them; anything else cannot be carried over.
    others = sorted(epath.Path(directory).glob("process_*-of-*.json"),
                    key=lambda p: int(p.name.split("_")[1].split("-")[0]))
    if not others or not hasattr(args.item, "resume_from_processes"):
      raise LcmJaxError(f"{path} is missing: the checkpoint was written by a run with another "
                        f"number of processes ({jax.process_count()} now)")
    args.item.resume_from_processes([self._read(p) for p in others])
    return args.item

  @staticmethod
  def _read(path: epath.Path):
    jsonfile.check_size(str(path), path.stat().length)
    try:
      record = json.loads(path.read_text())
    except ValueError as e:
      raise LcmJaxError(f"{path} cannot be read as JSON: {e}") from None
    return record["bytes"].encode() if "bytes" in record else record["json"]

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

def make_manager(directory: str, keep: int = 3, *, read_only: bool = False) -> ocp.CheckpointManager:
  """An async Orbax `CheckpointManager` on the checkpoint folder `directory` that keeps the last `keep`."""
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
    return ocp.CheckpointManager(os.path.abspath(directory), options=options, item_handlers=handlers)
  finally:
    logging.set_verbosity(verbosity)


def latest_step(directory: str) -> int | None:
  """The step of the newest finished checkpoint in the checkpoint folder `directory`, or None."""
  if not os.path.isdir(directory):
    return None
  manager = make_manager(directory, read_only=True)
  try:
    return manager.latest_step()
  finally:
    manager.close()


def restore_params(directory: str, abstract_params: Any, params: str = "ema", step: int | None = None) -> Any:
  """One UNet item ("ema": the EMA target, "online": the student) of the latest (or `step`)
  checkpoint in `directory`, restored into `abstract_params`' shapes, dtypes and shardings
  (a tree of `jax.ShapeDtypeStruct` with `.sharding`), without reading the optimiser state."""
  if params not in PARAMS_CHOICES:
    raise LcmJaxError(f"params must be one of {', '.join(PARAMS_CHOICES)}, got {params!r}")
  manager = make_manager(directory, read_only=True)
  try:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise LcmJaxError(f"{directory} has no finished checkpoint yet")
    item = PARAMS_CHOICES[params]
    return manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.StandardRestore(abstract_params)}))[item]
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


def sync_processes(name: str) -> None:
  """Waits until every process reaches this point (a no-op with one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def restore_newest(manager: ocp.CheckpointManager, abstract_state, data_iterator=None, *,
                   warn=print, set_aside=None):
  """`restore_checkpoint` of the newest checkpoint that restores, falling back past damaged ones.

  A checkpoint that fails to restore (an item missing, a truncated array file, an empty step
  folder) gets one warning line naming what was wrong, is handed to `set_aside(step)` (e.g.
  moved out of the checkpoint folder, so that the resumed run can save that step again), and
  the previous one is tried.

  Returns:
    (state, the saved config dict, the step restored).
  Raises:
    LcmJaxError naming each step's problem if none restores.
  """
  problems = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      state, config = restore_checkpoint(manager, abstract_state, data_iterator, step=step)
      return state, config, step
    except Exception as e:  # noqa: BLE001  Orbax and tensorstore raise many types for damaged files
      reason = " ".join(str(e).split())[:300] or type(e).__name__
      problems.append(f"step {step}: {reason}")
      warn(f"warning: the checkpoint of step {step} cannot be restored ({reason}); trying the previous one")
      if set_aside is not None:
        set_aside(step)
  if not problems:
    raise LcmJaxError(f"no checkpoint in {manager.directory}")
  raise LcmJaxError(f"no checkpoint in {manager.directory} can be restored into this run's state: "
                    + "; ".join(problems))


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
