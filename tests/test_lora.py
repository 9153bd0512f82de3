"""LoRA on the Flax UNet (`lcm_jax.lora`) against diffusers + PEFT.

Tiny random SD pipelines (tests/helpers/tiny_models.py) and random adapters whose B is NOT
zero (a fresh adapter changes nothing, so it could not show a transposed or mis-scaled
matrix). The UNet comparisons use the fp32 bound of test_unet.py; the image comparisons the
2/255 bound of test_sample.py, with diffusers' LCMScheduler fed the noise our sampler draws.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from lcm_jax import lora
from lcm_jax.errors import LcmJaxError
from lcm_jax.load import load_pipeline
from lcm_jax.weights import flatten_tree, unflatten_tree
from tests.helpers import fp32_error

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

BATCH, TEXT_LEN, TEXT_DIM = 2, 7, 32


def random_lora(unet_params, rank: int, seed: int, targets=lora.DEFAULT_TARGETS, b_std: float = 0.05) -> dict:
  """PEFT's initial A with a random, nonzero B."""
  adapters = lora.init_lora(jax.random.PRNGKey(seed), unet_params, rank, targets)
  rng = np.random.RandomState(seed)
  flat = {p: (np.asarray(x) if p[-1] == lora.A else (b_std * rng.randn(*x.shape)).astype(np.float32))
          for p, x in flatten_tree(adapters).items()}
  return unflatten_tree(flat)


@pytest.fixture(scope="module")
def pipes(tiny_pipeline):
  """flavour -> (folder, our Pipeline) (loaded once)."""
  loaded = {}

  def get(flavour):
    if flavour not in loaded:
      loaded[flavour] = (tiny_pipeline(flavour), load_pipeline(tiny_pipeline(flavour)))
    return loaded[flavour]
  return get


def _unet_inputs(seed=0):
  rng = np.random.RandomState(seed)
  sample = rng.randn(BATCH, 4, 8, 8).astype(np.float32)
  t = np.array([999, 259], np.int64)
  context = rng.randn(BATCH, TEXT_LEN, TEXT_DIM).astype(np.float32)
  return sample, t, context


def _ours(pipe, params, seed=0):
  sample, t, context = _unet_inputs(seed)
  out = jax.jit(lambda p, x, tt, c: pipe.unet.apply({"params": p}, x, tt, c))(
      params, jnp.asarray(sample.transpose(0, 2, 3, 1)), jnp.asarray(t), jnp.asarray(context))
  return np.asarray(out).transpose(0, 3, 1, 2)


def _theirs(torch_pipe, seed=0):
  sample, t, context = _unet_inputs(seed)
  with torch.no_grad():
    return torch_pipe.unet(torch.from_numpy(sample), torch.from_numpy(t),
                           encoder_hidden_states=torch.from_numpy(context)).sample.numpy()


def _torch_pipe(folder):
  pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None,
                                                           requires_safety_checker=False)
  pipe.set_progress_bar_config(disable=True)
  return pipe


# ---- targets and initialisation ---------------------------------------------------------


@pytest.mark.parametrize("flavour", ["sd1", "sd2"])
def test_default_targets_select_the_layers_peft_adapts(pipes, flavour):
  folder, pipe = pipes(flavour)
  unet = diffusers.UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
  unet.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, target_modules=list(lora.DEFAULT_TARGETS)))
  theirs = {n.removesuffix(".lora_A") for n, _ in unet.named_modules() if n.endswith(".lora_A")}
  ours = set(lora.target_layers(pipe.params["unet"]))
  assert ours == theirs
  # Every kind of layer the script adapts is there: convs (3x3 and 1x1), linears, samplers.
  assert any(n.endswith("downsamplers.0.conv") for n in ours) and any(n.endswith("time_emb_proj") for n in ours)


def test_init_is_peft_init_and_changes_nothing(pipes):
  _, pipe = pipes("sd1")
  params = pipe.params["unet"]
  adapters = lora.init_lora(jax.random.PRNGKey(0), params, 4)
  for path, x in flatten_tree(adapters).items():
    x = np.asarray(x)
    if path[-1] == lora.B:
      assert not x.any()
    else:
      bound = 1 / np.sqrt(np.prod(x.shape[:-1]))
      assert np.abs(x).max() <= bound and np.abs(x).max() > 0.5 * bound and x.std() > 0.4 * bound
  merged = lora.merge(params, adapters, 1.0)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(params)))
  assert lora.num_params(adapters) == sum(np.prod(x.shape) for x in jax.tree.leaves(adapters))


