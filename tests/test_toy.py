"""The toy reproduction's pieces on a small budget: the domain, the shipped teacher, the metrics
and the evaluation table (nothing is re-trained)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from lcm_jax.toy import METRIC_DIR, TEACHER_DIR, domain
from tests.helpers import REPO  # noqa: E402

TEACHER, METRIC = TEACHER_DIR, METRIC_DIR


# ---------------------------------------------------------------------------------------
# The domain


def test_domain_is_deterministic_per_seed_and_index():
  a, attrs_a = domain.batch(3, 0, 12)
  b, attrs_b = domain.batch(3, 0, 12)
  np.testing.assert_array_equal(a, b)
  assert attrs_a == attrs_b
  # Sample i does not depend on how many samples are drawn.
  image, attrs = domain.sample(3, 7)
  np.testing.assert_array_equal(image, a[7])
  assert attrs == attrs_a[7]
  c, _ = domain.batch(4, 0, 12)
  assert not np.array_equal(a, c)


def _nearest_colour(rgb: np.ndarray) -> str:
  return min(domain.PALETTE, key=lambda n: np.sum((np.asarray(domain.PALETTE[n], float) - rgb) ** 2))


def _read_pixels(image: np.ndarray) -> domain.Attributes:
  """Attributes read from pixels alone, without the renderer's geometry.

  Background: the corners (no shape reaches them). Shape pixels: those far from the
  background colour. Colour: the median of the shape pixels that are fully covered. Position:
  the centroid's nearest anchor. Shape: fill ratio of the bounding box (square ~ 1, circle ~
  0.79, cross ~ 0.58, triangle ~ 0.5) and where the widest rows are (a cross: the middle;
  a triangle pointing up: the bottom).
  """
  img = image.astype(float)
  corners = np.stack([img[0, 0], img[0, -1], img[-1, 0], img[-1, -1]])
  background = np.median(corners, axis=0)
  distance = np.sqrt(np.sum((img - background) ** 2, axis=-1))
  mask = distance > 0.5 * distance.max()
  core = distance > 0.9 * distance.max()
  colour = _nearest_colour(np.median(img[core], axis=0))
  ys, xs = np.nonzero(mask)
  cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
  position = min(domain.POSITIONS, key=lambda p: (domain.POSITIONS[p][0][0] - cx) ** 2
                 + (domain.POSITIONS[p][0][1] - cy) ** 2)
  box = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
  fill = box.mean()
  widths = box.sum(axis=1)
  widest = np.mean(np.nonzero(widths == widths.max())[0]) / max(len(widths) - 1, 1)
  if fill > 0.9:
    shape = "square"
  elif fill > 0.7:
    shape = "circle"
  else:
    shape = "triangle" if widest > 0.75 else "cross"
  return domain.Attributes(colour, shape, position, _nearest_colour(background))


@pytest.mark.parametrize("colours", [domain.TRAIN_COLOURS, domain.SHIFTED_COLOURS])
def test_captions_match_the_drawn_pixels(colours):
  images, attrs = domain.batch(11, 0, 150, colours=colours)
  read = [_read_pixels(image) for image in images]
  mismatches = [(a.caption, r) for a, r in zip(attrs, read) if a != r]
  assert not mismatches, mismatches[:5]
  assert {a.shape for a in attrs} == set(domain.SHAPES)
  assert {a.position for a in attrs} == set(domain.POSITION_NAMES)
  assert {a.colour for a in attrs} == set(colours)
  assert all(a.background in domain.TRAIN_COLOURS and a.background != a.colour for a in attrs)


def test_captions_round_trip_and_use_the_closed_vocabulary():
  for a in domain.all_attributes(domain.COLOURS)[::37]:
    assert domain.parse_caption(a.caption) == a
    assert set(a.caption.split()) <= set(domain.VOCABULARY)
  with pytest.raises(ValueError):
    domain.parse_caption("a photo of a cat")


def test_prompt_set_is_fixed_and_balanced():
  attrs = domain.prompt_set(240)
  assert attrs == domain.prompt_set(240)
  for field, values in (("colour", domain.TRAIN_COLOURS), ("shape", domain.SHAPES),
                        ("position", domain.POSITION_NAMES)):
    counts = [sum(getattr(a, field) == v for a in attrs) for v in values]
    assert counts == [240 // len(values)] * len(values), (field, counts)


def test_write_imagefolder(tmp_path):
  from PIL import Image
  out = domain.write_imagefolder(str(tmp_path / "data"), 5, seed=2, colours=domain.SHIFTED_COLOURS)
  rows = [json.loads(line) for line in open(os.path.join(out, "metadata.jsonl"))]
  assert len(rows) == 5
  for i, row in enumerate(rows):
    image, attrs = domain.sample(2, i, colours=domain.SHIFTED_COLOURS)
    assert row["text"] == attrs.caption
    np.testing.assert_array_equal(np.asarray(Image.open(os.path.join(out, row["file_name"]))), image)


def test_tokenizer_makes_every_word_one_token(tmp_path):
  from lcm_jax.tokenizer import load_tokenizer, tokenize
  from lcm_jax.toy import vocabulary
  tokenizer = load_tokenizer(vocabulary.write_tokenizer(str(tmp_path / "tok")))
  assert len(tokenizer) == vocabulary.vocab_size()
  for word in domain.VOCABULARY:
    assert tokenizer.tokenize(word) == [word + "</w>"]
  longest = max((a.caption for a in domain.all_attributes(domain.COLOURS)), key=lambda c: len(c.split()))
  ids = tokenize(tokenizer, [longest])[0]
  assert ids[0] == len(tokenizer) - 2 and ids[len(longest.split()) + 1] == len(tokenizer) - 1


# ---------------------------------------------------------------------------------------
# The shipped teacher


def test_shipped_teacher_is_small_and_loads_with_load_pipeline():
  from lcm_jax.load import load_pipeline
  size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(TEACHER) for f in files)
  assert size <= 20 * 2 ** 20, f"toy/teacher is {size / 2 ** 20:.1f} MB"
  pipe = load_pipeline(TEACHER)
  assert pipe.unet.config.time_cond_proj_dim is None
  assert pipe.scheduler_config["prediction_type"] == "epsilon"
  assert pipe.tokenizer.model_max_length == 16


def test_shipped_teacher_matches_diffusers():
  """diffusers' StableDiffusionPipeline loads the folder and samples what our DDIM samples."""
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  from lcm_jax.load import load_pipeline
  from lcm_jax.text_to_image import TextToImage
  prompts = ["a red circle on the left on a blue background", "a white cross at the top on a black background"]
  latents = np.random.default_rng(0).standard_normal((2, 4, 16, 16)).astype(np.float32)
  ours = TextToImage(load_pipeline(TEACHER))(prompts, sampler="ddim", num_steps=3, guidance_scale=9.0,
                                             latents=latents)
  pipe = diffusers.StableDiffusionPipeline.from_pretrained(TEACHER, safety_checker=None)
  theirs = pipe(prompts, num_inference_steps=3, guidance_scale=9.0, height=32, width=32,
                latents=torch.from_numpy(latents), output_type="np").images
  theirs = np.round(theirs * 255).astype(np.int32)
  assert np.abs(ours.astype(np.int32) - theirs).max() <= 2


