"""`python -m lcm_jax.train` end to end on CPU with tiny models (configs/tiny.py).

What is checked: a run straight to N steps and a run stopped at N/2 and restarted in the same
workdir train on the same batches in the same order and end with the same parameters,
EMA target and optimiser state; checkpoints are kept and pruned; TensorBoard events carry the
metrics; SIGTERM saves a checkpoint and exits cleanly, and the run resumes from it; a workdir
exports to a folder that diffusers' `LatentConsistencyModelPipeline` runs, giving the image
our sampler gives from the workdir; every bad input stops before compiling with one line
on stderr.

Compilation dominates the time: the runs share one JAX persistent compilation cache, so the
train step is compiled once and loaded from the cache afterwards.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import signal
import struct
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from lcm_jax import checkpoint as ckpt
from lcm_jax import training
from lcm_jax import workdir as workdir_lib
from lcm_jax.sd_pipeline import save_pipeline
from lcm_jax.training.batches import make_batch_preparation
from tests.helpers import REPO  # noqa: E402

TINY_CONFIG = os.path.join(REPO, "configs", "tiny.py")
STEPS = 4  # N: the straight run; the restarted run stops at N / 2
PROMPTS = ["a red circle", "a blue square"]


def load_tiny_config(**overrides):
  """configs/tiny.py's ConfigDict with dotted-key overrides ("optimizer.lr": 1e-3)."""
  spec = importlib.util.spec_from_file_location("tiny_config", TINY_CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def write_image_folder(folder: str, n: int = 6) -> str:
  """An `imagefolder` data set: n small random PNGs of different sizes + metadata.jsonl."""
  from PIL import Image
  rng = np.random.default_rng(0)
  words = ["red", "blue", "green", "circle", "square", "cat", "dog", "tree"]
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "metadata.jsonl"), "w") as f:
    for i in range(n):
      Image.fromarray((rng.random((18 + 2 * i, 24, 3)) * 255).astype(np.uint8)).save(os.path.join(folder, f"{i}.png"))
      f.write(json.dumps({"file_name": f"{i}.png", "text": " ".join(rng.choice(words, 3))}) + "\n")
  return folder


def read_event_tags(workdir: str) -> set[str]:
  """The scalar/image tags in a workdir's TensorBoard event files (TFRecord of Event protos)."""
  from tensorboardX.proto import event_pb2
  tags = set()
  for path in glob.glob(os.path.join(workdir, "events.out.tfevents.*")):
    with open(path, "rb") as f:
      data = f.read()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack("<Q", data[offset:offset + 8])
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      tags.update(v.tag for v in event.summary.value)
      offset += 12 + length + 4
  return tags


def leaves_equal(a, b, atol=1e-6) -> None:
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=atol), a, b)


@pytest.fixture(scope="module")
def setup(tiny_pipeline, tmp_path_factory):
  """(teacher folder, image folder, compilation cache folder) shared by the module's runs."""
  root = tmp_path_factory.mktemp("train")
  cache = str(root / "jax_cache")
  yield tiny_pipeline("sd1"), write_image_folder(str(root / "images")), cache
  jax.config.update("jax_compilation_cache_dir", None)  # leave no cache to the rest of the suite


def make_config(setup, **overrides):
  teacher, images, cache = setup
  return load_tiny_config(**{"teacher": teacher, "data.path": images, "compilation_cache_dir": cache,
                             "num_train_steps": STEPS, **overrides})


@pytest.fixture(scope="module")
def runs(setup, tmp_path_factory):
  """A run of N steps straight, and one stopped after N/2 and restarted (same config).

  Returns a dict: workdirs, final states, the batches each run trained on (in order).
  """
  root = tmp_path_factory.mktemp("runs")
  config = make_config(setup, sample_every=STEPS, sample_steps=(1, 2))
  out = {"straight": str(root / "straight"), "restarted": str(root / "restarted"),
         "batches_straight": [], "batches_restarted": []}
  record = lambda key: (lambda step, batch: out[key].append((step, {k: np.array(v) for k, v in batch.items()})))
  start = time.perf_counter()
  out["state_straight"] = training.train(config, out["straight"], on_batch=record("batches_straight"))
  out["state_half"] = jax.device_get(training.train(config, out["restarted"], stop_after_steps=STEPS // 2,
                                                     on_batch=record("batches_restarted")))
  out["latest_after_stop"] = workdir_lib.latest_step(out["restarted"])
  out["state_restarted"] = training.train(config, out["restarted"], on_batch=record("batches_restarted"))
  print(f"three runs in {time.perf_counter() - start:.1f}s")
  return out


