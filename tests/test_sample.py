"""Text-to-image (`lcm_jax.text_to_image`) and its CLI (`python -m lcm_jax.sample`) against
diffusers' pipelines on the tiny test pipelines.

Images are compared after the whole pipeline (text encoder, sampler loop, VAE decode,
postprocessing): ours are uint8, diffusers' `output_type="np"` floats in [0, 1]; the bound is
2/255 per pixel. Multistep LCM draws fresh noise at every step but the last; diffusers'
LCMScheduler draws it with `randn_tensor`, which the tests replace by the noise our sampler
draws for each image (from `split_sample_key(key)[1]`, split once per step), so multistep
results are compared exactly too.

Compilation dominates the run time, so each TextToImage is built once per flavour and
configurations are shared between tests (sizes 16x16 pixels, batch 2).
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import (
  DDIMScheduler,
  DPMSolverMultistepScheduler,
  LatentConsistencyModelPipeline,
  LCMScheduler,
  StableDiffusionPipeline,
)
from PIL import Image

from lcm_jax import text_to_image
from lcm_jax.errors import LcmJaxError
from lcm_jax.load import load_pipeline
from tests.helpers import REPO  # noqa: E402

PROMPTS = ["a red circle on the left", "a photo of a cat"]
SIZE = 16  # pixels; the tiny VAE's factor is 2, so latents are 8x8
SEED = 7
TOL = 2 / 255


@pytest.fixture(scope="module")
def t2i(tiny_pipeline):
  """flavour -> a TextToImage on the tiny pipeline of that flavour (built once)."""
  built = {}

  def get(flavour):
    if flavour not in built:
      built[flavour] = text_to_image.TextToImage(load_pipeline(tiny_pipeline(flavour)))
    return built[flavour]

  return get


def _latents_nchw(batch=len(PROMPTS), seed=0):
  return np.random.RandomState(seed).randn(batch, 4, SIZE // 2, SIZE // 2).astype(np.float32)


def _max_error(ours_uint8, ref_float):
  assert ours_uint8.dtype == np.uint8 and ours_uint8.shape == ref_float.shape
  return float(np.abs(ours_uint8 / 255.0 - ref_float).max())


class _InjectedNoise:
  """Stands in for diffusers' randn_tensor inside LCMScheduler.step: returns given arrays."""

  def __init__(self, noises):
    self.noises = list(noises)

  def __call__(self, shape, generator=None, device=None, dtype=None, layout=None):
    noise = torch.from_numpy(self.noises.pop(0)).to(dtype)
    assert tuple(noise.shape) == tuple(shape)
    return noise


