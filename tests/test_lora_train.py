"""LCM-LoRA training end to end (config.student = "lora") on a tiny SD pipeline, checked against
diffusers + PEFT and the teacher's own files.

One run of 2 steps (a checkpoint after each, a sample grid at the end; setup shared with
tests/test_train.py). Checked: the checkpoints hold only the adapter, on exactly the layers and
with the shapes PEFT gives the same UNet, and an optimiser state shaped like it; the first
AdamW step moved A by weight decay only (its gradient is zero while B = 0) and every entry of B by
the learning rate (Adam's first step is lr x g / (|g| + eps)); the workdir stores no UNet weights
(the base is the teacher's folder); `--lora-only` writes a file that
`StableDiffusionPipeline.load_lora_weights` loads with no missing or unexpected keys and whose
UNet output equals our fused model's; the plain export of the run (adapter fused) is a
StableDiffusionPipeline with the LCMScheduler that diffusers runs to the same output; bad LoRA
settings fail in one line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from lcm_jax import config as config_lib
from lcm_jax import lora, training
from lcm_jax import workdir as workdir_lib
from lcm_jax.errors import LcmJaxError
from lcm_jax.weights import flatten_tree
from tests.helpers import fp32_error
from tests.test_lora import _ours, _theirs, _torch_pipe
from tests.test_train import make_config, setup  # noqa: F401  (setup: the module fixture)

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

RANK, ALPHA, LR, WD, SEED = 4, 8.0, 1e-3, 1e-2, 0


def lora_config(setup, **overrides):  # noqa: F811
  return make_config(setup, **{"student": "lora", "lora.rank": RANK, "lora.alpha": ALPHA, "num_train_steps": 2,
                               "checkpoint_every": 1, "keep_checkpoints": 3, "optimizer.lr": LR,
                               "optimizer.weight_decay": WD, "optimizer.max_grad_norm": 0.0,
                               "ema_decay": 0.0, "seed": SEED, **overrides})


@pytest.fixture(scope="module")
def run(setup, tmp_path_factory):  # noqa: F811
  workdir = str(tmp_path_factory.mktemp("lora_run") / "wd")
  state = training.train(lora_config(setup, sample_every=2, sample_steps=(1,)), workdir)
  return workdir, jax.device_get(state), setup[0]


def _peft_layers(teacher: str) -> dict[str, tuple[tuple, tuple]]:
  """module name -> (A shape, B shape), torch layout, of PEFT's adapter on the teacher's UNet."""
  unet = diffusers.UNet2DConditionModel.from_pretrained(os.path.join(teacher, "unet"))
  unet.add_adapter(peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(lora.DEFAULT_TARGETS)))
  state = peft.get_peft_model_state_dict(unet)
  return {k.removesuffix(".lora_A.weight"): (tuple(v.shape), tuple(state[k.replace("lora_A", "lora_B")].shape))
          for k, v in state.items() if k.endswith(".lora_A.weight")}


def test_checkpoint_and_optimiser_state_hold_only_the_adapter(run):
  workdir, state, teacher = run
  expected = _peft_layers(teacher)
  for name, tree in (("params", state.params), ("target", state.target_params)):
    flat = flatten_tree(tree)
    assert {p[-1] for p in flat} == {lora.A, lora.B}, name
    ours = {}
    for path, x in flat.items():
      # our layouts -> torch: A [(kh, kw,) in, r] -> [r, in(, kh, kw)]; B [r, out] -> [out, r(, 1, 1)]
      shape = (x.shape[-1], x.shape[-2], *x.shape[:-2]) if path[-1] == lora.A else (x.shape[1], x.shape[0])
      ours.setdefault(lora.module_name(path[:-1]), {})[path[-1]] = shape
    assert set(ours) == set(expected), name
    for module, (a_shape, b_shape) in expected.items():
      assert ours[module][lora.A] == a_shape and ours[module][lora.B] == b_shape[:2], module
  # Adam's moments are the adapter's shapes; nothing of the UNet's size is in the state.
  adapter_size = sum(x.size for x in jax.tree.leaves(state.params))
  assert sum(x.size for x in jax.tree.leaves(state.opt_state)) <= 2 * adapter_size + 16
  # No UNet weights in the workdir: the base is the teacher's folder, referenced.
  assert os.listdir(os.path.join(workdir, "model", "unet")) == ["config.json"]
  weights = [os.path.relpath(os.path.join(d, f), workdir) for d, _, files in os.walk(workdir) for f in files
             if f.endswith((".safetensors", ".bin"))]
  assert all(w.startswith(("model/vae/", "model/text_encoder/")) for w in weights), weights
  info = workdir_lib.model_info(workdir)
  assert info["student"] == "lora" and info["lora"]["rank"] == RANK
  assert os.path.samefile(info["base_unet"], os.path.join(teacher, "unet"))
  with open(os.path.join(workdir, "model", "model_index.json")) as f:
    index = json.load(f)
  assert index["_class_name"] == "StableDiffusionPipeline" and index["scheduler"][1] == "LCMScheduler"
  assert os.path.isfile(os.path.join(workdir, "samples", "step_0000002.png"))


def test_first_step_is_adamw_on_an_adapter_with_zero_b(run):
  """Step 1 from PEFT's init: dL/dA = dL/dW' B^T = 0, so A only decays; B = 0 gets
  -lr g / (|g| + eps) (no clipping here), so |B| = lr wherever |g| >> eps."""
  workdir, _, _ = run
  a0 = lora.init_lora(jax.random.fold_in(jax.random.PRNGKey(SEED), 1),
                      workdir_lib.load_unet(workdir, "online", step=1)[1], RANK)  # the shapes only
  step1, _ = workdir_lib.load_lora(workdir, "online", step=1)
  for path, x in flatten_tree(step1).items():
    x = np.asarray(x)
    if path[-1] == lora.A:
      np.testing.assert_allclose(x, np.asarray(flatten_tree(a0)[path]) * (1 - LR * WD), rtol=1e-6, atol=0)
    else:
      moved = np.abs(x)
      assert np.all(moved <= LR * (1 + 1e-6)), path
      assert np.mean(moved > 0.5 * LR) > 0.9, path  # nearly every entry moved by about lr


def test_lora_only_export_loads_in_diffusers_and_equals_the_fused_model(run, tmp_path):
  from lcm_jax.load import load_pipeline
  workdir, state, teacher = run
  out = str(tmp_path / "lora")
  proc = subprocess.run([sys.executable, "-m", "lcm_jax.export", f"--model={workdir}", "--lora-only",
                         f"--output={out}"], capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr
  assert sorted(os.listdir(out)) == ["README.md", lora.LORA_WEIGHTS_NAME]  # the adapter and its model card
  torch_pipe = _torch_pipe(teacher)
  torch_pipe.load_lora_weights(out, adapter_name="lcm")
  loaded = peft.get_peft_model_state_dict(torch_pipe.unet, adapter_name="lcm")
  from lcm_jax.safetensors_io import SafetensorsFile
  written = SafetensorsFile(os.path.join(out, lora.LORA_WEIGHTS_NAME))
  assert {"unet." + k for k in loaded} == set(written)  # nothing missing, nothing unexpected
  ref = _theirs(torch_pipe)

  fused = load_pipeline(workdir)  # load_unet: the teacher with the EMA adapter fused in
  err, bound = fp32_error(_ours(fused, fused.params["unet"]), ref)
  assert err <= bound
  teacher_pipe = load_pipeline(teacher)
  assert fp32_error(_ours(teacher_pipe, teacher_pipe.params["unet"]), ref)[0] > 10 * bound  # the LoRA matters

  # The plain export: the fused UNet in a StableDiffusionPipeline folder with the LCMScheduler.
  full = str(tmp_path / "full")
  proc = subprocess.run([sys.executable, "-m", "lcm_jax.export", f"--model={workdir}", f"--output={full}"],
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr
  exported = diffusers.StableDiffusionPipeline.from_pretrained(full)
  assert type(exported.scheduler).__name__ == "LCMScheduler"
  assert exported.unet.config.time_cond_proj_dim is None
  err, bound = fp32_error(_theirs(exported), ref)
  assert err <= bound
  _check_lora_card(out, exported, teacher, tmp_path)


def _check_lora_card(out: str, fused_export, teacher: str, tmp_path) -> None:
  """The --lora-only card: hub-parseable front matter, and its diffusers snippet (base + LCMScheduler +
  load_lora_weights + fuse_lora, guidance 1, seed 0), run as pasted, draws the image that the fused
  export draws with the same call; the base alone draws another."""
  import torch
  from huggingface_hub import ModelCard
  from tests.test_model_card import _run_snippet, _snippet
  card = ModelCard.load(os.path.join(out, "README.md"))
  assert {"lora", "lcm-lora", "diffusers"} <= set(card.data.tags) and card.data.library_name == "diffusers"
  assert f"An LCM-LoRA adapter for `{teacher}`" in card.text and "exported from step 2" in card.text
  snippet = _snippet(card.text)
  assert f"load_lora_weights({out!r})" in snippet and f"from_pretrained({teacher!r}" in snippet
  image = _run_snippet(snippet, tmp_path).astype(np.float64)

  def draw(pipe):
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a photo of a red fox in the snow, highly detailed", num_inference_steps=4, guidance_scale=1,
               generator=torch.manual_seed(0), output_type="np").images[0]
    return np.round(out * 255)

  assert np.abs(image - draw(fused_export)).max() <= 2
  base = diffusers.StableDiffusionPipeline.from_pretrained(teacher)
  base.scheduler = diffusers.LCMScheduler.from_config(base.scheduler.config)
  base_diff = np.abs(image - draw(base))
  assert base_diff.max() > 4 and base_diff.mean() > 0.5  # measured 8 and 1.23: the adapter changes the image


def test_lora_only_export_of_a_full_run_is_one_line(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "lcm_jax.export", f"--model={tmp_path}", "--lora-only",
                         f"--output={tmp_path / 'out'}"], capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and "not the workdir of a LoRA run" in lines[0], proc.stderr


@pytest.mark.parametrize("overrides, message", [
    ({"lora.rank": 0}, "config.lora: LoRA rank must be a positive integer, got 0"),
    ({"lora.alpha": -1.0}, "config.lora: LoRA alpha must be a positive number"),
    ({"lora.targets": ()}, "config.lora.targets must be a non-empty list"),
    ({"student": "half"}, "config.student must be one of full, lora, got 'half'"),
    ({"mode": "lcf", "init_from": "x"}, "config.student='lora' distils an adapter from the teacher: it needs "
                                        "mode 'lcd'"),
    ({"init_from": "x"}, "config.init_from is set, but a LoRA student"),
])
def test_bad_lora_settings_are_one_error(setup, overrides, message):  # noqa: F811
  with pytest.raises(LcmJaxError, match=None) as e:
    config_lib.check_config(lora_config(setup, **overrides))
  assert message in str(e.value) and "\n" not in str(e.value)


def test_unknown_lora_target_fails_before_compiling(setup, tmp_path):  # noqa: F811
  with pytest.raises(LcmJaxError, match="'to_z' match no Dense or Conv layer"):
    training.train(lora_config(setup, **{"lora.targets": ("to_q", "to_z")}), str(tmp_path / "wd"))
