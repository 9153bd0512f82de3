"""Progress bars of loading and exporting pipelines (issue 17 item 5): shown on a terminal,
counting every byte once (each bar ends with its count equal to its total, the weight files'
size when loading), off where stderr is not a terminal."""

from __future__ import annotations

import io
import os
import sys

from lcm_jax import sd_pipeline
from lcm_jax.load import load_pipeline
from lcm_jax.sd_pipeline import save_pipeline


class FakeTerminal(io.StringIO):
  def isatty(self):
    return True


def test_load_and_export_show_byte_progress(tiny_pipeline, tmp_path, monkeypatch):
  terminal = FakeTerminal()
  monkeypatch.setattr(sys, "stderr", terminal)
  bars = {}
  real = sd_pipeline.progress_bar

  def recording(total, desc):
    bars[desc] = real(total, desc)
    return bars[desc]

  monkeypatch.setattr(sd_pipeline, "progress_bar", recording)
  folder = tiny_pipeline("sd1")
  pipe = load_pipeline(folder)
  save_pipeline(pipe, str(tmp_path / "out"), dtype="fp16")
  assert set(bars) == {"loading unet", "loading vae", "loading text_encoder", "writing"}
  for desc, bar in bars.items():
    assert bar.n == bar.total > 0, desc
    assert desc in terminal.getvalue()
  # Loading counts the bytes of the weight files (less their headers).
  unet_file = os.path.getsize(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"))
  assert 0.95 * unet_file < bars["loading unet"].total <= unet_file
  written = sum(os.path.getsize(os.path.join(tmp_path, "out", c, f)) for c, f in (
      ("unet", "diffusion_pytorch_model.safetensors"), ("vae", "diffusion_pytorch_model.safetensors"),
      ("text_encoder", "model.safetensors")))
  assert 0.95 * written < bars["writing"].total <= written


def test_no_progress_when_stderr_is_not_a_terminal(tiny_pipeline, tmp_path, monkeypatch):
  captured = io.StringIO()
  monkeypatch.setattr(sys, "stderr", captured)
  save_pipeline(load_pipeline(tiny_pipeline("sd1")), str(tmp_path / "out"))
  assert "loading" not in captured.getvalue() and "writing" not in captured.getvalue()