def test_restart_gives_the_same_parameters_and_data_order(runs):
  assert runs["latest_after_stop"] == STEPS // 2
  assert int(runs["state_half"].step) == STEPS // 2
  straight, restarted = runs["batches_straight"], runs["batches_restarted"]
  assert [s for s, _ in straight] == [s for s, _ in restarted] == list(range(STEPS))
  for (_, a), (_, b) in zip(straight, restarted):
    assert sorted(a) == sorted(b)
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  # Different batches at every step: the order is a real check, not one batch repeated.
  assert not np.array_equal(straight[0][1]["pixels"], straight[1][1]["pixels"])
  s, r = runs["state_straight"], runs["state_restarted"]
  assert int(s.step) == int(r.step) == STEPS
  leaves_equal(s.params, r.params)
  leaves_equal(s.target_params, r.target_params)
  leaves_equal(s.opt_state, r.opt_state)
  np.testing.assert_array_equal(np.asarray(s.rng), np.asarray(r.rng))
  # And training moved the weights: the comparison above is not of two untouched copies.
  assert not np.allclose(np.asarray(runs["state_half"].params["conv_in"]["kernel"]),
                         np.asarray(s.params["conv_in"]["kernel"]))


def test_workdir_contents(runs):
  workdir = runs["straight"]
  manager = ckpt.make_manager(workdir_lib.checkpoint_dir(workdir), read_only=True)
  try:
    assert list(manager.all_steps()) == [2, 4]  # checkpoint_every 2, keep 2
  finally:
    manager.close()
  tags = read_event_tags(workdir)
  for tag in ("train/loss", "train/grad_norm", "train/lr", "train/omega", "perf/samples_per_sec",
              "perf/step_time", "data/skipped_records"):
    assert tag in tags, (tag, sorted(tags))
  grids = sorted(os.listdir(os.path.join(workdir, "samples")))
  assert grids == [f"step_{STEPS:07d}.png"]
  from PIL import Image
  assert Image.open(os.path.join(workdir, "samples", grids[0])).size == (2 * 16, 2 * 16)  # 2 steps x 2 prompts
  with open(os.path.join(workdir, "model", "unet", "config.json")) as f:
    assert json.load(f)["time_cond_proj_dim"] == 256
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["num_train_steps"] == STEPS
  # The workdir's UNets are the run's: "online" the student, "ema" the target.
  _, online = workdir_lib.load_unet(workdir, "online")
  _, ema = workdir_lib.load_unet(workdir, "ema")
  leaves_equal(online, runs["state_straight"].params, atol=0)
  leaves_equal(ema, runs["state_straight"].target_params, atol=0)


def test_a_finished_run_does_nothing_more(runs, setup):
  state = training.train(make_config(setup), runs["straight"])
  assert int(state.step) == STEPS


def test_export_runs_in_diffusers_latent_consistency_pipeline(runs, tmp_path):
  import torch
  from diffusers import LatentConsistencyModelPipeline

  from lcm_jax.text_to_image import TextToImage
  pipe = workdir_lib.load_pipeline_from_workdir(runs["straight"])
  out = str(tmp_path / "exported")
  save_pipeline(pipe, out)
  with open(os.path.join(out, "model_index.json")) as f:
    index = json.load(f)
  assert index["_class_name"] == "LatentConsistencyModelPipeline"
  assert index["scheduler"] == ["diffusers", "LCMScheduler"]
  ref_pipe = LatentConsistencyModelPipeline.from_pretrained(out)
  assert ref_pipe.unet.config.time_cond_proj_dim == 256
  assert type(ref_pipe.scheduler).__name__ == "LCMScheduler"
  ref_pipe.set_progress_bar_config(disable=True)
  latents = np.random.default_rng(3).standard_normal((len(PROMPTS), 4, 8, 8)).astype(np.float32)
  ref = ref_pipe(PROMPTS, num_inference_steps=1, guidance_scale=8.5, height=16, width=16,
                 latents=torch.from_numpy(latents), output_type="np").images
  ours = TextToImage(pipe)(PROMPTS, sampler="lcm", num_steps=1, guidance_scale=8.5, latents=latents)
  assert ours.shape == ref.shape == (len(PROMPTS), 16, 16, 3)
  assert np.max(np.abs(ours / 255.0 - ref)) <= 2 / 255


def _train_command(workdir, *flags):
  return [sys.executable, "-m", "lcm_jax.train", f"--config={TINY_CONFIG}", f"--workdir={workdir}", *flags]


