"""Parity of `lcm_jax.eval` (FID Inception, Frechet distance, CLIP score, prompt sets) with the
reference implementations, on random weights (no downloads).

How pytorch-fid runs here. pytorch-fid needs torchvision, and PyPI's torchvision wheel is a
CUDA build whose C++ ops library cannot load beside the CPU torch the tests pin; installed
into the virtual environment it would also break transformers' image processors (which import
torchvision when it is present). So the *unmodified* packages torchvision 0.28.0 (the
release for torch 2.13), pytorch-fid 0.3.0 and clean-fid 0.1.35 are installed into a folder
that is not on `sys.path` (`<venv>/reference-packages`, by `INSTALL_HINT`'s `pip install
--no-deps --target`, which the Makefile's install step runs), and `REFERENCE_SCRIPT` imports
them in a subprocess. torchvision's Python import registers fake
kernels for two of its C++ ops (`nms`, `qnms`) without checking that the library loaded, so
the script first declares those two operator schemas; nothing else is patched. pytorch-fid's
real `InceptionV3`, built from torchvision's real `Inception3` and blocks, then runs; its weight
download (`load_state_dict_from_url`) is replaced by a random state dict of the right layout.

Random weights that can fail a test: with torch's default initialisation and unit BatchNorm
statistics pool3 is almost input-independent, so the reference draws the BatchNorm affine
parameters at random, calibrates the running statistics on smooth random images (training
mode, momentum 1), then perturbs them (variance x U(0.7, 1.4), mean + 0.1 std noise). The
test checks that the features really differ between images.

Measured on this CPU: Inception pool3 vs pytorch-fid 2.6e-5 of max |pool3| (bound 1e-4);
bilinear resize vs torch 1 float32 ulp; FID vs pytorch-fid's `calculate_frechet_distance`
3e-7 / 6e-7 relative from features (pytorch-fid keeps the mean in float32; on the same
statistics 1e-9 / 2e-8, and 1e-13 against scipy's sqrtm), 2e-8 for rank-deficient
covariances; CLIP
preprocessing bit-equal to transformers'; CLIP embeddings vs transformers within 1e-4 of scale.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcm_jax import weights
from lcm_jax.errors import LcmJaxError, UnsupportedConfigError, WeightsError
from lcm_jax.eval import clip_score, fid, inception, prompts
from lcm_jax.models import clip
from tests.helpers import REPO, max_error, perturb_, tiny_clip

REFERENCE_PACKAGES = os.environ.get("LCM_JAX_REFERENCE_PACKAGES",
                                    os.path.join(sys.prefix, "reference-packages"))
REFERENCE_PINS = ("torchvision==0.28.0", "pytorch-fid==0.3.0", "clean-fid==0.1.35")
INSTALL_HINT = (f"{sys.executable} -m pip install --no-deps --target {REFERENCE_PACKAGES} "
                + " ".join(REFERENCE_PINS))

REFERENCE_SCRIPT = r"""
import sys
import numpy as np
import torch

