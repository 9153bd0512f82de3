"""The evaluation table (`lcm_jax.eval.table`, `lcm_jax.eval.report`, `python -m lcm_jax.evaluate`).

In process, on the tests' tiny pipelines (teacher "sd1", LCM "sd1_lcm", 16x16 images) with a
cheap FID (pooled pixels as features) and a tiny random CLIP: the table is complete and equals
the metrics recomputed here from the cached PNGs; a rerun generates and scores nothing; a
changed setting regenerates (sampler) or rescores (metric); an interrupted cell resumes with
only its missing images. End to end (slow): the command with random Inception weights and the
tiny CLIP, then its rerun; and every bad flag or path is one `error:` line with exit status 2.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from lcm_jax.errors import LcmJaxError
from tests.helpers import REPO, tiny_clip

PROMPTS = ["a red circle on a blue background", "a photo of a cat", "a green square in the top left corner"]
IMAGES_PER_PROMPT, BATCH = 2, 4  # 6 images a cell: one full batch and one padded batch
SAMPLERS, STEPS = ("ddim", "lcm"), (1,)  # each cell compiles once: ~30 s on 2 busy cores


# ---------------------------------------------------------------------------------------
# Helpers: a cheap FID, a tiny random CLIP folder, random Inception weights


def pooled_pixels(images: np.ndarray) -> np.ndarray:
  """[B, H, W, 3] uint8 -> [B, 4]: the mean brightness of each quarter (a cheap, image-dependent
  feature; 4-d so that 6 images give a full-rank covariance and a well-conditioned FID)."""
  b, h, w, _ = images.shape
  return images.reshape(b, 2, h // 2, 2, w // 2, 3).mean(axis=(2, 4, 5)).reshape(b, -1).astype(np.float64)


def cheap_fid(tag: str = "pooled pixels v1"):
  from lcm_jax.eval.fid import feature_statistics
  from lcm_jax.eval.metric import FIDMetric
  reference = np.random.default_rng(0).integers(0, 256, (64, 16, 16, 3), dtype=np.uint8)
  return FIDMetric(pooled_pixels, feature_statistics(pooled_pixels(reference)), {"features": tag},
                   f"FID: {tag} against 64 uniform noise images.")


def write_tiny_clip(folder: str, seed: int = 0) -> str:
  """A CLIPModel folder (transformers layout) with random weights: 32x32 images, 16-d embeddings."""
  import jax

  from lcm_jax import weights
  from lcm_jax.models import clip
  from lcm_jax.safetensors_io import write_safetensors
  vocab, _ = tiny_clip.tiny_vocab_and_merges()
  text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
              num_attention_heads=2, max_position_embeddings=tiny_clip.MODEL_MAX_LENGTH,
              eos_token_id=vocab["<|endoftext|>"], bos_token_id=vocab["<|startoftext|>"], pad_token_id=1)
  vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                patch_size=8)
  config = {"text_config": text, "vision_config": vision, "projection_dim": 16}
  module = clip.CLIPModel(clip.CLIPModelConfig.from_dict(config))
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *module.dummy_inputs()))["params"]
  rng = np.random.default_rng(seed)
  flat = {p: (1.0 + 0.1 * rng.normal(size=s.shape) if p[-1] == "scale" else 0.2 * rng.normal(size=s.shape))
          .astype(np.float32) for p, s in weights.flatten_tree(shapes).items()}
  os.makedirs(folder, exist_ok=True)
  write_safetensors(os.path.join(folder, "model.safetensors"), weights.flax_to_torch(weights.unflatten_tree(flat)))
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(config, f)
  with open(os.path.join(folder, "preprocessor_config.json"), "w") as f:
    json.dump({"size": 32, "crop_size": 32, "resample": 3}, f)
  tiny_clip.write_tiny_tokenizer(folder)
  return folder


def write_random_inception(path: str, seed: int = 0) -> str:
  """FID Inception weights with random convolutions and BatchNorm affines, converted-file layout
  (drawn in NumPy: only the command's plumbing is tested with them, never an FID value)."""
  from lcm_jax import weights
  from lcm_jax.eval import inception
  from lcm_jax.safetensors_io import write_safetensors
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    if path[-1] == "kernel":
      return rng.normal(0.0, np.sqrt(2.0 / np.prod(leaf.shape[:-1])), leaf.shape)
    return {"scale": rng.uniform(0.5, 1.5, leaf.shape), "bias": rng.normal(0.0, 0.3, leaf.shape),
            "var": np.ones(leaf.shape)}.get(path[-1], np.zeros(leaf.shape))
  flat = {p: draw(p, leaf).astype(np.float32) for p, leaf in weights.flatten_tree(inception.abstract_params()).items()}
  write_safetensors(path, weights.flax_to_torch(weights.unflatten_tree(flat)))
  return path


class Counting:
  """A metric proxy that counts `start` calls (a scoring pass)."""

  def __init__(self, metric):
    self.metric, self.starts = metric, 0
    self.name, self.columns = metric.name, metric.columns

  def settings(self):
    return self.metric.settings()

  def describe(self):
    return self.metric.describe()

  def start(self):
    self.starts += 1
    return self.metric.start()


class Recording:
  """An image source proxy that records the indices of every call and can interrupt one."""

  def __init__(self, source, interrupt_at: int | None = None):
    self.source, self.calls, self.interrupt_at = source, [], interrupt_at

  def settings(self):
    return self.source.settings()

  def prepare(self, batch_size):
    self.source.prepare(batch_size)

  def __call__(self, prompts, indices):
    if len(self.calls) == self.interrupt_at:
      raise KeyboardInterrupt
    self.calls.append([int(i) for i in indices])
    return self.source(prompts, indices)


# ---------------------------------------------------------------------------------------
# In process


@pytest.fixture(scope="module")
def models(tiny_pipeline):
  """The teacher and LCM `Model`s, shared so that each (sampler, steps) compiles once per module."""
  from lcm_jax.eval.table import Model, model_identity
  from lcm_jax.load import load_pipeline
  paths = {"teacher": tiny_pipeline("sd1"), "lcm": tiny_pipeline("sd1_lcm")}
  return {role: Model(model_identity(p), lambda p=p: load_pipeline(p)) for role, p in paths.items()}


@pytest.fixture(scope="module")
def clip_metric(tmp_path_factory):
  from lcm_jax.eval.metric import clip_metric
  return clip_metric(write_tiny_clip(str(tmp_path_factory.mktemp("clip") / "tiny_clip")), batch_size=4)


def evaluation(cache_dir, metrics, **kwargs):
  from lcm_jax.eval.table import Evaluation
  return Evaluation(PROMPTS, metrics, str(cache_dir), images_per_prompt=IMAGES_PER_PROMPT, batch_size=BATCH,
                    score_batch=4, progress=False, **kwargs)


@pytest.fixture(scope="module")
def first_run(models, clip_metric, tmp_path_factory):
  """The grid run once through `report.run_and_report` (the commands' run loop): (output folder,
  cells, results, metrics, partial table after cell 1, logged lines)."""
  from lcm_jax.eval import report
  from lcm_jax.eval.table import sampler_cells
  out = tmp_path_factory.mktemp("table")
  metrics = [cheap_fid(), clip_metric]
  cells = sampler_cells(models, SAMPLERS, STEPS, guidance_scale=9.0, seed=3)
  partial, logged = [], []

  def log(line):
    logged.append(line)
    if len(logged) == 2:  # the second cell's summary line: table.md is still the one written after cell 1
      partial.append((out / "table.md").read_text())
  results = report.run_and_report(evaluation(out / "cells", metrics), cells, metrics, str(out), {"test": True},
                                  ["settings line"], grid_prompts=2, log=log)
  return out, cells, results, metrics, partial[0], logged


def cached_images(cache_dir, cell_name: str) -> np.ndarray:
  """The cell's PNGs read back here, in index order, without the engine."""
  from PIL import Image
  folder = os.path.join(cache_dir, cell_name, "images")
  names = sorted(f for f in os.listdir(folder) if f.endswith(".png") and not f.startswith("."))
  assert names == [f"{i:06d}.png" for i in range(len(PROMPTS) * IMAGES_PER_PROMPT)], names
  return np.stack([np.asarray(Image.open(os.path.join(folder, f)).convert("RGB")) for f in names])


def test_the_table_is_complete_and_equals_the_metrics_of_the_cached_images(first_run, models, clip_metric):
  from lcm_jax.eval.clip_score import mean_clip_score
  from lcm_jax.eval.fid import feature_statistics, frechet_distance
  out, cells, results, metrics, _, logged = first_run
  report = json.loads((out / "table.json").read_text())
  assert report["complete"] and set(report["results"]) == set(SAMPLERS)
  per_image_prompts = [p for p in PROMPTS for _ in range(IMAGES_PER_PROMPT)]
  for sampler in SAMPLERS:
    for steps in STEPS:
      images = cached_images(out / "cells", f"{sampler}_{steps}")
      entry = report["results"][sampler][str(steps)]
      fid = frechet_distance(*feature_statistics(pooled_pixels(images)), *metrics[0].reference)
      clip = mean_clip_score(clip_metric.scorer.scores(images, per_image_prompts))
      assert entry["fid"] == pytest.approx(fid, rel=1e-9) and fid > 0
      assert entry["clip"] == pytest.approx(clip, abs=1e-9)
      assert entry["timings"]["generation"]["images"] == len(images)
  table = (out / "table.md").read_text().splitlines()
  assert table[0] == "| Method | FID ↓ 1-step | CLIP ↑ 1-step |"
  assert [line.split("|")[1].strip() for line in table[2:4]] == ["DDIM", "LCM"]
  lcm = report["results"]["lcm"]["1"]
  assert table[3] == f"| LCM | {lcm['fid']:.2f} | {lcm['clip']:.2f} |"
  assert "—" not in "\n".join(table)
  assert "* settings line" in table and "* FID: pooled pixels v1 against 64 uniform noise images." in table
  assert any(line.startswith("* CLIP score: 100 x cos") for line in table)
  assert (out / "plot.png").stat().st_size > 0 and (out / "samples.png").stat().st_size > 0
  assert json.loads((out / "table.json").read_text())["total_seconds"] > 0
  # Written after the first cell: the other cells are marked as not scored yet.
  assert first_run[4].count("—") == len(SAMPLERS) * len(STEPS) * 2 - 2
  # Logged: a line per cell with its scores and images/s (generation and each metric), the
  # table, then the files written.
  assert logged[0].startswith(f"[evaluate] DDIM 1 steps: fid {entry_fid(report, 'ddim'):.4g}")
  assert all(f"{k} " in logged[i] for i in (0, 1) for k in ("images/s: generation", "fid", "clip"))
  assert logged[2] == (out / "table.md").read_text() and logged[3].startswith(f"[evaluate] wrote {out}/table.md")


def entry_fid(report: dict, sampler: str) -> float:
  return report["results"][sampler]["1"]["fid"]


def test_markdown_table_has_the_papers_layout_and_marks_missing_cells():
  from lcm_jax.eval import report
  from lcm_jax.eval.metric import CLIP_COLUMN, FID_COLUMN
  results = {"ddim": {"1": {"fid": 30.123, "clip": 25.0}, "8": {"fid": 15.0, "clip": 30.5}},
             "lcm": {"1": {"fid": 18.0, "clip": 28.25}}}
  text = report.markdown_table(results, ["ddim", "dpm_solver_pp", "lcm"], [1, 8], [FID_COLUMN, CLIP_COLUMN],
                               {"real images": {"fid": 1.5, "clip": 31.0}}, ["a note"])
  lines = text.splitlines()
  assert lines[:5] == ["| Method | FID ↓ 1-step | FID ↓ 8-step | CLIP ↑ 1-step | CLIP ↑ 8-step |",
                       "|---|---|---|---|---|",
                       "| DDIM | 30.12 | 15.00 | 25.00 | 30.50 |",
                       "| DPM-Solver++ | — | — | — | — |",
                       "| LCM | 18.00 | — | 28.25 | — |"]
  assert "References (same prompts): real images: FID 1.50, CLIP 31.00." in lines and lines[-1] == "* a note"
  assert report.plot(results, ["ddim", "lcm"], [1, 8], [FID_COLUMN, CLIP_COLUMN]).ndim == 3


def test_image_j_is_the_samplers_image_from_key_seed_j_and_each_cell_compiled_once(first_run, models):
  out = first_run[0]
  t2i = models["teacher"].text_to_image
  indices = np.arange(BATCH)
  direct = t2i([PROMPTS[j // IMAGES_PER_PROMPT] for j in indices], sampler="ddim", num_steps=1,
               guidance_scale=9.0, seed=3, indices=indices)
  np.testing.assert_array_equal(cached_images(out / "cells", "ddim_1")[:BATCH], direct)
  # One compiled function per (sampler, steps): the padded last batch has the same shape.
  assert t2i.num_compiled == len(STEPS) and t2i.traces == len(STEPS)
  assert models["lcm"].text_to_image.num_compiled == len(STEPS)
  # ddim and lcm start image j from the same noise; they still draw different images.
  assert not np.array_equal(cached_images(out / "cells", "ddim_1"), cached_images(out / "cells", "lcm_1"))


def test_a_rerun_generates_and_scores_nothing(first_run, tiny_pipeline, clip_metric, tmp_path):
  from lcm_jax.eval.table import Model, model_identity, sampler_cells
  out, _, results, _, _, _ = first_run
  shutil.copytree(out / "cells", tmp_path / "cells")
  fresh = {role: Model(model_identity(tiny_pipeline(f)), lambda: pytest.fail("loaded a model"))
           for role, f in (("teacher", "sd1"), ("lcm", "sd1_lcm"))}
  metrics = [Counting(cheap_fid()), Counting(clip_metric)]
  again = evaluation(tmp_path / "cells", metrics).run(sampler_cells(fresh, SAMPLERS, STEPS, guidance_scale=9.0, seed=3))
  assert again == results
  assert [m.starts for m in metrics] == [0, 0] and not any(m.loaded for m in fresh.values())


def test_a_changed_setting_regenerates_its_cell_and_a_changed_metric_rescores(first_run, models, clip_metric,
                                                                              tmp_path):
  from lcm_jax.eval.table import Cell, sampler_cells
  out, _, results, _, _, _ = first_run
  shutil.copytree(out / "cells", tmp_path / "cells")
  cells = sampler_cells(models, SAMPLERS, STEPS, guidance_scale=9.0, seed=3)
  changed = sampler_cells(models, ["ddim"], [1], guidance_scale=5.0, seed=3)[0]  # same cell name, new guidance
  cells[0] = Cell(changed.name, changed.row, changed.steps, Recording(changed.source))
  fid = Counting(cheap_fid("pooled pixels v2"))  # another FID setting: rescored from the kept images
  again = evaluation(tmp_path / "cells", [fid, clip_metric]).run(cells)
  assert cells[0].source.calls == [[0, 1, 2, 3], [4, 5, 5, 5]]  # the whole cell, last batch padded
  assert again["ddim_1"]["scores"]["fid"] != results["ddim_1"]["scores"]["fid"]
  assert fid.starts == len(cells)
  for name in ("lcm_1",):  # same images, same features: same numbers
    assert again[name]["scores"] == results[name]["scores"]


def test_an_interrupted_cell_resumes_with_its_missing_images_only(first_run, models, clip_metric, tmp_path):
  from lcm_jax.eval.table import Cell, sampler_cells
  out, _, results, metrics, _, _ = first_run
  plain = sampler_cells(models, ["lcm"], [1], guidance_scale=9.0, seed=3)[0]
  interrupted = Cell(plain.name, plain.row, plain.steps, Recording(plain.source, interrupt_at=1))
  with pytest.raises(KeyboardInterrupt):
    evaluation(tmp_path, metrics).run([interrupted])
  images = tmp_path / "lcm_1" / "images"
  assert sorted(os.listdir(images)) == [f"{i:06d}.png" for i in range(BATCH)]
  assert not (tmp_path / "lcm_1" / "scores.json").exists()
  # A kill can also leave a half-written temporary file, and lose a finished image.
  (images / ".000005.tmp.png").write_bytes(b"\x89PNG cut short")
  (images / "000001.png").unlink()
  resumed = Cell(plain.name, plain.row, plain.steps, Recording(plain.source))
  result = evaluation(tmp_path, metrics).run([resumed])
  assert resumed.source.calls == [[1, 4, 5, 5]]
  np.testing.assert_array_equal(cached_images(tmp_path, "lcm_1"), cached_images(out / "cells", "lcm_1"))
  assert result["lcm_1"]["scores"] == results["lcm_1"]["scores"]
  # The generation record counts the work done: 4 images, then 3 (image 1 twice).
  assert json.loads((tmp_path / "lcm_1" / "cell.json").read_text())["generation"]["images"] == 7


def test_fid_metric_of_a_reference_folder_crops_caches_and_says_so(tmp_path, monkeypatch):
  """fid_metric's wiring (Inception replaced by pooled pixels): the folder's images are
  centre-cropped to the samples' size before the features, the statistics cached, and the
  description names the mode and the preprocessing."""
  from lcm_jax.eval import fid, inception, metric
  from lcm_jax.figures import save_png

  class FakeFeatures:
    def __init__(self, params, mode, batch_size):
      self.mode = mode

    def of_images(self, images):
      assert all(im.shape == (16, 16, 3) for im in images)  # cropped and resized first
      return pooled_pixels(np.stack(images))
  monkeypatch.setattr(inception, "InceptionFeatures", FakeFeatures)
  monkeypatch.setattr(inception, "load_inception", lambda path: None)
  rng = np.random.default_rng(1)
  wide = [rng.integers(0, 256, (20, 30, 3), dtype=np.uint8) for _ in range(5)]
  for i, im in enumerate(wide):
    save_png(str(tmp_path / "ref" / f"{i}.png"), im)
  m = metric.fid_metric(str(tmp_path / "w.safetensors"), str(tmp_path / "ref"), resolution=16,
                        reference_cache=str(tmp_path / "ref.npz"))
  expected = fid.feature_statistics(pooled_pixels(np.stack([metric.centre_crop_resize(im, 16) for im in wide])))
  np.testing.assert_allclose(m.reference[0], expected[0], rtol=1e-12)
  assert fid.load_statistics(str(tmp_path / "ref.npz"))[2]["num_images"] == 5
  assert "pytorch_fid mode" in m.describe() and "centre-cropped and resized to 16x16" in m.describe()
  crop = metric.centre_crop_resize(wide[0], 20)  # 20x30 -> the central 20x20 columns 5..24
  np.testing.assert_array_equal(crop, wide[0][:, 5:25])


def plugin_factory(context):
  assert context.prompts == tuple(PROMPTS)
  return cheap_fid()


def test_metric_plugins_load_by_module_path():
  from lcm_jax.eval.metric import MetricContext, metrics_from_plugin
  context = MetricContext(tuple(PROMPTS), 1, None, "out")
  made = metrics_from_plugin("tests.test_evaluate:plugin_factory", context)  # a factory: called
  assert [m.name for m in made] == ["fid"]
  for spec, message in (("nosuch_module_xyz:thing", "cannot import"), ("tests.test_evaluate:missing", "has no"),
                        ("no_colon", "must look like"), ("tests.test_evaluate:PROMPTS", "gave no metrics")):
    with pytest.raises(LcmJaxError, match=message):
      metrics_from_plugin(spec, context)


# ---------------------------------------------------------------------------------------
# The command


def run_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "lcm_jax.evaluate", *args], capture_output=True, text=True,
                        cwd=REPO, timeout=timeout, env=dict(os.environ, JAX_PLATFORMS="cpu"))


def test_bad_flags_and_paths_give_one_error_line_and_exit_2(tmp_path):
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("\n".join(PROMPTS))
  out = tmp_path / "out"
  workdir = tmp_path / "workdir"  # the shape of a training workdir, with checkpoint 5 only
  (workdir / "checkpoints" / "5").mkdir(parents=True)
  (workdir / "model" / "unet").mkdir(parents=True)
  (workdir / "model" / "unet" / "config.json").write_text("{}")
  good = [f"--teacher={tmp_path}", f"--lcm={tmp_path}", f"--prompts={prompts}", f"--reference={tmp_path}",
          "--resolution=16", f"--output={out}"]
  cases = [
      (["--output="], "--output is required"),
      (["--samplers=ddim,foo"], "unknown --samplers ['foo']"),
      (["--steps=1,0"], "--steps must be positive"),
      (["--teacher=/no/such/model"], "--teacher /no/such/model does not exist"),
      ([f"--lcm={prompts}"], "is a file"),
      (["--prompts=/no/such.txt"], "--prompts /no/such.txt does not exist"),
      (["--images_per_prompt=0"], "--images_per_prompt must be at least 1"),
      (["--reference=/no/such.npz"], "--reference /no/such.npz does not exist"),
      (["--resolution=0"], "--resolution must be at least 1"),
      (["--fid_mode=tf"], "unknown --fid_mode 'tf'"),
      (["--inception=/no/inception.safetensors"], "--inception /no/inception.safetensors does not exist"),
      (["--metrics=fid,nosuch_module_xyz:m"], "cannot import the metric plugin module"),
      (["--clip=./no/clip"], "--clip ./no/clip does not exist"),
      (["--lcm_step=3"], "--lcm_step needs a training workdir"),
      ([f"--lcm={workdir}", "--lcm_step=7"], "has no checkpoint of that step"),
      (["--metrics=toy"], "--metrics toy reads toy captions only"),  # the alias loads the toy's plugin
  ]
  for extra, message in cases:
    r = run_cli(*good, *extra)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], \
        (extra, r.stderr[-1500:])
    assert not out.exists()  # nothing was done