def test_shipped_teacher_draws_its_captions_with_guidance(metrics):
  """Classifier-free guidance works: with 25 DDIM steps at guidance scale 9 the attribute
  network (trained on real images only) reads the caption back from most samples, and
  without guidance (scale 1) from clearly fewer. Measured on these 60 prompts: 93% and 78%."""
  from lcm_jax.load import load_pipeline
  from lcm_jax.text_to_image import TextToImage
  attrs = domain.prompt_set(60, 99)
  prompts = [a.caption for a in attrs]
  t2i = TextToImage(load_pipeline(TEACHER))
  guided = metrics.alignment(t2i(prompts, sampler="ddim", num_steps=25, guidance_scale=9.0), attrs)
  unguided = metrics.alignment(t2i(prompts, sampler="ddim", num_steps=25, guidance_scale=1.0), attrs)
  assert guided["alignment"] >= 0.85, guided
  assert unguided["alignment"] <= guided["alignment"] - 0.08, (unguided, guided)


# ---------------------------------------------------------------------------------------
# Metrics


@pytest.fixture(scope="module")
def metrics():
  from lcm_jax.toy.metrics import DomainMetrics
  return DomainMetrics.load(METRIC)


def test_fid_of_real_images(metrics):
  from lcm_jax.toy.metrics import feature_statistics
  attrs = domain.prompt_set(400)
  real = domain.draw_all(attrs, 1)
  stats = feature_statistics(metrics.features(real))
  assert abs(metrics.fid(real, stats)) < 1e-3  # rounding only: traces are ~1e3
  other_real = metrics.fid(domain.draw_all(attrs, 2), stats)
  shifted = metrics.fid(domain.draw_all(domain.prompt_set(400, colours=domain.SHIFTED_COLOURS), 2), stats)
  noisy = np.clip(real + np.random.default_rng(0).normal(0, 40, real.shape), 0, 255).astype(np.uint8)
  assert 0 < other_real < metrics.fid(noisy, stats)
  assert shifted > 5 * other_real