work, packages = sys.argv[1], sys.argv[2]
sys.path.insert(0, packages)
# The CUDA build's ops library cannot load beside CPU torch; torchvision's import registers
# fake kernels for these two ops regardless, which needs the operators to exist.
for op in ("nms", "qnms"):
  torch.library.define(f"torchvision::{op}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
import torchvision
import pytorch_fid.inception as pfi
from pytorch_fid.fid_score import calculate_frechet_distance
from cleanfid.resize import make_resizer

inputs = dict(np.load(f"{work}/inputs.npz"))
out = {"versions": np.asarray([torchvision.__version__, pfi.__file__])}
torch.manual_seed(0)

# pytorch-fid's weight loader, patched: a random state dict of its Inception's layout.
skeleton = torchvision.models.inception_v3(num_classes=1008, aux_logits=False, weights=None, init_weights=False)
pfi.load_state_dict_from_url = lambda *args, **kwargs: skeleton.state_dict()
built = []
make_inception = pfi.fid_inception_v3
pfi.fid_inception_v3 = lambda: built.append(make_inception()) or built[-1]
model = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
net = built[0]  # the module whose state dict pytorch-fid's .pth file holds

norms = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
with torch.no_grad():
  for m in norms:
    m.weight.uniform_(0.5, 1.5)
    m.bias.normal_(0.0, 0.3)
    m.momentum = 1.0
  coarse = torch.rand(4, 3, 8, 8)
  model.train()
  model(torch.nn.functional.interpolate(coarse, size=(64, 64), mode="bilinear", align_corners=False))
  model.eval()
  for m in norms:
    m.running_var.mul_(torch.empty_like(m.running_var).uniform_(0.7, 1.4))
    m.running_mean.add_(0.1 * m.running_var.sqrt() * torch.randn_like(m.running_mean))
torch.save(net.state_dict(), f"{work}/pt_inception.pth")

# fid_score.get_activations: ToTensor per image, the model, pool3 squeezed.
to_tensor = torchvision.transforms.ToTensor()
batch = torch.stack([to_tensor(im) for im in inputs["images"]])
with torch.no_grad():
  out["pool3"] = model(batch)[0].squeeze(3).squeeze(2).numpy()

# calculate_activation_statistics, then the distance, for each pair of feature sets.
for name in ("a", "b", "c", "small_a", "small_b"):
  act = inputs[name]
  out[f"mu_{name}"], out[f"sigma_{name}"] = np.mean(act, axis=0), np.cov(act, rowvar=False)
for x, y in (("a", "b"), ("a", "c"), ("small_a", "small_b")):
  out[f"fid_{x}_{y}"] = np.asarray(calculate_frechet_distance(
      out[f"mu_{x}"], out[f"sigma_{x}"], out[f"mu_{y}"], out[f"sigma_{y}"]))

resize = make_resizer("PIL", False, "bicubic", (299, 299))  # clean-fid's "clean" mode
for name in ("clean_images", "clean_small"):
  out[name] = np.stack([resize(im) for im in inputs[name]])
np.savez(f"{work}/outputs.npz", **out)
print("OK")
"""


def smooth_images(rng: np.random.Generator, n: int, height: int, width: int) -> np.ndarray:
  """[n, height, width, 3] uint8 pictures with structure at several scales (not white noise)."""
  import PIL.Image
  out = []
  for _ in range(n):
    coarse = rng.integers(0, 256, (rng.integers(3, 9), rng.integers(3, 9), 3), dtype=np.uint8)
    big = np.asarray(PIL.Image.fromarray(coarse).resize((width, height), PIL.Image.BILINEAR), np.int16)
    out.append(np.clip(big + rng.integers(-20, 21, big.shape), 0, 255).astype(np.uint8))
  return np.stack(out)


def feature_sets(rng: np.random.Generator, n: int, d: int, shift: float = 0.0) -> np.ndarray:
  """[n, d] non-negative correlated features (like pool3's averaged ReLUs), float32."""
  mixing = np.random.default_rng(1).normal(size=(d, d)) / np.sqrt(d)
  z = rng.normal(size=(n, d)) @ mixing + shift
  return np.log1p(np.exp(z)).astype(np.float32)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """Runs REFERENCE_SCRIPT once; returns (work folder, inputs, outputs)."""
  if not os.path.isdir(os.path.join(REFERENCE_PACKAGES, "pytorch_fid")):
    pytest.fail(f"the reference packages are not installed in {REFERENCE_PACKAGES}; "
                f"`make install` does it, or: {INSTALL_HINT}")
  work = tmp_path_factory.mktemp("fid_reference")
  rng = np.random.default_rng(0)
  inputs = {
      "images": smooth_images(rng, 3, 48, 64),          # upscaled to 299 inside the networks
      "clean_images": smooth_images(rng, 2, 300, 400),   # shrunk to 299 (PIL bicubic antialiases)
      "clean_small": smooth_images(rng, 1, 40, 50),      # enlarged
      "a": feature_sets(rng, 600, 64), "b": feature_sets(rng, 600, 64),
      "c": feature_sets(rng, 600, 64, shift=0.3),
      "small_a": feature_sets(rng, 40, 64), "small_b": feature_sets(rng, 40, 64, shift=0.2),
  }
  np.savez(work / "inputs.npz", **inputs)
  r = subprocess.run([sys.executable, "-c", REFERENCE_SCRIPT, str(work), REFERENCE_PACKAGES], cwd=REPO,
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-4000:]
  return work, inputs, dict(np.load(work / "outputs.npz"))


# --------------------------------------------------------------------------------------
# Inception


def test_inception_features_match_pytorch_fid(reference, tmp_path):
  from lcm_jax.eval.convert_inception import convert
  work, inputs, out = reference
  assert out["versions"][0].startswith("0.28.0")
  converted = str(tmp_path / "inception.safetensors")
  tensors = convert(str(work / "pt_inception.pth"), converted)
  assert not any(k.startswith("fc.") or "num_batches" in k for k in tensors)
  params = inception.load_inception(converted)
  ours = inception.InceptionFeatures(params, batch_size=2)(inputs["images"])  # 2, then 1 padded to 2
  ref = out["pool3"]
  assert ours.shape == ref.shape == (3, 2048) and ours.dtype == np.float32
  # The weights make the features depend on the image: pairs differ by far more than the bound.
  spread = np.abs(ref[0] - ref[1]).max() / np.abs(ref).max()
  assert spread > 0.05, spread
  rel = np.abs(ours - ref).max() / np.abs(ref).max()
  assert rel <= 1e-4, rel


def test_resize_is_torch_bilinear_without_antialias():
  import torch
  rng = np.random.default_rng(3)
  # Measured: 1 float32 ulp (1.2e-7) for both paths at every size.
  for h, w in ((17, 23), (48, 64), (299, 299), (320, 410), (600, 512)):
    x = rng.uniform(0, 1, (1, h, w, 3)).astype(np.float32)
    ref = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(299, 299),
                                          mode="bilinear", align_corners=False).permute(0, 2, 3, 1).numpy()
    device = np.asarray(jax.jit(inception.resize_bilinear)(jnp.asarray(x)))
    host = inception.resize_bilinear_host(x[0])
    assert np.abs(device - ref).max() <= 1e-6, (h, w)
    assert np.abs(host - ref[0]).max() <= 1e-6, (h, w)
  # jax's default (antialiased) resize is a different filter when it shrinks an image.
  big = jnp.asarray(rng.uniform(0, 1, (1, 600, 512, 3)).astype(np.float32))
  antialiased = jax.image.resize(big, (1, 299, 299, 3), "bilinear")
  assert float(jnp.abs(antialiased - inception.resize_bilinear(big)).max()) > 0.05


def test_clean_mode_resize_is_clean_fids(reference):
  _, inputs, out = reference
  for name in ("clean_images", "clean_small"):
    ours = np.stack([inception.clean_resize(im) for im in inputs[name]])
    np.testing.assert_array_equal(ours, out[name])
  assert np.abs(inception.clean_network_input(inputs["clean_images"][0])).max() <= 1.0


def test_converter_refuses_what_is_not_the_fid_state_dict(tmp_path):
  import torch

  from lcm_jax.eval.convert_inception import convert
  # Only tensors may be unpickled: an arbitrary object is refused, not constructed.
  torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(1), "hook": UnpicklableMarker()}, tmp_path / "evil.pth")
  with pytest.raises(LcmJaxError, match="cannot read"):
    convert(str(tmp_path / "evil.pth"), str(tmp_path / "x.safetensors"))
  torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(32, 3, 3, 3)}, tmp_path / "partial.pth")
  with pytest.raises(WeightsError, match="missing keys"):
    convert(str(tmp_path / "partial.pth"), str(tmp_path / "x.safetensors"))
  assert not (tmp_path / "x.safetensors").exists()
  with pytest.raises(LcmJaxError, match="convert_inception"):
    inception.load_inception(str(tmp_path / "partial.pth"))