def test_merge_then_unmerge_restores_the_base(pipes):
  _, pipe = pipes("sd1")
  params = pipe.params["unet"]
  adapters = random_lora(params, 4, seed=1)
  merged = lora.merge(params, adapters, 0.75)
  changed = [p for p, x in flatten_tree(merged).items() if not np.array_equal(x, flatten_tree(params)[p])]
  assert {lora.module_name(p[:-1]) for p in changed} == set(lora.target_layers(params))
  restored = lora.unmerge(merged, adapters, 0.75)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(params)):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


# ---- UNet parity with diffusers + PEFT -----------------------------------------------------


@pytest.mark.parametrize("flavour", ["sd1", "sd2"])
def test_exported_lora_loads_in_diffusers_and_gives_the_same_unet(pipes, flavour, tmp_path):
  folder, pipe = pipes(flavour)
  params = pipe.params["unet"]
  adapters = random_lora(params, 4, seed=2)
  alpha_scale = 2.0  # alpha / r of a trained adapter: folded into B in the file
  lora.save_diffusers_lora(str(tmp_path / "lora"), adapters, alpha_scale)

  torch_pipe = _torch_pipe(folder)
  torch_pipe.load_lora_weights(str(tmp_path / "lora"), adapter_name="ours")
  # Nothing missing or unexpected: PEFT's state dict of the loaded adapter is the file.
  loaded = peft.get_peft_model_state_dict(torch_pipe.unet, adapter_name="ours")
  written = lora.to_diffusers_state_dict(adapters, alpha_scale)
  assert {"unet." + k for k in loaded} == set(written)
  for k, v in loaded.items():
    np.testing.assert_array_equal(v.numpy(), written["unet." + k])

  torch_pipe.set_adapters(["ours"], adapter_weights=[0.6])
  ref = _theirs(torch_pipe)
  out = _ours(pipe, lora.apply_loras(params, [(adapters, 0.6 * alpha_scale)]))
  err, bound = fp32_error(out, ref)
  assert err <= bound
  # The LoRA changes the output well beyond the bound (else this test could not fail).
  assert fp32_error(_ours(pipe, params), ref)[0] > 100 * bound


def test_reimport_of_an_exported_lora_is_the_adapter(pipes, tmp_path):
  _, pipe = pipes("sd2")
  params = pipe.params["unet"]
  adapters = random_lora(params, 3, seed=3)
  lora.save_diffusers_lora(str(tmp_path), adapters, 0.5)
  back = lora.read_lora(str(tmp_path), params)
  expected = flatten_tree(adapters)
  for path, x in flatten_tree(back).items():
    np.testing.assert_allclose(x, expected[path] * (0.5 if path[-1] == lora.B else 1.0), rtol=1e-6)
  assert set(flatten_tree(back)) == set(expected)


def _kohya_state_dict(adapters, alpha: float) -> dict[str, np.ndarray]:
  """Our adapters in kohya's naming (lora_unet_<module with _>.lora_down/lora_up/alpha)."""
  out = {}
  for key, value in lora.to_diffusers_state_dict(adapters).items():
    stem, which = key.removeprefix("unet.").rsplit(".lora_", 1)
    name = "lora_unet_" + stem.replace(".", "_")
    out[f"{name}.lora_down.weight" if which.startswith("A") else f"{name}.lora_up.weight"] = value
    out[f"{name}.alpha"] = np.asarray(alpha, np.float32)
  return out


def test_kohya_lora_with_alpha_matches_diffusers(pipes, tmp_path):
  from lcm_jax.safetensors_io import write_safetensors
  folder, pipe = pipes("sd1")
  params = pipe.params["unet"]
  rank, alpha = 4, 8.0  # scale alpha / r = 2
  adapters = random_lora(params, rank, seed=4)
  path = str(tmp_path / "kohya.safetensors")
  write_safetensors(path, _kohya_state_dict(adapters, alpha))

  ours_adapters = lora.read_lora(path, params)
  torch_pipe = _torch_pipe(folder)
  torch_pipe.load_lora_weights(path, adapter_name="k")
  err, bound = fp32_error(_ours(pipe, lora.apply_loras(params, [(ours_adapters, 1.0)])), _theirs(torch_pipe))
  assert err <= bound
  # ... and it is the adapter at scale alpha / r.
  err2, _ = fp32_error(_ours(pipe, lora.merge(params, adapters, alpha / rank)),
                       _ours(pipe, lora.apply_loras(params, [(ours_adapters, 1.0)])))
  assert err2 <= bound