def test_alignment_of_real_images_and_of_noise(metrics):
  for colours in (domain.TRAIN_COLOURS, domain.SHIFTED_COLOURS):
    attrs = domain.prompt_set(300, colours=colours)
    assert metrics.alignment(domain.draw_all(attrs, 3), attrs)["alignment"] >= 0.97
  attrs = domain.prompt_set(300)
  noise = np.random.default_rng(0).integers(0, 256, (300, 32, 32, 3), dtype=np.uint8)
  scores = metrics.alignment(noise, attrs)
  # Chance: 1/6 x 1/4 x 1/5 on this prompt set; a constant prediction scores at most that.
  assert scores["alignment"] <= 0.05
  assert scores["shape"] <= 0.4 and scores["position"] <= 0.4


# ---------------------------------------------------------------------------------------
# The evaluation table


def test_markdown_table_has_the_papers_layout():
  from lcm_jax.eval.report import markdown_table
  from lcm_jax.toy.metrics import toy_columns
  results = {s: {str(k): {"fid": 10.0 / k, "alignment": 0.1 * k} for k in (1, 2, 4, 8)}
             for s in ("ddim", "dpm_solver", "dpm_solver_pp", "lcm")}
  table = markdown_table(results, list(results), [1, 2, 4, 8], toy_columns(),
                         {"real images": {"fid": 0.5, "alignment": 1.0}})
  lines = table.splitlines()
  assert [line.split("|")[1].strip() for line in lines[2:6]] == ["DDIM", "DPM-Solver", "DPM-Solver++", "LCM"]
  assert "FID ↓ 1-step" in lines[0] and "Align ↑ 8-step" in lines[0]
  assert "| 1.25 |" in lines[2] and "80.0%" in lines[2]