class UnpicklableMarker:
  """A class `torch.load(weights_only=True)` must refuse to rebuild."""


def test_offline_download_fails_with_one_clear_message(tmp_path):
  from lcm_jax.eval.convert_inception import fetch_inception_weights
  with pytest.raises(LcmJaxError, match="convert_inception") as info:
    fetch_inception_weights(str(tmp_path), url="http://127.0.0.1:9/pt_inception.pth", timeout=5)
  assert "could not download" in str(info.value)


# --------------------------------------------------------------------------------------
# Frechet distance and statistics


def scipy_fid(mu1, s1, mu2, s2) -> float:
  import scipy.linalg
  root = scipy.linalg.sqrtm(s1 @ s2)
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(root).real)


def test_fid_matches_pytorch_fid_and_scipy(reference):
  _, inputs, out = reference
  for x, y in (("a", "b"), ("a", "c")):
    mu_x, s_x = fid.feature_statistics(inputs[x])
    mu_y, s_y = fid.feature_statistics(inputs[y])
    # Our float64 statistics are pytorch-fid's np.cov, and its np.mean up to that mean's
    # float32 rounding (np.mean of float32 activations stays float32).
    assert np.abs(mu_x - out[f"mu_{x}"]).max() <= 1e-6 * np.abs(out[f"mu_{x}"]).max()
    assert np.abs(s_x - out[f"sigma_{x}"]).max() <= 1e-12 * np.abs(out[f"sigma_{x}"]).max()
    theirs = float(out[f"fid_{x}_{y}"])
    # The distance alone, on pytorch-fid's own statistics: measured 1e-9 and 2e-8 relative
    # (pytorch-fid forms |mu1 - mu2|^2 from its float32 means in float32).
    same_stats = fid.frechet_distance(out[f"mu_{x}"], out[f"sigma_{x}"], out[f"mu_{y}"], out[f"sigma_{y}"])
    assert abs(same_stats - theirs) <= 1e-6 * theirs, (x, y, same_stats, theirs)
    # Features to FID: measured 3e-7 and 6e-7 relative, all of it pytorch-fid's float32 mean.
    ours = fid.frechet_distance(mu_x, s_x, mu_y, s_y)
    assert abs(ours - theirs) <= 1e-6 * theirs, (x, y, ours, theirs)
    assert abs(ours - scipy_fid(mu_x, s_x, mu_y, s_y)) <= 1e-9 * theirs  # measured 1e-13


