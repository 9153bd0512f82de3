"""`load_pipeline` and `save_pipeline` on tiny diffusers folders: parity, round trips, errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import diffusers
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from lcm_jax import weights
from lcm_jax.errors import LcmJaxError, UnsupportedConfigError, WeightsError
from lcm_jax.load import load_pipeline
from lcm_jax.models.vae import AutoencoderKL
from lcm_jax.safetensors_io import SafetensorsFile
from lcm_jax.sd_pipeline import save_pipeline

UNET_FILE = os.path.join("unet", "diffusion_pytorch_model.safetensors")
VAE_FILE = os.path.join("vae", "diffusion_pytorch_model.safetensors")
TEXT_FILE = os.path.join("text_encoder", "model.safetensors")


def _bound(ref: np.ndarray) -> float:
  return 1e-4 * max(1.0, float(np.abs(ref).max()))


def _copy(src: str, dst) -> str:
  out = os.path.join(str(dst), "copy")
  shutil.copytree(src, out)
  return out


@pytest.mark.parametrize("flavour", ["sd1_lcm", "sd2"])
def test_loaded_pipeline_matches_diffusers(tiny_pipeline, flavour):
  """Every component, loaded through `load_pipeline`, computes what diffusers/transformers compute."""
  path = tiny_pipeline(flavour)
  pipe = load_pipeline(path)
  ref = diffusers.StableDiffusionPipeline.from_pretrained(path, safety_checker=None)

  ids = pipe.tokenizer(["a red circle", ""], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                       truncation=True, return_tensors="np").input_ids
  with torch.no_grad():
    ref_text = ref.text_encoder(torch.tensor(ids)).last_hidden_state.numpy()
  text, _ = pipe.text_encoder.apply({"params": pipe.params["text_encoder"]}, jnp.asarray(ids))
  assert np.abs(np.asarray(text) - ref_text).max() <= _bound(ref_text)

  rng = np.random.default_rng(0)
  latents = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
  t = np.array([10, 900])
  kwargs, jax_kwargs = {}, {}
  if flavour.endswith("_lcm"):
    cond = rng.standard_normal((2, 256)).astype(np.float32)
    kwargs["timestep_cond"] = torch.tensor(cond)
    jax_kwargs["timestep_cond"] = jnp.asarray(cond)
  with torch.no_grad():
    ref_out = ref.unet(torch.tensor(latents), torch.tensor(t), torch.tensor(ref_text), **kwargs).sample.numpy()
  out = pipe.unet.apply({"params": pipe.params["unet"]}, jnp.asarray(latents.transpose(0, 2, 3, 1)),
                        jnp.asarray(t), text, **jax_kwargs)
  out = np.asarray(out).transpose(0, 3, 1, 2)
  assert np.abs(out - ref_out).max() <= _bound(ref_out)

  with torch.no_grad():
    ref_img = ref.vae.decode(torch.tensor(latents)).sample.numpy()
  img = pipe.vae.apply({"params": pipe.params["vae"]}, jnp.asarray(latents.transpose(0, 2, 3, 1)),
                       method=AutoencoderKL.decode)
  img = np.asarray(img).transpose(0, 3, 1, 2)
  assert np.abs(img - ref_img).max() <= _bound(ref_img)
  assert pipe.vae_scaling_factor == ref.vae.config.scaling_factor
  assert pipe.scheduler_config["prediction_type"] == ref.scheduler.config.prediction_type


@pytest.mark.parametrize("flavour", ["sd1", "sd2_lcm"])
def test_export_round_trip_is_bit_exact_and_diffusers_loads_it(tiny_pipeline, tmp_path, flavour):
  src = tiny_pipeline(flavour)
  pipe = load_pipeline(src)
  out = str(tmp_path / "exported")
  save_pipeline(pipe, out)
  for rel in (UNET_FILE, VAE_FILE, TEXT_FILE):
    a, b = SafetensorsFile(os.path.join(src, rel)), SafetensorsFile(os.path.join(out, rel))
    stored = set(a) - set(pipelines_ignored(rel))
    assert stored == set(b), rel
    for k in stored:
      assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), (rel, k)

  for cls, sub in ((diffusers.UNet2DConditionModel, "unet"), (diffusers.AutoencoderKL, "vae")):
    _, info = cls.from_pretrained(out, subfolder=sub, output_loading_info=True)
    assert not any(info.values()), (sub, info)
  _, info = transformers.CLIPTextModel.from_pretrained(os.path.join(out, "text_encoder"), output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
  unet_config = json.load(open(os.path.join(out, "unet", "config.json")))
  assert unet_config["time_cond_proj_dim"] == (256 if flavour.endswith("_lcm") else None)
  ref = diffusers.StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
  assert ref.scheduler.config.prediction_type == pipe.scheduler_config["prediction_type"]


def pipelines_ignored(rel: str):
  """Buffers (not parameters) a reference writer may store and we do not model."""
  return ("text_model.embeddings.position_ids",) if rel == TEXT_FILE else ()


def test_fp16_export_and_fp16_variant_load(tiny_pipeline, tmp_path):
  src = tiny_pipeline("sd1")
  pipe = load_pipeline(src)
  out = str(tmp_path / "fp16")
  save_pipeline(pipe, out, dtype="fp16")
  a, b = SafetensorsFile(os.path.join(src, UNET_FILE)), SafetensorsFile(os.path.join(out, UNET_FILE))
  for k in a:
    assert b[k].dtype == np.float16
    np.testing.assert_array_equal(b[k], a[k].astype(np.float16))
  m = diffusers.UNet2DConditionModel.from_pretrained(out, subfolder="unet", torch_dtype=torch.float16)
  assert m.dtype == torch.float16
  # The same file as a `.fp16.` variant beside the fp32 one is what variant="fp16" loads.
  variant = _copy(src, tmp_path)
  shutil.copy(os.path.join(out, UNET_FILE), os.path.join(variant, "unet", "diffusion_pytorch_model.fp16.safetensors"))
  os.remove(os.path.join(variant, UNET_FILE))
  loaded = load_pipeline(variant, components=("unet",), variant="fp16")
  k = loaded.params["unet"]["conv_in"]["kernel"]
  assert k.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(k), b["conv_in.weight"].astype(np.float32).transpose(2, 3, 1, 0))


def test_bf16_params(tiny_pipeline):
  pipe = load_pipeline(tiny_pipeline("sd1"), components=("unet",), param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
  leaves = [l for l in __import__("jax").tree_util.tree_leaves(pipe.params["unet"])]
  assert all(l.dtype == jnp.bfloat16 for l in leaves)


def test_sharded_checkpoint_loads(tiny_pipeline, tmp_path):
  src = tiny_pipeline("sd1")
  folder = _copy(src, tmp_path)
  f = SafetensorsFile(os.path.join(folder, UNET_FILE))
  names = sorted(f)
  half = len(names) // 2
  parts = {"diffusion_pytorch_model-00001-of-00002.safetensors": names[:half],
           "diffusion_pytorch_model-00002-of-00002.safetensors": names[half:]}
  for fname, keys in parts.items():
    safetensors.numpy.save_file({k: f[k] for k in keys}, os.path.join(folder, "unet", fname))
  index = {"metadata": {}, "weight_map": {k: fname for fname, keys in parts.items() for k in keys}}
  json.dump(index, open(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors.index.json"), "w"))
  os.remove(os.path.join(folder, UNET_FILE))
  sharded = load_pipeline(folder, components=("unet",)).params["unet"]
  single = load_pipeline(src, components=("unet",)).params["unet"]
  assert __import__("jax").tree_util.tree_all(
      __import__("jax").tree_util.tree_map(lambda a, b: bool((a == b).all()), sharded, single))


def _rewrite(path: str, edit) -> None:
  f = SafetensorsFile(path)
  tensors = {k: np.array(f[k]) for k in f}
  edit(tensors)
  safetensors.numpy.save_file(tensors, path, metadata={"format": "pt"})


def test_missing_unexpected_and_misshaped_keys_are_listed(tiny_pipeline, tmp_path):
  folder = _copy(tiny_pipeline("sd1"), tmp_path)

  def edit(t):
    del t["conv_in.bias"]
    t["extra.weight"] = np.zeros(3, np.float32)
    t["conv_out.weight"] = np.zeros((4, 32, 1, 1), np.float32)

  _rewrite(os.path.join(folder, UNET_FILE), edit)
  with pytest.raises(WeightsError) as e:
    load_pipeline(folder, components=("unet",))
  msg = str(e.value)
  assert "missing keys (1)" in msg and "conv_in.bias" in msg
  assert "unexpected keys (1)" in msg and "extra.weight" in msg
  assert "mis-shaped keys (1)" in msg and "conv_out.weight: stored (4, 32, 1, 1), model needs (4, 32, 3, 3)" in msg


def test_legacy_vae_attention_names_are_converted_not_skipped(tiny_pipeline, tmp_path):
  src = tiny_pipeline("sd1")
  folder = _copy(src, tmp_path)
  legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}

  def edit(t):
    for k in list(t):
      for new, old in legacy.items():
        if ".attentions." in k and f".{new}." in k:
          t[k.replace(f".{new}.", f".{old}.")] = t.pop(k)

  _rewrite(os.path.join(folder, VAE_FILE), edit)
  assert any(".query." in k for k in SafetensorsFile(os.path.join(folder, VAE_FILE)))
  a = load_pipeline(folder, components=("vae",)).params["vae"]
  b = load_pipeline(src, components=("vae",)).params["vae"]
  flat_a, flat_b = weights.flatten_tree(a), weights.flatten_tree(b)
  assert set(flat_a) == set(flat_b)
  for k in flat_a:
    np.testing.assert_array_equal(np.asarray(flat_a[k]), np.asarray(flat_b[k]))


def test_text_encoder_saved_by_transformers_v5_without_prefix(tiny_pipeline, tmp_path):
  """transformers v5 saves a freshly built CLIPTextModel without `text_model.`; both forms load."""
  src = tiny_pipeline("sd2")
  folder = _copy(src, tmp_path)
  _rewrite(os.path.join(folder, TEXT_FILE),
           lambda t: t.update({k[len("text_model."):]: t.pop(k) for k in list(t)}))
  assert not any(k.startswith("text_model.") for k in SafetensorsFile(os.path.join(folder, TEXT_FILE)))
  a = weights.flatten_tree(load_pipeline(folder, components=("text_encoder",)).params["text_encoder"])
  b = weights.flatten_tree(load_pipeline(src, components=("text_encoder",)).params["text_encoder"])
  assert set(a) == set(b) and all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)


def test_bin_only_folder_says_how_to_get_safetensors(tiny_pipeline, tmp_path):
  folder = _copy(tiny_pipeline("sd1"), tmp_path)
  os.remove(os.path.join(folder, UNET_FILE))
  torch.save({}, os.path.join(folder, "unet", "diffusion_pytorch_model.bin"))
  with pytest.raises(WeightsError, match=r"only PyTorch pickle weights.*save_pretrained\(folder, safe_serialization=True\)"):
    load_pipeline(folder, components=("unet",))


def test_unsupported_config_option_is_named(tiny_pipeline, tmp_path):
  folder = _copy(tiny_pipeline("sd1"), tmp_path)
  cfg_path = os.path.join(folder, "unet", "config.json")
  cfg = json.load(open(cfg_path))
  cfg["class_embed_type"] = "timestep"
  json.dump(cfg, open(cfg_path, "w"))
  with pytest.raises(UnsupportedConfigError, match="unet: .*class_embed_type"):
    load_pipeline(folder, components=("unet",))


def test_missing_folder_and_offline_hub_are_clear(tmp_path, monkeypatch):
  with pytest.raises(LcmJaxError, match="does not exist"):
    load_pipeline(str(tmp_path / "nope"))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  with pytest.raises(LcmJaxError, match="pass a local diffusers pipeline folder"):
    load_pipeline("someone/some-model")
  (tmp_path / "empty").mkdir()
  with pytest.raises(LcmJaxError, match="model_index.json is missing"):
    load_pipeline(str(tmp_path / "empty"))


def _export_cli(*args):
  return subprocess.run([sys.executable, "-m", "lcm_jax.export", *args], capture_output=True, text=True,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=1200)


def test_export_cli(tiny_pipeline, tmp_path):
  r = _export_cli(f"--model={tmp_path / 'missing'}", f"--output={tmp_path / 'o'}")
  assert r.returncode == 2
  assert r.stderr.strip().splitlines() == [f"error: model folder '{tmp_path / 'missing'}' does not exist"]
  r = _export_cli(f"--model={tiny_pipeline('sd1_lcm')}", f"--output={tmp_path / 'o'}", "--dtype=bf16")
  assert r.returncode == 0, r.stderr
  m = diffusers.UNet2DConditionModel.from_pretrained(str(tmp_path / "o"), subfolder="unet")
  assert m.config.time_cond_proj_dim == 256


def test_export_never_mixes_old_and_new_files(tiny_pipeline, tmp_path):
  """A non-empty output folder is refused without --overwrite (before loading anything); with
  it, the folder is replaced whole: a stale fp16 variant from an earlier export is gone."""
  out = tmp_path / "o"
  stale = out / "unet" / "diffusion_pytorch_model.fp16.safetensors"
  stale.parent.mkdir(parents=True)
  stale.write_bytes(b"old")
  r = _export_cli(f"--model={tiny_pipeline('sd1_lcm')}", f"--output={out}")
  assert r.returncode == 2
  assert r.stderr.strip().splitlines() == [f"error: {out} is not empty; pass --overwrite (overwrite=True) to replace it"]
  assert sorted(p.name for p in out.rglob("*")) == ["diffusion_pytorch_model.fp16.safetensors", "unet"]
  r = _export_cli(f"--model={tiny_pipeline('sd1_lcm')}", f"--output={out}", "--overwrite")
  assert r.returncode == 0, r.stderr
  assert not stale.exists()
  assert (out / UNET_FILE).is_file()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]  # no staging folder left behind
  # A file where the folder should be, or above it: one line each, nothing written.
  (tmp_path / "f").write_text("x")
  for bad, message in ((tmp_path / "f", "is a file, not a folder"), (tmp_path / "f" / "sub", "is a file")):
    r = _export_cli(f"--model={tiny_pipeline('sd1_lcm')}", f"--output={bad}", "--overwrite")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, r.stderr
  assert (tmp_path / "f").read_text() == "x"
