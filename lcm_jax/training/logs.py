"""What a run reports: TensorBoard scalars and images in the workdir, and console lines."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np

from lcm_jax.errors import LcmJaxError


class MetricWriter:
  """TensorBoard scalars and images in the workdir (process 0 only; a no-op elsewhere)."""

  def __init__(self, workdir: str, enabled: bool):
    self._writer = None
    if enabled:
      try:
        from tensorboardX import SummaryWriter
      except ImportError:
        raise LcmJaxError("TensorBoard logging needs tensorboardX: pip install tensorboardX") from None
      self._writer = SummaryWriter(logdir=workdir, flush_secs=30)

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    if self._writer:
      for name, value in values.items():
        self._writer.add_scalar(name, float(value), step)

  def image(self, step: int, name: str, image: np.ndarray) -> None:
    if self._writer:
      self._writer.add_image(name, image, step, dataformats="HWC")

  def close(self) -> None:
    if self._writer:
      self._writer.close()


def mean_metrics(pending: list[dict]) -> dict[str, float]:
  """Averages a list of per-step metric dicts (device scalars) on the host."""
  host = jax.device_get(pending)
  return {k: float(np.mean([m[k] for m in host])) for k in host[0]}


def console(is_main: bool):
  """print(..., flush=True) on process 0, nothing elsewhere."""
  return (lambda *a: print(*a, flush=True)) if is_main else (lambda *a: None)