def test_two_loras_with_weights_match_set_adapters(pipes, tmp_path):
  folder, pipe = pipes("sd1")
  params = pipe.params["unet"]
  first = random_lora(params, 4, seed=5)
  second = random_lora(params, 2, seed=6, targets=("to_q", "to_v", "conv1"))
  lora.save_diffusers_lora(str(tmp_path / "a"), first)
  lora.save_diffusers_lora(str(tmp_path / "b"), second)
  torch_pipe = _torch_pipe(folder)
  torch_pipe.load_lora_weights(str(tmp_path / "a"), adapter_name="a")
  torch_pipe.load_lora_weights(str(tmp_path / "b"), adapter_name="b")
  torch_pipe.set_adapters(["a", "b"], adapter_weights=[0.8, -1.5])
  ref = _theirs(torch_pipe)
  out = _ours(pipe, lora.apply_loras(params, [(lora.read_lora(str(tmp_path / "a"), params), 0.8),
                                              (lora.read_lora(str(tmp_path / "b"), params), -1.5)]))
  err, bound = fp32_error(out, ref)
  assert err <= bound


# ---- bad input --------------------------------------------------------------------------


def test_bad_targets_and_ranks_are_refused(pipes):
  _, pipe = pipes("sd1")
  params = pipe.params["unet"]
  with pytest.raises(LcmJaxError, match=r"'to_query'.*match no Dense or Conv layer"):
    lora.init_lora(jax.random.PRNGKey(0), params, 4, ("to_q", "to_query"))
  for rank in (0, -2, 1.5, True):
    with pytest.raises(LcmJaxError, match="rank must be a positive integer"):
      lora.init_lora(jax.random.PRNGKey(0), params, rank)
  with pytest.raises(LcmJaxError, match="non-empty"):
    lora.target_layers(params, ())


def test_keys_matching_no_layer_are_named_in_one_line(pipes, tmp_path):
  _, pipe = pipes("sd1")
  params = pipe.params["unet"]
  written = lora.to_diffusers_state_dict(random_lora(params, 2, seed=7, targets=("to_q",)))
  bad = dict(written)
  bad["unet.down_blocks.9.attentions.0.proj_in.lora_A.weight"] = np.zeros((2, 32), np.float32)
  bad["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"] = np.zeros((2, 32), np.float32)
  with pytest.raises(LcmJaxError) as info:
    lora.lora_from_state_dict(bad, params)
  message = str(info.value)
  assert "\n" not in message and "2 key(s) match no layer" in message and "down_blocks.9" in message
  assert "text-encoder" in message
  only_a = {k: v for k, v in written.items() if "lora_A" in k}
  with pytest.raises(LcmJaxError, match="no B"):
    lora.lora_from_state_dict(only_a, params)
  wrong = {k: (v[:, :3] if "lora_A" in k else v) for k, v in written.items()}
  with pytest.raises(LcmJaxError, match="do not fit"):
    lora.lora_from_state_dict(wrong, params)
  with pytest.raises(LcmJaxError, match="no such file"):
    lora.read_lora(str(tmp_path / "missing"), params)


def test_parse_lora_arg():
  assert lora.parse_lora_arg("runs/x") == ("runs/x", 1.0)
  assert lora.parse_lora_arg("runs/x:0.5") == ("runs/x", 0.5)
  assert lora.parse_lora_arg("runs/x:-1") == ("runs/x", -1.0)


# ---- 4-step LCM images with LoRAs: ours (load_pipeline(loras=...)) vs diffusers -------------


PROMPTS = ["a red circle on the left", "a photo of a cat"]
SIZE, SEED, STEPS = 16, 7, 4


@pytest.fixture(scope="module")
def lora_dirs(pipes, tmp_path_factory):
  """Two random LoRAs for the sd1 tiny pipeline, written in diffusers' format."""
  _, pipe = pipes("sd1")
  root = tmp_path_factory.mktemp("loras")
  first = lora.save_diffusers_lora(str(root / "first"), random_lora(pipe.params["unet"], 4, seed=21, b_std=0.2))
  second = lora.save_diffusers_lora(str(root / "second"),
                                    random_lora(pipe.params["unet"], 2, seed=22, b_std=0.2, targets=("to_k", "conv2")))
  return str(root / "first"), str(root / "second")


