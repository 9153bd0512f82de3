"""Model cards of exports and --push_to_hub (issue 17 item 4), without a network.

The card's front matter is read back with huggingface_hub's own parser (what the hub
renders); its diffusers snippet is executed with diffusers on the exported tiny pipeline (on
CPU in float32: the only edits to the pasted text), so a card that names the wrong pipeline
class, scheduler or arguments fails. The upload is checked against HfApi's real method
signatures with a recording stand-in; offline it is one clear error after a complete export.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from huggingface_hub import HfApi, ModelCard

from lcm_jax import config as config_lib
from lcm_jax import export, model_card
from lcm_jax.errors import LcmJaxError


def _export_cli(*args, env=None):
  return subprocess.run([sys.executable, "-m", "lcm_jax.export", *args], capture_output=True, text=True,
                        env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}, timeout=1200)


def _snippet(card_text: str) -> str:
  blocks = re.findall(r"```python\n(.*?)```", card_text, re.S)
  assert len(blocks) == 1
  return blocks[0]


def _run_snippet(snippet: str, cwd) -> np.ndarray:
  """Runs the card's snippet as a user would, on CPU in float32; returns the image it saved."""
  code = snippet.replace('pipe.to("cuda")', 'pipe.to("cpu")').replace("torch.float16", "torch.float32")
  assert code != snippet
  r = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  from PIL import Image
  return np.asarray(Image.open(os.path.join(cwd, "image.png")))


@pytest.fixture(scope="module")
def lcm_export(tiny_pipeline, tmp_path_factory):
  out = tmp_path_factory.mktemp("card") / "lcm"
  r = _export_cli(f"--model={tiny_pipeline('sd1_lcm')}", f"--output={out}")
  assert r.returncode == 0, r.stderr
  return out


def test_export_writes_a_card_the_hub_parses(lcm_export, tiny_pipeline):
  card = ModelCard.load(lcm_export / "README.md")
  assert card.data.library_name == "diffusers" and card.data.pipeline_tag == "text-to-image"
  assert {"latent-consistency-model", "text-to-image", "diffusers"} <= set(card.data.tags)
  assert card.data.base_model is None  # a local folder is no hub id; the hub would reject it
  assert "LatentConsistencyModelPipeline" in card.text and "guidance scale 8.5" in card.text


def test_card_snippet_runs_with_diffusers(lcm_export, tmp_path):
  snippet = _snippet((lcm_export / "README.md").read_text())
  assert "LatentConsistencyModelPipeline.from_pretrained(" in snippet
  assert "num_inference_steps=4, guidance_scale=8.5" in snippet
  image = _run_snippet(snippet, tmp_path)
  assert image.shape == (16, 16, 3) and image.std() > 0


def test_lcm_scheduler_without_guidance_input_gets_sd_pipeline_with_lcm_scheduler(tiny_pipeline, tmp_path):
  """An SD UNet with an LCMScheduler (e.g. a fused LCM-LoRA): StableDiffusionPipeline +
  LCMScheduler, guidance 1 (no CFG), 4 steps; the snippet runs with diffusers."""
  import diffusers
  src = tmp_path / "sd_lcm_scheduler"
  pipe = diffusers.StableDiffusionPipeline.from_pretrained(tiny_pipeline("sd1"))
  pipe.scheduler = diffusers.LCMScheduler.from_config(pipe.scheduler.config)
  pipe.save_pretrained(src)
  r = _export_cli(f"--model={src}", f"--output={tmp_path / 'out'}", "--base_model=runwayml/stable-diffusion-v1-5")
  assert r.returncode == 0, r.stderr
  text = (tmp_path / "out" / "README.md").read_text()
  card = ModelCard(text)
  assert card.data.base_model == "runwayml/stable-diffusion-v1-5"
  assert card.data.license == "creativeml-openrail-m"
  snippet = _snippet(text)
  assert "pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)" in snippet
  assert "StableDiffusionPipeline.from_pretrained" in snippet and "guidance_scale=1" in snippet
  assert _run_snippet(snippet, tmp_path).shape == (16, 16, 3)


def test_plain_sd_gets_its_own_scheduler():
  recipe = model_card.sampling_recipe({"scheduler": ["diffusers", "PNDMScheduler"]},
                                      {"time_cond_proj_dim": None}, {"_class_name": "PNDMScheduler"})
  assert recipe == model_card.Recipe("StableDiffusionPipeline", None, 25, 7.5)