def test_fid_of_singular_covariances(reference):
  # 40 samples of 64-d features: rank-39 covariances, as in any FID of fewer images than dims.
  _, inputs, out = reference
  ours = fid.frechet_distance(*fid.feature_statistics(inputs["small_a"]), *fid.feature_statistics(inputs["small_b"]))
  theirs = float(out["fid_small_a_small_b"])
  assert abs(ours - theirs) <= 1e-6 * theirs, (ours, theirs)


def test_fid_moves_the_right_way():
  rng = np.random.default_rng(7)
  real = feature_sets(rng, 2000, 32)
  stats = fid.feature_statistics(real)
  assert abs(fid.frechet_distance(*stats, *stats)) <= 1e-9 * np.trace(stats[1])
  same = fid.frechet_distance(*stats, *fid.feature_statistics(feature_sets(rng, 2000, 32)))
  shifted = [fid.frechet_distance(*stats, *fid.feature_statistics(feature_sets(rng, 2000, 32, shift=s)))
             for s in (0.25, 0.5, 1.0)]
  assert 0 < same < shifted[0] < shifted[1] < shifted[2], (same, shifted)
  assert same < 0.1 * shifted[0]


def test_streaming_statistics_equal_one_pass():
  rng = np.random.default_rng(2)
  x = feature_sets(rng, 1003, 48, shift=3.0)  # a large mean: the naive sum of squares would cancel
  stats = fid.FeatureStats()
  for start, size in ((0, 1), (1, 500), (501, 2), (503, 500)):
    stats.update(x[start:start + size])
  stats.update(x[:0])
  x64 = x.astype(np.float64)
  assert stats.count == 1003
  assert np.abs(stats.mu - x64.mean(0)).max() <= 1e-13 * np.abs(x64.mean(0)).max()
  cov = np.cov(x64, rowvar=False)
  assert np.abs(stats.sigma - cov).max() <= 1e-12 * np.abs(cov).max()
  with pytest.raises(LcmJaxError, match="at least 2"):
    _ = fid.FeatureStats().update(x[:1]).sigma


def test_statistics_files(tmp_path):
  rng = np.random.default_rng(4)
  stats = fid.FeatureStats().update(feature_sets(rng, 50, 8))
  fid.save_statistics(str(tmp_path / "ref.npz"), stats, mode="pytorch_fid", source="unit test")
  mu, sigma, meta = fid.load_statistics(str(tmp_path / "ref.npz"), mode="pytorch_fid")
  np.testing.assert_array_equal(mu, stats.mu)
  np.testing.assert_array_equal(sigma, stats.sigma)
  assert meta == {"num_images": 50, "mode": "pytorch_fid", "source": "unit test"}
  with pytest.raises(LcmJaxError, match="not comparable"):
    fid.load_statistics(str(tmp_path / "ref.npz"), mode="clean")
  np.savez(tmp_path / "pytorch_fid.npz", mu=mu, sigma=sigma)  # pytorch-fid's --save-stats layout
  assert fid.load_statistics(str(tmp_path / "pytorch_fid.npz"), mode="clean")[2] == {}
  np.savez(tmp_path / "other.npz", x=mu)
  with pytest.raises(LcmJaxError, match="no 'mu'"):
    fid.load_statistics(str(tmp_path / "other.npz"))