def test_the_toy_metric_plugin_scores_chunks_as_the_attribute_network_scores_the_set(metrics):
  """`python -m lcm_jax.evaluate --metrics toy` (lcm_jax.toy.metrics:toy_metrics): fed in chunks
  through the engine's metric protocol, toy_fid equals the FID computed here with NumPy and
  scipy's sqrtm against the real draw of seed 777, and toy_alignment the attribute network's
  alignment of the whole set; prompts that are not toy captions are one clear error."""
  import warnings

  import scipy.linalg

  from lcm_jax.errors import LcmJaxError
  from lcm_jax.eval.metric import MetricContext, metrics_from_plugin
  from lcm_jax.evaluate import METRIC_ALIASES
  attrs = domain.prompt_set(240, 3)
  prompts = tuple(a.caption for a in attrs)
  made = metrics_from_plugin(METRIC_ALIASES["toy"], MetricContext(prompts, 1, None, "out"))
  assert [m.name for m in made] == ["toy_fid", "toy_alignment"]
  images = domain.draw_all(attrs, 5)
  images[::3] = np.random.default_rng(0).integers(0, 256, images[::3].shape, dtype=np.uint8)  # a third unaligned
  values = {}
  for m in made:
    accumulator = m.start()
    for i in range(0, len(images), 100):
      accumulator.update(images[i:i + 100], prompts[i:i + 100])
    values.update(accumulator.result())
  a, b = metrics.features(images), metrics.features(domain.draw_all(attrs, 777))
  ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  with warnings.catch_warnings():  # dead ReLU features make the covariances singular; sqrtm still agrees
    warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
    expected = np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(ca + cb - 2 * np.real(scipy.linalg.sqrtm(ca @ cb)))
  assert values["toy_fid"] == pytest.approx(expected, rel=1e-6) and expected > 1
  assert values["toy_alignment"] == pytest.approx(metrics.alignment(images, attrs)["alignment"], abs=1e-12)
  assert 0.4 < values["toy_alignment"] < 0.7  # the real two thirds read back, the noise does not
  with pytest.raises(LcmJaxError, match="toy captions only"):
    metrics_from_plugin("lcm_jax.toy.metrics:toy_metrics", MetricContext(("a photo of a cat",), 1, None, "out"))


# ---------------------------------------------------------------------------------------
# The whole chain on a tiny budget: make demo -> LCF on the shifted colours -> evaluate


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
  """`python -m lcm_jax.toy.demo` with 64 images and 2 training steps (what `make demo` runs)."""
  root = tmp_path_factory.mktemp("demo")
  workdir, data = root / "toy", root / "data"
  result = subprocess.run(
      [sys.executable, "-m", "lcm_jax.toy.demo", f"--teacher={TEACHER}", f"--workdir={workdir}", f"--data={data}",
       "--num_images=64", "--train_flag=--config.num_train_steps=2", "--train_flag=--config.batch_size=4",
       "--train_flag=--config.log_every=1"], capture_output=True, text=True, cwd=REPO, timeout=1500)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
  return {"root": root, "workdir": workdir, "data": data, "stdout": result.stdout}


def _grid_tiles(path, rows: int, cols: int, size: int = 32, scale: int = 3, pad: int = 2) -> np.ndarray:
  """The images of a `figures.labelled_grid` PNG, [rows, cols, size, size, 3], from the layout
  rule alone: tiles of size*scale + pad, right- and bottom-aligned, after the labels."""
  from PIL import Image
  grid = np.asarray(Image.open(path).convert("RGB"))
  step = size * scale + pad
  top, left = grid.shape[0] - rows * step, grid.shape[1] - cols * step
  return np.stack([np.stack([grid[top + r * step: top + r * step + size * scale: scale,
                                  left + c * step: left + c * step + size * scale: scale] for c in range(cols)])
                   for r in range(rows)])


def test_demo_grid_shows_the_teacher_at_50_ddim_steps_and_the_lcm(demo_run):
  from lcm_jax.workdir import load_pipeline_from_workdir
  from lcm_jax.load import load_pipeline
  from lcm_jax.text_to_image import TextToImage
  from lcm_jax.toy.demo import DEMO_PROMPTS
  workdir = demo_run["workdir"]
  assert (workdir / "checkpoints" / "2").is_dir()
  grid_path = workdir / "demo_grid.png"
  assert str(grid_path) in demo_run["stdout"]
  tiles = _grid_tiles(grid_path, rows=4, cols=len(DEMO_PROMPTS))
  prompts = list(DEMO_PROMPTS)
  teacher = TextToImage(load_pipeline(TEACHER))(prompts, sampler="ddim", num_steps=50, guidance_scale=9.0)
  np.testing.assert_array_equal(tiles[0], teacher)
  lcm = TextToImage(load_pipeline_from_workdir(str(workdir), "ema"))
  for row, steps in zip(tiles[1:], (1, 2, 4)):
    np.testing.assert_array_equal(row, lcm(prompts, sampler="lcm", num_steps=steps, guidance_scale=9.0))