@pytest.mark.slow
def test_the_command_writes_the_table_and_its_rerun_skips_every_cell(tiny_pipeline, tmp_path):
  """`python -m lcm_jax.evaluate` with random Inception weights, a reference .npz and the tiny
  CLIP, on the LCM row only (each row compiles a sampler, and Inception compiles once: about
  2 minutes on 2 busy cores): a complete table, plot, samples and JSON; CLIP scores equal to the
  tiny CLIP's on the cached PNGs; a rerun leaves every PNG untouched and writes the same table."""
  from lcm_jax.eval.clip_score import load_clip, mean_clip_score
  from lcm_jax.eval.prompts import load_prompt_set
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("\n".join(PROMPTS))
  rng = np.random.default_rng(0)
  mix = rng.normal(size=(2048, 64))
  np.savez(tmp_path / "stats.npz", mu=rng.normal(size=2048), sigma=mix @ mix.T / 64)
  clip_folder = write_tiny_clip(str(tmp_path / "clip"))
  out = tmp_path / "out"
  args = [f"--teacher={tiny_pipeline('sd1')}", f"--lcm={tiny_pipeline('sd1_lcm')}", f"--prompts={prompts}",
          "--samplers=lcm", "--steps=1", f"--images_per_prompt={IMAGES_PER_PROMPT}", f"--batch_size={BATCH}",
          f"--reference={tmp_path / 'stats.npz'}", f"--clip={clip_folder}", "--metric_batch_size=4",
          f"--inception={write_random_inception(str(tmp_path / 'inception.safetensors'))}", f"--output={out}",
          "--grid_prompts=2"]
  r = run_cli(*args)
  assert r.returncode == 0, r.stderr[-3000:]
  report = json.loads((out / "table.json").read_text())
  assert report["complete"] and report["settings"]["images_per_prompt"] == IMAGES_PER_PROMPT
  entry = report["results"]["lcm"]["1"]
  assert np.isfinite(entry["fid"]) and entry["fid"] >= 0
  order = load_prompt_set(str(prompts)).sample(None, 0).prompts  # --prompt_seed 0 shuffles the file
  images = cached_images(out / "cells", "lcm_1")
  scorer = load_clip(clip_folder, batch_size=4)  # the command's batches: the same compiled shapes
  expected = mean_clip_score(scorer.scores(images, [p for p in order for _ in range(IMAGES_PER_PROMPT)]))
  assert entry["clip"] == pytest.approx(expected, abs=1e-6)
  table = (out / "table.md").read_text()
  assert table.splitlines()[2].startswith("| LCM | ") and "FID: pytorch_fid mode" in table
  assert f"reference: precomputed statistics {tmp_path / 'stats.npz'}" in table
  for name in ("plot.png", "samples.png"):
    assert (out / name).stat().st_size > 0
  stamps = {p: p.stat().st_mtime_ns for p in (out / "cells").rglob("*.png")}
  again = run_cli(*args)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "generate" not in again.stderr and {p: p.stat().st_mtime_ns for p in stamps} == stamps
  assert (out / "table.md").read_text() == table