def test_reference_statistics_of_a_folder_are_cached(tmp_path):
  import PIL.Image
  rng = np.random.default_rng(5)
  folder = tmp_path / "real"
  folder.mkdir()
  for i, im in enumerate(smooth_images(rng, 5, 20, 30)):
    PIL.Image.fromarray(im).save(folder / f"{i}.png")
  calls = []

  def features(images):  # stands in for InceptionFeatures.of_images
    calls.append(len(images))
    return np.stack([im.reshape(-1, 3).mean(0) for im in images]).astype(np.float32)

  cache = str(tmp_path / "cache" / "real.npz")
  mu, sigma, _ = fid.reference_statistics(str(folder), features, mode="pytorch_fid", cache=cache)
  again = fid.reference_statistics(str(folder), features, mode="pytorch_fid", cache=cache)
  assert calls == [5]
  np.testing.assert_array_equal(again[0], mu)
  with pytest.raises(LcmJaxError, match="delete it"):  # the cache is of another recipe
    fid.reference_statistics(str(folder), features, mode="pytorch_fid", cache=cache, limit=3)
  with pytest.raises(LcmJaxError, match="no images"):
    fid.reference_statistics(str(tmp_path / "cache"), features, mode="pytorch_fid")


# --------------------------------------------------------------------------------------
# CLIP


def tiny_clip_config(text_act: str, vision_act: str, legacy_eos: bool):
  import transformers
  text = tiny_clip.tiny_clip_text_config(text_act, legacy_eos_token_id=legacy_eos)
  vision = transformers.CLIPVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, image_size=224, patch_size=32,
                                         hidden_act=vision_act, projection_dim=24)
  return transformers.CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=24)


@functools.cache
def tiny_clip_pair(text_act="quick_gelu", vision_act="quick_gelu", legacy_eos=False, seed=0):
  """A perturbed transformers CLIPModel, its state dict as NumPy, our module and params
  (built once per process: building a transformers model takes seconds)."""
  import transformers
  reference = transformers.CLIPModel(tiny_clip_config(text_act, vision_act, legacy_eos)).eval()
  perturb_(reference, seed, lambda name, p: 0.3 if "norm" in name else 0.1)
  state = {k: v.detach().numpy() for k, v in reference.state_dict().items()}
  module = clip.CLIPModel(clip.CLIPModelConfig.from_dict(reference.config.to_dict()))
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *module.dummy_inputs()))["params"]
  return reference, state, module, weights.torch_to_flax(state, shapes, what="tiny CLIPModel")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  from lcm_jax.tokenizer import load_tokenizer
  return load_tokenizer(tiny_clip.write_tiny_tokenizer(str(tmp_path_factory.mktemp("clip_tokenizer"))))


PROMPTS = ["a red circle on a blue background", "a photo of a cat", "",
           "a small green triangle in the top left corner of a white background with black dots"]


@pytest.mark.parametrize("text_act,vision_act,legacy_eos", [("quick_gelu", "quick_gelu", True),
                                                            ("gelu", "gelu", False)])
def test_clip_embeddings_match_transformers(tokenizer, text_act, vision_act, legacy_eos):
  import torch

  from lcm_jax.tokenizer import tokenize
  reference, _, module, params = tiny_clip_pair(text_act, vision_act, legacy_eos, seed=len(text_act))
  pixels = clip_score.preprocess_images(smooth_images(np.random.default_rng(1), 3, 260, 300))
  ids = tokenize(tokenizer, PROMPTS)
  with torch.no_grad():
    ref_image = reference.get_image_features(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2))
    ref_text = reference.get_text_features(input_ids=torch.from_numpy(ids.astype(np.int64)))
  ref_image = getattr(ref_image, "pooler_output", ref_image).numpy()  # transformers v5 returns an output
  ref_text = getattr(ref_text, "pooler_output", ref_text).numpy()
  image, text = embed(module, params, pixels, ids)
  for ours, ref in ((image, ref_image), (text, ref_text)):
    err, scale = max_error(ours, ref)
    assert err <= 1e-4 * scale, (err, scale)
  # The score is torchmetrics': 100 * cos per pair, from the unnormalised embeddings.
  cos = torch.nn.functional.cosine_similarity(torch.from_numpy(ref_image), torch.from_numpy(ref_text[:3]))
  np.testing.assert_allclose(clip_score.pair_scores(image, text[:3]), 100 * cos.numpy(), atol=1e-3)