def test_lcf_on_the_shifted_colours_and_its_evaluation(demo_run):
  """configs/toy.py:lcf fine-tunes the demo's LCM without the teacher; evaluate scores it on
  the shifted prompts, and its numbers equal the metrics computed here from the same images."""
  from lcm_jax.workdir import load_pipeline_from_workdir
  from lcm_jax.text_to_image import TextToImage
  from lcm_jax.toy.metrics import DomainMetrics
  root = demo_run["root"]
  shifted = root / "shifted"
  subprocess.run([sys.executable, "-m", "lcm_jax.toy.domain", f"--output={shifted}", "--num_images=32",
                  "--colours=shifted", "--seed=5"], check=True, cwd=REPO, capture_output=True)
  lcf = root / "lcf"
  result = subprocess.run(
      [sys.executable, "-m", "lcm_jax.train", "--config=configs/toy.py:lcf", f"--workdir={lcf}",
       f"--config.init_from={demo_run['workdir']}", f"--config.data.path={shifted}", "--config.num_train_steps=2",
       "--config.batch_size=4"], capture_output=True, text=True, cwd=REPO, timeout=1500)
  assert result.returncode == 0, result.stderr[-3000:]
  assert (lcf / "checkpoints" / "2").is_dir()

  out = root / "eval"
  result = subprocess.run(
      [sys.executable, "-m", "lcm_jax.toy.evaluate", f"--teacher={TEACHER}", f"--lcm={lcf}", f"--output={out}",
       "--num_samples=8", "--batch_size=8", "--steps=1", "--samplers=lcm", "--domain=shifted", "--lcm_step=2",
       f"--metric={METRIC}", "--grid_prompts=4"], capture_output=True, text=True, cwd=REPO, timeout=1500)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads((out / "table.json").read_text())
  attrs = domain.prompt_set(8, 1234, colours=domain.SHIFTED_COLOURS)
  images = TextToImage(load_pipeline_from_workdir(str(lcf), "ema"))([a.caption for a in attrs], sampler="lcm",
                                                                 num_steps=1, guidance_scale=9.0, seed=0)
  metrics = DomainMetrics.load(METRIC)
  alignment = metrics.alignment(images, attrs)["alignment"]
  assert report["results"]["lcm"]["1"]["alignment"] == pytest.approx(alignment, abs=1e-9)
  assert "| LCM |" in (out / "table.md").read_text()
  for name in ("plot.png", "samples.png"):
    assert (out / name).stat().st_size > 0


def test_evaluate_cli_rejects_bad_input(tmp_path):
  result = subprocess.run([sys.executable, "-m", "lcm_jax.toy.evaluate", f"--teacher={TEACHER}",
                           f"--output={tmp_path}", "--samplers=ddim,foo"], capture_output=True, text=True, cwd=REPO)
  assert result.returncode == 2 and "unknown --samplers" in result.stderr


def test_domain_cli_rejects_bad_input(tmp_path):
  for args, message in ((["--num_images=0", f"--output={tmp_path}"], "--num_images must be positive"),
                        (["--num_images=3"], "--output is required")):
    result = subprocess.run([sys.executable, "-m", "lcm_jax.toy.domain", *args], capture_output=True, text=True,
                            cwd=REPO)
    assert result.returncode == 2 and message in result.stderr, result.stderr
