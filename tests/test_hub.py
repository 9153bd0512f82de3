"""Hugging Face Hub downloads without a network.

* Which files: for realistic file listings of SD repos, the files our `allow_patterns` select
  (matched by huggingface_hub's own `filter_repo_objects`) are exactly the files diffusers'
  `DiffusionPipeline.download` would fetch for the components we load (its hub calls
  replaced by fakes that serve the listing and record the patterns).
* What is passed: revision, token and variant reach `snapshot_download` from
  `load_pipeline`, the CLIs and the training config; a fake hub copies the selected files of
  a local repo (fp32 + fp16 weights, pickles, a root checkpoint) and the pipeline loads.
* Offline: one clear error.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest
from huggingface_hub.utils import filter_repo_objects

from lcm_jax.errors import LcmJaxError
from lcm_jax.load import load_pipeline
from lcm_jax.sd_pipeline import DEFAULT_COMPONENTS, hub_allow_patterns, resolve_pipeline_folder

TOKENIZER = ["tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
             "tokenizer/vocab.json"]

# runwayml/stable-diffusion-v1-5 as published (fp16 variants, pickles, non-EMA UNet, safety
# checker, single-file checkpoints at the root).
SD15 = [
    ".gitattributes", "README.md", "model_index.json", "v1-inference.yaml",
    "v1-5-pruned-emaonly.ckpt", "v1-5-pruned-emaonly.safetensors", "v1-5-pruned.ckpt", "v1-5-pruned.safetensors",
    "feature_extractor/preprocessor_config.json",
    "safety_checker/config.json", "safety_checker/model.fp16.safetensors", "safety_checker/model.safetensors",
    "safety_checker/pytorch_model.bin", "safety_checker/pytorch_model.fp16.bin",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json", "text_encoder/model.fp16.safetensors", "text_encoder/model.safetensors",
    "text_encoder/pytorch_model.bin", "text_encoder/pytorch_model.fp16.bin",
    *TOKENIZER,
    "unet/config.json", "unet/diffusion_pytorch_model.bin", "unet/diffusion_pytorch_model.fp16.bin",
    "unet/diffusion_pytorch_model.fp16.safetensors", "unet/diffusion_pytorch_model.non_ema.bin",
    "unet/diffusion_pytorch_model.non_ema.safetensors", "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json", "vae/diffusion_pytorch_model.bin", "vae/diffusion_pytorch_model.fp16.bin",
    "vae/diffusion_pytorch_model.fp16.safetensors", "vae/diffusion_pytorch_model.safetensors",
]
# An LCM as published (SimianLuo/LCM_Dreamshaper_v7's layout: one precision, a root checkpoint).
LCM = [
    ".gitattributes", "README.md", "model_index.json", "LCM_Dreamshaper_v7_4k.safetensors",
    "feature_extractor/preprocessor_config.json", "safety_checker/config.json", "safety_checker/model.safetensors",
    "scheduler/scheduler_config.json", "text_encoder/config.json", "text_encoder/model.safetensors", *TOKENIZER,
    "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
]
# Sharded weights as diffusers/transformers write them (variant shards "x.fp16-00001-of-00002",
# index "x.safetensors.index.fp16.json"), and an fp16 UNet in the older shard naming.
SHARDED = [
    "model_index.json", "scheduler/scheduler_config.json", *TOKENIZER,
    "text_encoder/config.json", "text_encoder/model-00001-of-00002.safetensors",
    "text_encoder/model-00002-of-00002.safetensors", "text_encoder/model.safetensors.index.json",
    "text_encoder/model.fp16-00001-of-00002.safetensors", "text_encoder/model.fp16-00002-of-00002.safetensors",
    "text_encoder/model.safetensors.index.fp16.json",
    "unet/config.json", "unet/diffusion_pytorch_model-00001-of-00003.safetensors",
    "unet/diffusion_pytorch_model-00002-of-00003.safetensors",
    "unet/diffusion_pytorch_model-00003-of-00003.safetensors", "unet/diffusion_pytorch_model.safetensors.index.json",
    "unet/diffusion_pytorch_model-00001-of-00002.fp16.safetensors",
    "unet/diffusion_pytorch_model-00002-of-00002.fp16.safetensors",
    "unet/diffusion_pytorch_model.safetensors.fp16.index.json",
    "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors",
]
SD_INDEX = {
    "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.6.0",
    "feature_extractor": ["transformers", "CLIPImageProcessor"],
    "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
    "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
SHARDED_INDEX = {k: v for k, v in SD_INDEX.items() if k not in ("safety_checker", "feature_extractor")}
SHARDED_INDEX.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)


def diffusers_download(monkeypatch, tmp_path, listing: list[str], model_index: dict, variant: str | None) -> set[str]:
  """The files `DiffusionPipeline.download` fetches from a repo with these files (hub faked)."""
  from diffusers.pipelines import pipeline_utils
  snapshot = tmp_path / "diffusers_snapshot"
  snapshot.mkdir(exist_ok=True)
  (snapshot / "model_index.json").write_text(json.dumps(model_index))
  calls = {}

  def fake_snapshot_download(repo_id, **kwargs):
    calls.update(kwargs)
    return str(snapshot)

  monkeypatch.setattr(pipeline_utils, "_resolve_revision", lambda name, **kw: kw.get("revision"))
  monkeypatch.setattr(pipeline_utils, "model_info", lambda *a, **k: types.SimpleNamespace(
      siblings=[types.SimpleNamespace(rfilename=f) for f in listing]))
  monkeypatch.setattr(pipeline_utils, "hf_hub_download", lambda *a, **k: str(snapshot / "model_index.json"))
  monkeypatch.setattr(pipeline_utils, "snapshot_download", fake_snapshot_download)
  pipeline_utils.DiffusionPipeline.download("owner/repo", variant=variant, local_files_only=False)
  return set(filter_repo_objects(listing, allow_patterns=calls["allow_patterns"],
                                 ignore_patterns=calls["ignore_patterns"]))


@pytest.mark.parametrize("name,listing,model_index,variant", [
    ("sd15", SD15, SD_INDEX, None), ("sd15", SD15, SD_INDEX, "fp16"), ("lcm", LCM, SD_INDEX, None),
    ("sharded", SHARDED, SHARDED_INDEX, None), ("sharded", SHARDED, SHARDED_INDEX, "fp16"),
])
def test_allow_patterns_select_what_diffusers_downloads(monkeypatch, tmp_path, name, listing, model_index, variant):
  reference = diffusers_download(monkeypatch, tmp_path, listing, model_index, variant)
  # diffusers also fetches the components we do not model (safety checker, image processor).
  ours_in_reference = {f for f in reference if f == "model_index.json" or f.split("/")[0] in DEFAULT_COMPONENTS}
  ours = set(filter_repo_objects(listing, allow_patterns=hub_allow_patterns(DEFAULT_COMPONENTS, variant)))
  assert ours == ours_in_reference
  assert not any(f.endswith((".bin", ".ckpt")) or "/" not in f and f != "model_index.json" for f in ours)


def test_allow_patterns_of_a_component_subset():
  ours = set(filter_repo_objects(SD15, allow_patterns=hub_allow_patterns(("unet", "scheduler"), "fp16")))
  assert ours == {"model_index.json", "scheduler/scheduler_config.json", "unet/config.json",
                  "unet/diffusion_pytorch_model.fp16.safetensors"}


# ---- a fake hub serving a local repo --------------------------------------------------


@pytest.fixture(scope="module")
def hub_repo(tiny_pipeline, tmp_path_factory):
  """A local 'hub repo': the tiny LCM pipeline in fp32 and as an fp16 variant (diffusers'
  save_pretrained), plus files a download must skip (pickles, a root checkpoint)."""
  import diffusers
  import torch
  src = tiny_pipeline("sd1_lcm")
  repo = str(tmp_path_factory.mktemp("hub") / "repo")
  shutil.copytree(src, repo)
  pipe = diffusers.StableDiffusionPipeline.from_pretrained(src, dtype=torch.float16)
  pipe.save_pretrained(repo, variant="fp16", safe_serialization=True)
  for path in ("unet/diffusion_pytorch_model.bin", "text_encoder/pytorch_model.bin", "single_file.safetensors"):
    with open(os.path.join(repo, path), "wb") as f:
      f.write(b"not to be downloaded")
  return repo


@pytest.fixture
def fake_hub(monkeypatch, hub_repo, tmp_path):
  """Replaces huggingface_hub.snapshot_download: records its arguments and copies the repo's
  files that match allow_patterns (huggingface_hub's matching) into a fresh snapshot."""
  import huggingface_hub
  calls = []

  def snapshot_download(repo_id, *, revision=None, token=None, allow_patterns=None, **kwargs):
    calls.append(dict(repo_id=repo_id, revision=revision, token=token, allow_patterns=allow_patterns, **kwargs))
    files = [os.path.relpath(os.path.join(d, f), hub_repo) for d, _, fs in os.walk(hub_repo) for f in fs]
    out = tmp_path / f"snapshot{len(calls)}"
    for rel in filter_repo_objects(files, allow_patterns=allow_patterns):
      os.makedirs(os.path.dirname(out / rel), exist_ok=True)
      shutil.copy(os.path.join(hub_repo, rel), out / rel)
    return str(out)

  monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
  return calls


def _files(folder) -> set[str]:
  return {os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs}


def test_load_pipeline_downloads_the_variant_only_and_loads_it(fake_hub, hub_repo):
  pipe = load_pipeline("owner/tiny-lcm", variant="fp16", revision="v1.0", token="hf_secret")
  [call] = fake_hub
  assert call["repo_id"] == "owner/tiny-lcm" and call["revision"] == "v1.0" and call["token"] == "hf_secret"
  downloaded = _files(pipe.path)
  weights = {f for f in downloaded if f.endswith(".safetensors")}
  assert weights == {"unet/diffusion_pytorch_model.fp16.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors",
                     "text_encoder/model.fp16.safetensors"}
  # The loaded UNet is the fp16 file's weights (fp32 values rounded to fp16).
  fp32 = load_pipeline(hub_repo, components=("unet",))
  a = np.asarray(pipe.params["unet"]["conv_in"]["kernel"])
  b = np.asarray(fp32.params["unet"]["conv_in"]["kernel"])
  np.testing.assert_array_equal(a, b.astype(np.float16).astype(np.float32))
  assert not np.array_equal(a, b)


def test_load_pipeline_without_variant_downloads_fp32_only(fake_hub):
  pipe = load_pipeline("owner/tiny-lcm", components=("unet", "scheduler"))
  assert fake_hub[0]["revision"] is None and fake_hub[0]["token"] is None
  assert _files(pipe.path) == {"model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                               "scheduler/scheduler_config.json"}


def test_sharded_variant_in_diffusers_naming_loads(tiny_pipeline, tmp_path):
  """diffusers' save_pretrained(variant=..., max_shard_size=...) writes
  x.fp16-0000k-of-0000n.safetensors with x.safetensors.index.fp16.json: the loader reads it."""
  import diffusers
  import torch
  src = tiny_pipeline("sd1_lcm")
  unet = diffusers.UNet2DConditionModel.from_pretrained(src, subfolder="unet", dtype=torch.float16)
  out = tmp_path / "sharded"
  shutil.copytree(src, out)
  shutil.rmtree(out / "unet")
  unet.save_pretrained(out / "unet", variant="fp16", max_shard_size="100KB", safe_serialization=True)
  names = sorted(os.listdir(out / "unet"))
  assert "diffusion_pytorch_model.safetensors.index.fp16.json" in names
  assert sum(n.startswith("diffusion_pytorch_model.fp16-") for n in names) > 1
  ours = load_pipeline(str(out), components=("unet",), variant="fp16").params["unet"]
  ref = load_pipeline(src, components=("unet",)).params["unet"]
  np.testing.assert_array_equal(np.asarray(ours["conv_out"]["kernel"]),
                                np.asarray(ref["conv_out"]["kernel"]).astype(np.float16).astype(np.float32))


def test_training_config_revision_reaches_the_hub(fake_hub):
  from lcm_jax import config as config_lib
  from lcm_jax.training.sources import resolve_sources
  c = config_lib.base_config()
  c.teacher, c.teacher_revision, c.teacher_variant = "owner/tiny-teacher", "refs/pr/3", "fp16"
  sources = resolve_sources(c)
  [call] = fake_hub
  assert (call["repo_id"], call["revision"]) == ("owner/tiny-teacher", "refs/pr/3")
  assert sources.base_variant == "fp16" and os.path.isfile(os.path.join(sources.base, "unet", "config.json"))


def test_offline_hub_is_one_clear_error(monkeypatch, tmp_path):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
  with pytest.raises(LcmJaxError, match=r"could not download 'someone/some-model' at revision 'v2' .*"
                                        r"If this machine is offline, pass a local diffusers pipeline folder"):
    resolve_pipeline_folder("someone/some-model", revision="v2")


def test_cli_revision_and_token_flags_offline(tmp_path):
  env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "cache"), "JAX_PLATFORMS": "cpu"}
  r = subprocess.run([sys.executable, "-m", "lcm_jax.sample", "--model=someone/some-lcm", "--revision=abc",
                      "--token=hf_x", "--variant=fp16", "--prompt=a cat", f"--output={tmp_path / 'out'}"],
                     capture_output=True, text=True, env=env, timeout=600)
  assert r.returncode == 2
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: could not download 'someone/some-lcm' at revision 'abc'")