def test_workdir_card_has_the_run(tmp_path):
  c = config_lib.base_config()
  c.teacher, c.num_train_steps, c.sample_guidance_scale = "stabilityai/stable-diffusion-2-1", 4000, 9.0
  text = model_card.model_card(
      model_index={"_class_name": "LatentConsistencyModelPipeline", "scheduler": ["diffusers", "LCMScheduler"]},
      unet_config={"time_cond_proj_dim": 256}, scheduler_config={"_class_name": "LCMScheduler"},
      source="runs/sd21", base_model=c.teacher, repo_id="me/lcm-sd21", training=json.loads(c.to_json()),
      step=3000, guidance_scale=c.sample_guidance_scale)
  card = ModelCard(text)
  assert card.data.base_model == "stabilityai/stable-diffusion-2-1" and card.data.license == "openrail++"
  assert "exported from step 3000 (the EMA target)" in card.text
  assert "| learning rate | `8e-06` |" in card.text and "| skipping step k | `20` |" in card.text
  assert "| teacher | `stabilityai/stable-diffusion-2-1` |" in card.text
  snippet = _snippet(text)
  assert "LatentConsistencyModelPipeline.from_pretrained('me/lcm-sd21'" in snippet
  assert "guidance_scale=9" in snippet and "LCMScheduler" not in snippet  # the folder's scheduler is LCM


def test_license_from_the_base_folders_card(tmp_path):
  (tmp_path / "README.md").write_text("---\nlicense: apache-2.0\ntags:\n- x\n---\n# base\n")
  assert model_card.license_of(str(tmp_path)) == "apache-2.0"
  assert model_card.license_of(str(tmp_path / "nothing")) is None


# ---- push ------------------------------------------------------------------------------


class RecordingHfApi:
  """Stands in for huggingface_hub.HfApi: binds each call to the real method's signature
  (a wrong keyword fails as it would against the hub client) and records it."""
  calls: list = []

  def __init__(self, **kwargs):
    inspect.signature(HfApi.__init__).bind(None, **kwargs)
    self.calls.append(("HfApi", kwargs))

  def create_repo(self, *args, **kwargs):
    inspect.signature(HfApi.create_repo).bind(self, *args, **kwargs)
    self.calls.append(("create_repo", {"repo_id": args[0] if args else kwargs["repo_id"], **kwargs}))
    return "https://huggingface.co/" + (args[0] if args else kwargs["repo_id"])

  def upload_folder(self, *args, **kwargs):
    inspect.signature(HfApi.upload_folder).bind(self, *args, **kwargs)
    self.calls.append(("upload_folder", kwargs))


def test_push_folder_calls_create_repo_and_upload_folder(monkeypatch, lcm_export):
  import huggingface_hub
  RecordingHfApi.calls = []
  monkeypatch.setattr(huggingface_hub, "HfApi", RecordingHfApi)
  url = export.push_folder(str(lcm_export), "me/tiny-lcm", token="hf_abc", private=True, commit_message="m")
  assert url == "https://huggingface.co/me/tiny-lcm"
  (_, init), (_, create), (_, upload) = RecordingHfApi.calls
  assert init == {"token": "hf_abc"}
  assert create == {"repo_id": "me/tiny-lcm", "repo_type": "model", "private": True, "exist_ok": True}
  assert upload == {"repo_id": "me/tiny-lcm", "folder_path": str(lcm_export), "repo_type": "model",
                    "commit_message": "m"}


def test_push_offline_is_one_error_after_a_complete_export(tiny_pipeline, tmp_path):
  out = tmp_path / "o"
  r = _export_cli(f"--model={tiny_pipeline('sd1_lcm')}", f"--output={out}", "--push_to_hub=me/tiny-lcm",
                  env={"HF_HUB_OFFLINE": "1"})
  assert r.returncode == 2
  [line] = [l for l in r.stderr.splitlines() if l.startswith("error:")]
  assert line.startswith("error: could not push") and "hf upload me/tiny-lcm" in line
  assert (out / "model_index.json").is_file()
  # The card was written for the hub id it was meant for.
  assert "from_pretrained('me/tiny-lcm'" in (out / "README.md").read_text()


def test_push_bad_repo_id_fails_before_loading(tmp_path):
  r = _export_cli(f"--model={tmp_path / 'not-loaded'}", f"--output={tmp_path / 'o'}", "--push_to_hub=no//good")
  assert r.returncode == 2
  assert r.stderr.strip().splitlines()[0].startswith("error: --push_to_hub 'no//good' is not a hub repo id")


def test_push_error_is_lcm_jax_error(monkeypatch, tmp_path):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  with pytest.raises(LcmJaxError, match="could not push"):
    export.push_folder(str(tmp_path), "me/x")