def embed(module, params, pixels, ids):
  """Our (image embeds, text embeds), jitted (eager Flax takes seconds even for tiny models)."""
  run = jax.jit(lambda p, x, t: (module.apply({"params": p}, x, method="image_embeds"),
                                 module.apply({"params": p}, t, method="text_embeds")))
  return run(params, jnp.asarray(pixels), jnp.asarray(ids))


def test_load_clip_folder_and_score(tmp_path, tokenizer):
  import torch
  from safetensors.numpy import save_file

  from lcm_jax.tokenizer import tokenize
  reference, state, _, _ = tiny_clip_pair("quick_gelu", "quick_gelu", True, seed=len("quick_gelu"))
  folder = tmp_path / "clip"
  tiny_clip.write_tiny_tokenizer(str(folder))
  # As transformers writes it (logit_scale 0-d), plus the buffer older versions saved.
  save_file(dict(state, **{"vision_model.embeddings.position_ids": np.arange(50)[None]}),
            str(folder / "model.safetensors"))
  (folder / "config.json").write_text(json.dumps(reference.config.to_dict()))
  (folder / "preprocessor_config.json").write_text(json.dumps(
      {"crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
       "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": list(clip_score.OPENAI_CLIP_MEAN),
       "image_std": list(clip_score.OPENAI_CLIP_STD), "resample": 3, "size": 224}))
  scorer = clip_score.load_clip(str(folder), batch_size=2)
  images = smooth_images(np.random.default_rng(2), 3, 230, 240)
  scores = scorer.scores(images, PROMPTS[:3])  # 3 pairs in batches of 2: one padded batch
  with torch.no_grad():  # transformers' model on transformers' preprocessing of the same pairs
    pixels = torch.from_numpy(clip_score.preprocess_images(images)).permute(0, 3, 1, 2)
    ref_image = reference.get_image_features(pixel_values=pixels)
    ref_text = reference.get_text_features(input_ids=torch.from_numpy(tokenize(tokenizer, PROMPTS[:3])).long())
  cos = torch.nn.functional.cosine_similarity(getattr(ref_image, "pooler_output", ref_image),
                                              getattr(ref_text, "pooler_output", ref_text))
  np.testing.assert_allclose(scores, 100 * cos.numpy(), atol=1e-3)
  acc = clip_score.ClipScores().update(scores[:2]).update(scores[2:])
  assert acc.count == 3 and abs(acc.mean - scores.mean()) < 1e-9
  with pytest.raises(LcmJaxError, match="pairs"):
    scorer.scores(images, PROMPTS[:2])


def test_clip_score_clamps_the_mean_like_torchmetrics():
  assert clip_score.mean_clip_score(np.array([-10.0, 4.0])) == 0.0
  assert clip_score.mean_clip_score(np.array([-10.0, 30.0])) == 10.0
  assert clip_score.ClipScores().update(np.array([-3.0, 1.0])).value == 0.0