def _our_images(folder, loras, fuse):
  from lcm_jax import text_to_image
  from tests.test_sample import _latents_nchw
  t2i = text_to_image.TextToImage(load_pipeline(folder, loras=loras, fuse=fuse))
  return t2i(PROMPTS, sampler="lcm", num_steps=STEPS, guidance_scale=1.0, latents=_latents_nchw(), seed=SEED)


def _diffusers_images(folder, loras, monkeypatch):
  from tests.test_sample import _InjectedNoise, _latents_nchw, _our_lcm_noises
  pipe = _torch_pipe(folder)
  pipe.scheduler = diffusers.LCMScheduler.from_config(pipe.scheduler.config)
  names = []
  for i, (path, _) in enumerate(loras):
    pipe.load_lora_weights(path, adapter_name=f"l{i}")
    names.append(f"l{i}")
  if loras:
    pipe.set_adapters(names, adapter_weights=[w for _, w in loras])
  monkeypatch.setattr("diffusers.schedulers.scheduling_lcm.randn_tensor", _InjectedNoise(_our_lcm_noises(STEPS)))
  return pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=1.0, height=SIZE, width=SIZE,
              latents=torch.from_numpy(_latents_nchw()), output_type="np").images


def test_lcm_lora_image_matches_diffusers_load_lora_weights(pipes, lora_dirs, monkeypatch):
  folder, _ = pipes("sd1")
  first, _ = lora_dirs
  ours = _our_images(folder, [f"{first}:0.9"], fuse=False)
  ref = _diffusers_images(folder, [(first, 0.9)], monkeypatch)
  err = float(np.abs(ours / 255.0 - ref).max())
  assert err <= 2 / 255, err
  without = _diffusers_images(folder, [], monkeypatch)
  assert float(np.abs(ours / 255.0 - without).max()) > 10 / 255  # the LoRA shows in the image


def test_two_loras_fused_and_unfused_match_diffusers_set_adapters(pipes, lora_dirs, monkeypatch):
  folder, _ = pipes("sd1")
  first, second = lora_dirs
  fused = _our_images(folder, [(first, 0.7), (second, -0.8)], fuse=True)
  unfused = _our_images(folder, [f"{first}:0.7", f"{second}:-0.8"], fuse=False)
  # fp32 rounding of the two sums can move a pixel by at most one level of uint8.
  assert int(np.abs(fused.astype(int) - unfused.astype(int)).max()) <= 1
  ref = _diffusers_images(folder, [(first, 0.7), (second, -0.8)], monkeypatch)
  err = float(np.abs(fused / 255.0 - ref).max())
  assert err <= 2 / 255, err


# ---- python -m lcm_jax.sample --lora ----------------------------------------------------


def test_sample_cli_with_two_loras_equals_the_library(pipes, lora_dirs, tmp_path):
  from PIL import Image

  from tests.test_sample import _cli
  folder, _ = pipes("sd1")
  first, second = lora_dirs
  out = tmp_path / "out"
  proc = _cli(["--model", folder, "--prompt", PROMPTS[0], "--steps", "2", "--seed", str(SEED), "--output", str(out),
               "--lora", f"{first}:0.5", "--lora", os.path.join(second, lora.LORA_WEIGHTS_NAME)])
  from lcm_jax import text_to_image
  library = text_to_image.TextToImage(load_pipeline(folder, loras=[(first, 0.5), (second, 1.0)]))(
      PROMPTS[:1], num_steps=2, seed=SEED)
  stdout, stderr = proc.communicate(timeout=1200)
  assert proc.returncode == 0, stderr
  np.testing.assert_array_equal(np.asarray(Image.open(out / "000.png")), library[0])


def test_sample_cli_missing_lora_is_one_line(pipes, tmp_path):
  from tests.test_sample import _cli
  folder, _ = pipes("sd1")
  proc = _cli(["--model", folder, "--prompt", "a cat", "--output", str(tmp_path / "out"),
               "--lora", str(tmp_path / "nope") + ":0.5"])
  _, stderr = proc.communicate(timeout=600)
  assert proc.returncode != 0
  lines = [line for line in stderr.strip().splitlines() if line.strip()]
  assert len(lines) == 1 and "nope" in lines[0] and "no such file" in lines[0], stderr