def test_sigterm_saves_a_checkpoint_and_the_run_resumes(setup, tmp_path):
  teacher, images, cache = setup
  workdir = str(tmp_path / "preempted")
  proc = subprocess.Popen(
      _train_command(workdir, f"--config.teacher={teacher}", f"--config.data.path={images}",
                     f"--config.compilation_cache_dir={cache}", "--config.num_train_steps=100000",
                     "--config.checkpoint_every=100000"),
      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    for line in proc.stdout:  # wait until it trains
      if line.startswith("compiled"):
        break
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 0, stderr[-2000:]
  assert "stopped at step" in stdout
  saved = workdir_lib.latest_step(workdir)
  assert saved is not None and 1 <= saved < 100000
  state = training.train(make_config(setup, num_train_steps=saved + 1), workdir)
  assert int(state.step) == saved + 1
  assert workdir_lib.latest_step(workdir) == saved + 1


def test_bad_input_fails_before_compiling_with_one_line(setup, tmp_path):
  teacher, images, _ = setup
  good = [f"--config.teacher={teacher}", f"--config.data.path={images}"]
  cases = {
      "missing teacher": ([f"--config.teacher={tmp_path}/no_such_teacher", f"--config.data.path={images}"],
                          {}, "no_such_teacher"),
      "data matching nothing": ([f"--config.teacher={teacher}", f"--config.data.path={tmp_path}/no_such_data"],
                                {}, "no_such_data"),
      "bad resolution": (good + ["--config.resolution=18"], {}, "multiple of 4"),
      "batch not divisible": (good + ["--config.batch_size=6"],
                              {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}, "not divisible by the 4"),
      "unknown config key": (good + ["--config.resolutoin=16"], {}, "unknown config key --config.resolutoin"),
  }
  procs = {}
  for name, (flags, env, _) in cases.items():
    procs[name] = subprocess.Popen(_train_command(str(tmp_path / name.replace(" ", "_")), *flags), cwd=REPO,
                                   env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True)
  for name, proc in procs.items():
    stdout, stderr = proc.communicate(timeout=300)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert proc.returncode != 0, name
    assert len(lines) == 1 and lines[0].startswith("error: "), (name, stderr)
    assert cases[name][2] in lines[0], (name, lines[0])
    assert "compiling" not in stdout, name
    assert not os.path.isdir(os.path.join(str(tmp_path / name.replace(" ", "_")), "checkpoints")), name


def test_latent_cache_batches_prepare_the_same_latents_as_images(tiny_pipeline):
  """The step's batch preparation: images encoded in the step and the moments a latent cache
  stores (written by lcm_jax.data.cache's encoder) give the same latents and context for the
  same key, so latent-cache training equals on-the-fly training given the same draws."""
  from lcm_jax.data.cache import make_encoder
  from lcm_jax.load import load_pipeline
  from lcm_jax.tokenizer import tokenize
  pipe = load_pipeline(tiny_pipeline("sd1"))
  prepare = make_batch_preparation(pipe.vae, pipe.text_encoder, pipe.vae_scaling_factor)
  pixels = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  input_ids = tokenize(pipe.tokenizer, PROMPTS)
  frozen = {"vae": pipe.params["vae"], "text_encoder": pipe.params["text_encoder"]}
  rng = jax.random.PRNGKey(5)
  from_images = jax.jit(prepare)(frozen, {"pixels": pixels, "input_ids": input_ids}, rng)
  mean, logvar, context = make_encoder(pipe.vae, pipe.text_encoder)(frozen["vae"], frozen["text_encoder"],
                                                                    pixels, input_ids)
  from_cache = jax.jit(prepare)({}, {"latent_mean": np.asarray(mean), "latent_logvar": np.asarray(logvar),
                                     "context": np.asarray(context)}, rng)
  for k in ("latents", "context"):
    np.testing.assert_allclose(np.asarray(from_images[k]), np.asarray(from_cache[k]), rtol=0, atol=1e-6)
  # And the latents are a posterior draw times the scaling factor, not the mean.
  assert not np.allclose(np.asarray(from_images["latents"]), np.asarray(mean) * pipe.vae_scaling_factor)


def write_tar_shard(image_folder: str, path: str) -> str:
  """The image folder as one webdataset tar shard in img2dataset's layout (key.png, key.txt,
  key.json), records in the same order as metadata.jsonl."""
  import io
  import tarfile

  def add(tar, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))

  with open(os.path.join(image_folder, "metadata.jsonl")) as f, tarfile.open(path, "w") as tar:
    for i, line in enumerate(f):
      record = json.loads(line)
      with open(os.path.join(image_folder, record["file_name"]), "rb") as img:
        add(tar, f"{i:05d}.png", img.read())
      add(tar, f"{i:05d}.txt", record["text"].encode())
      add(tar, f"{i:05d}.json", b"{}")
  return path


def test_tar_shard_trains_on_the_same_batches_as_the_image_folder(runs, setup, tmp_path):
  """End to end on a webdataset tar shard holding the image folder's records in the same
  order: the same seed gives the same batches and the same parameters."""
  shard = write_tar_shard(setup[1], str(tmp_path / "shard-00000.tar"))
  config = make_config(setup, **{"data.format": "wds", "data.path": str(tmp_path / "shard-{00000..00000}.tar"),
                                 "num_train_steps": STEPS // 2})
  assert os.path.isfile(shard)
  batches = []
  state = training.train(config, str(tmp_path / "wds_run"),
                          on_batch=lambda step, batch: batches.append({k: np.array(v) for k, v in batch.items()}))
  assert len(batches) == STEPS // 2
  for ours, theirs in zip(batches, [b for _, b in runs["batches_straight"]]):
    for k in ("pixels", "input_ids"):
      np.testing.assert_array_equal(ours[k], theirs[k])
  leaves_equal(state.params, runs["state_half"].params)
  assert workdir_lib.latest_step(str(tmp_path / "wds_run")) == STEPS // 2