@pytest.mark.parametrize("size", [(224, 224), (260, 300), (300, 260), (100, 150), (225, 1000), (479, 333), (50, 50)])
def test_clip_preprocessing_equals_transformers_pil_processor(size):
  import transformers
  processor_cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
  processor = processor_cls()
  image = smooth_images(np.random.default_rng(size[0]), 1, *size)[0]
  ref = processor(images=[image], return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
  ours = clip_score.preprocess_image(image)
  assert ours.dtype == ref.dtype == np.float32
  np.testing.assert_array_equal(ours, ref)


def test_preprocessor_and_model_configs():
  new_style = {"size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224}}
  assert clip_score.CLIPPreprocess.from_dict(new_style) == clip_score.CLIPPreprocess()
  with pytest.raises(UnsupportedConfigError, match="do_center_crop"):
    clip_score.CLIPPreprocess.from_dict({"do_center_crop": False})
  # An old hub config: *_config_dict decide the towers (transformers' rule), generic v4 keys inert.
  legacy = {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": 1024,
            "logit_scale_init_value": 2.6592, "initializer_factor": 1.0, "torch_dtype": "float32",
            "text_config": {"hidden_act": "quick_gelu", "hidden_size": 8, "model_type": "clip_text_model",
                            "is_decoder": False, "architectures": None},
            "text_config_dict": {"hidden_act": "gelu", "hidden_size": 1024, "intermediate_size": 4096,
                                 "num_attention_heads": 16, "num_hidden_layers": 24},
            "vision_config": {"hidden_size": 8},
            "vision_config_dict": {"hidden_act": "gelu", "hidden_size": 1408, "intermediate_size": 6144,
                                   "num_attention_heads": 16, "num_hidden_layers": 40, "patch_size": 14,
                                   "image_size": 224, "layer_norm_eps": 1e-5}}
  config = clip.CLIPModelConfig.from_dict(legacy)
  assert (config.text.hidden_size, config.text.hidden_act) == (1024, "gelu")
  assert (config.vision.hidden_size, config.vision.num_patches, config.vision.head_dim) == (1408, 256, 88)
  with pytest.raises(UnsupportedConfigError, match="use_rope"):
    clip.CLIPModelConfig.from_dict(dict(legacy, vision_config_dict=dict(legacy["vision_config_dict"], use_rope=True)))
  with pytest.raises(UnsupportedConfigError, match="architectures"):
    clip.CLIPModelConfig.from_dict(dict(legacy, architectures=["SiglipModel"]))


# --------------------------------------------------------------------------------------
# Prompt sets


def test_prompt_files_and_deterministic_samples(tmp_path):
  (tmp_path / "p.txt").write_text("a cat\n\n  a  dog \na tree\n")
  text = prompts.load_prompt_set(str(tmp_path / "p.txt"))
  assert text.prompts == ("a cat", "a dog", "a tree") and text.ids == ("line1", "line3", "line4")
  (tmp_path / "PartiPrompts.tsv").write_text(
      "Prompt\tCategory\tChallenge\tNote\nA bird\tAnimals\tSimple\t\nA \"red\" car\tVehicles\tColor\tx\n"
      "An owl\tAnimals\tSimple\t\n")
  parti = prompts.load_prompt_set(str(tmp_path / "PartiPrompts.tsv"))
  assert parti.prompts == ("A bird", "A \"red\" car", "An owl")
  assert prompts.read_parti_prompts(str(tmp_path / "PartiPrompts.tsv"), category="Animals").ids == ("row0", "row2")
  annotations = [{"image_id": i // 5, "id": 1000 + i, "caption": f"caption {i}\n"} for i in range(50)]
  (tmp_path / "captions_val2014.json").write_text(json.dumps({"annotations": annotations}))
  coco = prompts.load_prompt_set(str(tmp_path / "captions_val2014.json"), seed=1)
  assert len(coco) == 10 and len({int(i[4:]) // 5 for i in coco.ids}) == 10  # one caption per image
  assert all(p == f"caption {int(i[4:]) - 1000}" for p, i in zip(coco.prompts, coco.ids))
  assert len(prompts.read_coco_captions(str(tmp_path / "captions_val2014.json"), one_per_image=False)) == 50
  assert prompts.load_prompt_set(str(tmp_path / "captions_val2014.json"), seed=2).ids != coco.ids
  sample = coco.sample(4, seed=3)
  assert sample == coco.sample(4, seed=3) and sample != coco.sample(4, seed=4)
  assert sorted(coco.sample(None, seed=0).ids) == sorted(coco.ids)
  # The drawn prompts are fixed by (set, n, seed): pinned so that a change in the draw is caught.
  assert text.sample(3, seed=0).prompts == tuple(text.prompts[i] for i in np.random.Generator(
      np.random.PCG64(0)).permutation(3))
  with pytest.raises(LcmJaxError, match="cannot draw"):
    text.sample(4)
  with pytest.raises(LcmJaxError, match="does not exist"):
    prompts.load_prompt_set(str(tmp_path / "missing.txt"))
  with pytest.raises(LcmJaxError, match="not bundled"):
    prompts.load_prompt_set("parti")


def test_tfds_coco_captions_reads_mock_data_or_says_what_is_missing():
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=4):
    try:
      import tensorflow  # noqa: F401  (TFDS's coco_captions builder imports it)
    except ImportError:
      with pytest.raises(LcmJaxError, match="needs TensorFlow.*captions_val2014.json"):
        prompts.load_prompt_set("coco2014")
      return
    coco = prompts.load_prompt_set("coco2014")
  assert len(coco) >= 1 and all(i.startswith("coco") for i in coco.ids)
