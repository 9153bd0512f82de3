"""The training loop: steps, metrics, sample grids, checkpoints and stopping, until the last step.

The host runs one step ahead of the devices: after dispatching step s it waits for step
s - 1 only (its metrics), so the next batch is read while step s computes, and the progress
bar counts completed steps, not dispatched ones. Processes do not wait for each other on the
host during a step: whether to stop (a preemption seen by any process) is agreed through the
coordinator's key-value store without a barrier (`StopVote`), so every process stops after
the same step; the skipped-record count is gathered at log points only.

A step's checkpoint is saved before the next batch is read, so the saved data position is
exactly the batches the saved state has trained on.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from lcm_jax import checkpoint
from lcm_jax.train_step import TrainState
from lcm_jax.training.batches import next_batch
from lcm_jax.training.logs import MetricWriter, SkipLog, mean_metrics


class StopVote:
  """Whether any process was asked to stop, agreed without waiting for the other processes.

  A process asked to stop writes a key for the step it is about to dispatch into the
  coordinator's key-value store (`jax.distributed`); once that step has completed on a
  process, it lists the keys of that step. No process can complete a step before every
  process has dispatched it (the step's gradient reduction spans all processes), so by then
  every key of that step is written: all processes read the same answer for each step,
  without a barrier. With one process the request itself is the answer.
  """

  _runs = itertools.count()  # every process counts the same runs, so keys never clash

  def __init__(self):
    self._client = coordinator_client()
    self._prefix = f"lcm_jax/stop/{next(self._runs)}"

  def meet(self, timeout_s: int = 1800) -> None:
    """Waits until every process is here (before the first step). Processes finish loading
    and compiling at different times, and on CPU (gloo) a collective's first use fails if a
    process is more than 30 s late; the coordinator's barrier has no such limit."""
    if self._client is not None:
      self._client.wait_at_barrier(f"{self._prefix}/start", timeout_in_ms=timeout_s * 1000)

  def cast(self, step: int, requested: bool) -> bool:
    """Records this process's request before it dispatches `step`; returns it."""
    if requested and self._client is not None:
      self._client.key_value_set(f"{self._prefix}/{step}/{jax.process_index()}", "1")
    return requested

  def read(self, step: int, requested: bool) -> bool:
    """After `step` has completed here: did any process ask to stop before dispatching it?
    (Always False with several processes but no coordinator, as on a TPU pod whose runtime
    joined the hosts without `jax.distributed`: they agree at log points instead.)"""
    if self._client is None:
      return requested and jax.process_count() == 1
    return bool(self._client.key_value_dir_get(f"{self._prefix}/{step}/"))


def coordinator_client():
  """The `jax.distributed` coordinator's client (as Orbax uses it), or None with one process."""
  if jax.process_count() == 1:
    return None
  from jax._src import distributed
  return distributed.global_state.client


@dataclasses.dataclass
class InFlight:
  """A dispatched step: its number, its metrics (device arrays) and this process's stop request."""
  step: int
  metrics: Any
  requested: bool


@dataclasses.dataclass
class Loop:
  """What the loop needs besides the state.

  Attributes:
    step_fn: the compiled step, (state, frozen arrays, device batch) -> (state, metrics).
    frozen_arrays: the frozen inputs of the step (teacher, VAE, text encoder, uncond context).
    to_device: host batch -> the step's global device batch.
    data_iter, data_state: the data iterator, and what holds its checkpointable state.
    manager: the Orbax checkpoint manager.
    write_samples: (step, target params) -> None, or None when no grids are drawn.
    progress: a tqdm bar (disabled off process 0), advanced as steps complete.
    skip_log: where the records skipped by each step's batch go (`data_iter.take_skipped`).
  """
  config: ml_collections.ConfigDict
  config_json: Mapping[str, Any]
  step_fn: Callable
  frozen_arrays: dict
  to_device: Callable[[dict], dict]
  data_iter: Any
  data_state: Any
  manager: Any
  metric_writer: MetricWriter
  write_samples: Callable[[int, Any], None] | None
  progress: Any
  log: Callable[..., None]
  skip_log: SkipLog | None = None
  _in_flight: list = dataclasses.field(default_factory=list)
  _completed: list = dataclasses.field(default_factory=list)  # host metrics since the last log
  _last_log: tuple[float, int] = (0.0, 0)
  _vote: StopVote | None = None
  _stop_agreed: bool = False

  def run(self, state: TrainState, host_batch: dict, preemption, *, stop_after_steps: int | None = None,
          on_batch: Callable[[int, Mapping[str, np.ndarray]], None] | None = None) -> TrainState:
    """Steps from `state` (whose next batch is `host_batch`) to config.num_train_steps, or
    until a preemption or `stop_after_steps` steps of this call, saving a checkpoint there."""
    config = self.config
    step = int(jax.device_get(state.step))
    self._vote = StopVote()
    self._vote.meet()
    self._last_log = (time.perf_counter(), step)
    skipped, steps_this_run = 0, 0
    while True:
      if on_batch is not None:
        on_batch(step, host_batch)
      skipped = int(host_batch.get("num_skipped", skipped))  # this process's total since the run began
      self._log_skips(step + 1)
      requested = self._vote.cast(step + 1, preemption.requested)
      state, metrics = self.step_fn(state, self.frozen_arrays, self.to_device(host_batch))
      step += 1
      steps_this_run += 1
      self._in_flight.append(InFlight(step, metrics, requested))
      last = step == config.num_train_steps
      log = step % config.log_every == 0 or last
      self._complete(keep=0 if log else 1)  # one step behind, or all of them at a log point
      if log:
        self._write_metrics(step, skipped, preemption.requested)
      if self.write_samples and (step % config.sample_every == 0 or last):
        self.write_samples(step, state.target_params)
      stop = self._stop_agreed or steps_this_run == stop_after_steps
      if step % config.checkpoint_every == 0 or last or stop:
        checkpoint.save_checkpoint(self.manager, state, self.config_json, self.data_state)
      if stop or last:
        self._complete(keep=0)
        if stop:
          self.log(f"stopped at step {step} with a checkpoint; rerun with the same workdir to resume")
        return state
      host_batch = next_batch(self.data_iter, step)

  def _log_skips(self, step: int) -> None:
    """Names the records skipped by the batch of `step` (the one just read) in the skip log."""
    take = getattr(self.data_iter, "take_skipped", None)
    if self.skip_log is not None and take is not None:
      self.skip_log.add(step, take())

  def _complete(self, keep: int) -> None:
    """Waits for the dispatched steps but the last `keep`: their metrics come to the host,
    the processes' stop requests for them are read, and the progress bar advances."""
    while len(self._in_flight) > keep:
      done = self._in_flight.pop(0)
      self._completed.append(jax.device_get(done.metrics))
      self._stop_agreed = self._vote.read(done.step, done.requested) or self._stop_agreed
      self.progress.update(1)

  def _write_metrics(self, step: int, skipped: int, requested: bool) -> None:
    """Averages the completed steps' metrics (all steps up to `step` have completed) and
    writes them with the step time, throughput and skipped-record count. With several
    processes this is the one exchange between them on the host, at log points only: the
    skipped counts, and the stop requests (the agreement where `StopVote` has no coordinator)."""
    values = mean_metrics(self._completed)
    now = time.perf_counter()
    step_time = (now - self._last_log[0]) / max(1, step - self._last_log[1])
    self._last_log, self._completed = (now, step), []
    skipped_all = skipped
    if jax.process_count() > 1:
      gathered = np.asarray(multihost_utils.process_allgather(np.array([skipped, int(requested)], np.int64)))
      skipped_all = int(gathered[..., 0].sum())
      self._stop_agreed = self._stop_agreed or bool(gathered[..., 1].any())
    scalars = {f"train/{k}": v for k, v in values.items()}
    scalars.update({"perf/samples_per_sec": self.config.batch_size / step_time, "perf/step_time": step_time,
                    "data/skipped_records": skipped_all})
    self.metric_writer.scalars(step, scalars)
    if self.skip_log is not None:
      self.skip_log.report(skipped_all)
    self.progress.set_postfix(loss=f"{values['loss']:.4g}", samples_s=f"{self.config.batch_size / step_time:.3g}")