def _our_lcm_noises(num_steps, batch=len(PROMPTS), seed=SEED):
  """[steps - 1] NCHW noises: what our LCM sampler adds after each step but the last."""
  keys = text_to_image.sample_keys(seed, np.arange(batch))
  per_image = []
  for i in range(batch):
    step_keys = jax.random.split(text_to_image.split_sample_key(keys[i])[1], num_steps)
    # lcm_sample runs on a batch of one per image and draws normal(key, z.shape) per step.
    per_image.append([np.asarray(jax.random.normal(k, (1, SIZE // 2, SIZE // 2, 4), jnp.float32))[0]
                      for k in step_keys])
  return [np.stack([per_image[i][s].transpose(2, 0, 1) for i in range(batch)])
          for s in range(num_steps - 1)]


# ---- parity with diffusers -------------------------------------------------------------


# Multistep with v-prediction; the 1-step configuration is shared with the CLI test.
@pytest.mark.parametrize("flavour,num_steps", [("sd1_lcm", 1), ("sd2_lcm", 4)])
def test_lcm_matches_latent_consistency_pipeline(t2i, tiny_pipeline, flavour, num_steps, monkeypatch):
  latents = _latents_nchw()
  ours = t2i(flavour)(PROMPTS, sampler="lcm", num_steps=num_steps, guidance_scale=8.5,
                      latents=latents, seed=SEED)
  path = tiny_pipeline(flavour)
  ref_pipe = LatentConsistencyModelPipeline.from_pretrained(path, safety_checker=None,
                                                            requires_safety_checker=False)
  ref_pipe.scheduler = LCMScheduler.from_config(ref_pipe.scheduler.config)
  ref_pipe.set_progress_bar_config(disable=True)
  monkeypatch.setattr("diffusers.schedulers.scheduling_lcm.randn_tensor",
                      _InjectedNoise(_our_lcm_noises(num_steps)))
  ref = ref_pipe(PROMPTS, num_inference_steps=num_steps, guidance_scale=8.5, height=SIZE, width=SIZE,
                 latents=torch.from_numpy(latents), output_type="np").images
  assert _max_error(ours, ref) <= TOL


@pytest.mark.parametrize("flavour,sampler", [
    ("sd1", "ddim"), ("sd2", "dpm_solver_pp"),
    # A guidance-embedded UNet: StableDiffusionPipeline runs no CFG and embeds w = g - 1.
    ("sd1_lcm", "ddim"),
])
def test_teacher_samplers_match_stable_diffusion_pipeline(t2i, tiny_pipeline, flavour, sampler):
  latents = _latents_nchw(seed=1)
  ours = t2i(flavour)(PROMPTS, sampler=sampler, num_steps=2, guidance_scale=7.5, latents=latents)
  path = tiny_pipeline(flavour)
  ref_pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None,
                                                     requires_safety_checker=False)
  # The DPM scheduler's defaults (algorithm_type dpmsolver++) are what dpm_solver_pp runs.
  cls = {"ddim": DDIMScheduler, "dpm_solver_pp": DPMSolverMultistepScheduler}[sampler]
  ref_pipe.scheduler = cls.from_config(ref_pipe.scheduler.config)
  ref_pipe.set_progress_bar_config(disable=True)
  ref = ref_pipe(PROMPTS, num_inference_steps=2, guidance_scale=7.5, height=SIZE, width=SIZE,
                 latents=torch.from_numpy(latents), output_type="np").images
  assert _max_error(ours, ref) <= TOL


# ---- compilation, keys, validation ---------------------------------------------------


def test_second_call_reuses_the_compiled_function(t2i):
  gen = t2i("sd1_lcm")
  first = gen(PROMPTS, num_steps=1, seed=0)
  compiled, traces = gen.num_compiled, gen.traces
  compile_events = []

  def listener(event, duration, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
      compile_events.append(event)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    # Other prompts, seed and guidance scale; same sampler, steps, batch and size.
    second = gen(["a blue square", "a green star"], num_steps=1, seed=1, guidance_scale=3.0)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert compile_events == []  # no XLA compilation at all, small helpers included
  assert (gen.num_compiled, gen.traces) == (compiled, traces)
  assert first.shape == second.shape == (2, SIZE, SIZE, 3) and not np.array_equal(first, second)


def test_keys_and_latents_are_per_image():
  latents = np.asarray(text_to_image.initial_latents(text_to_image.sample_keys(SEED, [0, 1, 2]), (4, 4, 4)))
  other = np.asarray(text_to_image.initial_latents(text_to_image.sample_keys(SEED, [1, 2, 9]), (4, 4, 4)))
  np.testing.assert_array_equal(latents[1:], other[:2])  # image i's latents depend on (seed, i) only
  assert latents.shape == (3, 4, 4, 4) and latents.dtype == np.float32
  assert abs(latents.std() - 1) < 0.2


def test_lcm_schedule_equals_lcm_scheduler_from_config(t2i):
  gen = t2i("sd1_lcm")
  ref = LCMScheduler.from_config(gen.pipe.scheduler_config)
  s = gen.schedule
  assert s.original_inference_steps == ref.config.original_inference_steps == 50
  assert s.timestep_scaling == ref.config.timestep_scaling == 10.0
  assert not s.clip_sample and ref.config.clip_sample is False
  assert s.prediction_type == ref.config.prediction_type
  np.testing.assert_array_equal(np.asarray(s.alphas_cumprod), ref.alphas_cumprod.numpy())


@pytest.mark.parametrize("kwargs,match", [
    (dict(sampler="euler"), "unknown sampler"),
    (dict(sampler="lcm", num_steps=51), "original_inference_steps"),
    (dict(num_steps=0), "positive integer"),
    (dict(height=15), "multiple of 2"),
    (dict(latents=np.zeros((2, 4, 4, 4), np.float32)), "NCHW"),
    (dict(latents=np.zeros((1, 4, 8, 8), np.float32)), "one per prompt"),
    (dict(latents=np.zeros((2, 4, 8, 8), np.float64)), "float32"),
])
def test_bad_input_raises(t2i, kwargs, match):
  with pytest.raises(LcmJaxError, match=match):
    t2i("sd1_lcm")(PROMPTS, **kwargs)


def test_default_size_and_vae_factor(t2i):
  pipe = t2i("sd1_lcm").pipe
  assert text_to_image.vae_scale_factor(pipe) == 2  # two VAE blocks, not SD's 8
  assert text_to_image.default_size(pipe) == (SIZE, SIZE)  # sample_size 8 x 2


# ---- the CLI ----------------------------------------------------------------------------


def _cli(args, **popen):
  env = dict(os.environ, PYTHONPATH=REPO, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
  return subprocess.Popen([sys.executable, "-m", "lcm_jax.sample", *args], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def test_cli_writes_images_equal_to_the_library(t2i, tiny_pipeline, tmp_path):
  prompts = PROMPTS + ["a yellow star"]
  prompts_file = tmp_path / "prompts.txt"
  prompts_file.write_text("\n".join(prompts) + "\n\n")  # a trailing blank line is skipped
  out = tmp_path / "out"
  proc = _cli(["--model", tiny_pipeline("sd1_lcm"), "--prompts_file", str(prompts_file), "--steps", "1",
               "--batch_size", "2", "--seed", str(SEED), "--output", str(out)])
  # While it runs: the library on the same seed; batch 2 as the CLI's batches.
  gen = t2i("sd1_lcm")
  first = gen(prompts[:2], num_steps=1, seed=SEED)
  last = gen([prompts[2], prompts[2]], num_steps=1, seed=SEED, indices=[2, 3])  # the padded batch
  stdout, stderr = proc.communicate(timeout=1200)
  assert proc.returncode == 0, stderr
  assert sorted(os.listdir(out)) == ["000.png", "001.png", "002.png", "grid.png"]
  written = [np.asarray(Image.open(out / f"{i:03d}.png")) for i in range(3)]
  for image in written:
    assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8
  np.testing.assert_array_equal(written[0], first[0])
  np.testing.assert_array_equal(written[1], first[1])
  np.testing.assert_array_equal(written[2], last[0])
  grid = np.asarray(Image.open(out / "grid.png"))
  assert grid.shape == (2 * SIZE, 2 * SIZE, 3)  # 3 images in a 2x2 grid
  np.testing.assert_array_equal(grid[SIZE:, :SIZE], written[2])
  assert "per image" in stdout and "compile time" in stdout


def test_cli_bad_input_gives_one_error_line(tiny_pipeline, tmp_path):
  model = tiny_pipeline("sd1_lcm")
  out = str(tmp_path / "out")
  np.save(tmp_path / "shape.npy", np.zeros((1, 4, 4, 4), np.float32))
  np.save(tmp_path / "count.npy", np.zeros((2, 4, 8, 8), np.float32))
  np.save(tmp_path / "dtype.npy", np.zeros((1, 4, 8, 8), np.float64))
  base = ["--model", model, "--prompt", "a cat", "--output", out]
  cases = {
      "unknown sampler": base + ["--sampler", "euler"],
      "lcm steps": base + ["--steps", "51"],
      "height": base + ["--height", "15"],
      "dtype flag": base + ["--dtype", "fp8"],
      "missing model": ["--model", str(tmp_path / "nope"), "--prompt", "a cat", "--output", out],
      "no model flag": ["--prompt", "a cat", "--output", out],
      "prompts file": ["--model", model, "--prompts_file", str(tmp_path / "nope.txt"), "--output", out],
      "no prompts": ["--model", model, "--output", out],
      "latents shape": base + ["--latents", str(tmp_path / "shape.npy")],
      "latents count": base + ["--latents", str(tmp_path / "count.npy")],
      "latents dtype": base + ["--latents", str(tmp_path / "dtype.npy")],
      "latents file": base + ["--latents", str(tmp_path / "nope.npy")],
  }
  procs = {name: _cli(args) for name, args in cases.items()}  # in parallel: each starts Python + JAX
  for name, proc in procs.items():
    _, stderr = proc.communicate(timeout=1200)
    lines = stderr.strip().splitlines()
    assert proc.returncode == 2, (name, stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), (name, stderr)
  assert not os.path.exists(out)  # nothing written on bad input
