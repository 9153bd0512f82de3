"""The training loop: steps, metrics, sample grids, checkpoints and stopping, until the last step.

A step's checkpoint is saved before the next batch is read, so the saved data position is
exactly the batches the saved state has trained on.
"""

from __future__ import annotations

import dataclasses
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
from lcm_jax.training.logs import MetricWriter, mean_metrics


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
    progress: a tqdm bar (disabled off process 0).
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
  _pending: list = dataclasses.field(default_factory=list)
  _last_log: tuple[float, int] = (0.0, 0)

  def run(self, state: TrainState, host_batch: dict, preemption, *, stop_after_steps: int | None = None,
          on_batch: Callable[[int, Mapping[str, np.ndarray]], None] | None = None) -> TrainState:
    """Steps from `state` (whose next batch is `host_batch`) to config.num_train_steps, or
    until a preemption or `stop_after_steps` steps of this call, saving a checkpoint there."""
    config = self.config
    step = int(jax.device_get(state.step))
    self._last_log = (time.perf_counter(), step)
    skipped, steps_this_run = 0, 0
    while True:
      if on_batch is not None:
        on_batch(step, host_batch)
      skipped = int(host_batch.get("num_skipped", skipped))  # this process's total since the run began
      state, metrics = self.step_fn(state, self.frozen_arrays, self.to_device(host_batch))
      step += 1
      steps_this_run += 1
      self._pending.append(metrics)
      self.progress.update(1)
      if step % config.log_every == 0 or step == config.num_train_steps:
        self._write_metrics(step, skipped)
      if self.write_samples and (step % config.sample_every == 0 or step == config.num_train_steps):
        self.write_samples(step, state.target_params)
      stop = agree_to_stop(preemption.requested) or steps_this_run == stop_after_steps
      if step % config.checkpoint_every == 0 or step == config.num_train_steps or stop:
        checkpoint.save_checkpoint(self.manager, state, self.config_json, self.data_state)
      if stop:
        self.log(f"stopped at step {step} with a checkpoint; rerun with the same workdir to resume")
      if stop or step == config.num_train_steps:
        return state
      host_batch = next_batch(self.data_iter, step)

  def _write_metrics(self, step: int, skipped: int) -> None:
    """Averages the pending steps' metrics (waiting for them, so the timings are real) and
    writes them with the step time, throughput and skipped-record count."""
    values = mean_metrics(self._pending)
    now = time.perf_counter()
    step_time = (now - self._last_log[0]) / (step - self._last_log[1])
    self._last_log, self._pending = (now, step), []
    skipped_all = (int(np.sum(multihost_utils.process_allgather(np.int64(skipped))))
                   if jax.process_count() > 1 else skipped)
    scalars = {f"train/{k}": v for k, v in values.items()}
    scalars.update({"perf/samples_per_sec": self.config.batch_size / step_time, "perf/step_time": step_time,
                    "data/skipped_records": skipped_all})
    self.metric_writer.scalars(step, scalars)
    self.progress.set_postfix(loss=f"{values['loss']:.4g}", samples_s=f"{self.config.batch_size / step_time:.3g}")


def agree_to_stop(requested: bool) -> bool:
  """True on every process if any process was asked to stop: all must save at the same step."""
  if jax.process_count() > 1:
    return bool(np.max(multihost_utils.process_allgather(np.int32(requested))))
  return requested
