"""The README.md model card of an exported pipeline, in the format the Hugging Face Hub renders.

YAML front matter (written by huggingface_hub's `ModelCardData`): base_model, library_name
diffusers, pipeline_tag text-to-image, tags, license when known. Then what a diffusers user
needs: which pipeline class loads it, the steps and guidance scale it was made for, a snippet
to paste, and, for a training workdir, the run's settings and the step exported.

The snippet depends on what was exported:
* a UNet with a guidance input (`time_cond_proj_dim`, an LCM from LCD/LCF):
  `LatentConsistencyModelPipeline`, 4 steps, guidance scale 8.5 (or the run's sampling scale);
* an LCMScheduler without a guidance input (e.g. an LCM-LoRA fused into SD):
  `StableDiffusionPipeline` with `LCMScheduler`, 4 steps, guidance scale 1 (no CFG);
* anything else: `StableDiffusionPipeline` with its own scheduler, 25 steps, guidance 7.5.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from typing import Any

from lcm_jax.config import flatten_dotted

CARD_FILE = "README.md"
# Licences of the usual bases, for a base whose own card is not at hand (hub ids offline).
KNOWN_LICENSES = {
    "runwayml/stable-diffusion-v1-5": "creativeml-openrail-m",
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "creativeml-openrail-m",
    "CompVis/stable-diffusion-v1-4": "creativeml-openrail-m",
    "stabilityai/stable-diffusion-2-1": "openrail++",
    "stabilityai/stable-diffusion-2-1-base": "openrail++",
    "stabilityai/stable-diffusion-2-base": "openrail++",
    "stabilityai/stable-diffusion-2": "openrail++",
    "SimianLuo/LCM_Dreamshaper_v7": "mit",
}
# The run settings a card lists (dotted config keys) and how it names them.
TRAINING_KEYS = (
    ("mode", "mode"), ("teacher", "teacher"), ("init_from", "init_from"), ("data.path", "data"),
    ("resolution", "resolution"), ("batch_size", "global batch size"), ("optimizer.lr", "learning rate"),
    ("optimizer.schedule", "learning-rate schedule"), ("ema_decay", "EMA decay of the target"),
    ("loss.solver", "ODE solver"), ("loss.skipping_step", "skipping step k"),
    ("loss.omega_min", "omega min"), ("loss.omega_max", "omega max"), ("loss.distance", "distance"),
    ("precision.compute_dtype", "compute dtype"), ("num_train_steps", "steps planned"),
)


@dataclasses.dataclass
class Recipe:
  """How diffusers samples the exported pipeline."""
  pipeline_class: str   # "LatentConsistencyModelPipeline" or "StableDiffusionPipeline"
  scheduler_class: str | None  # set a scheduler first (LCMScheduler), or None to keep the folder's
  num_inference_steps: int
  guidance_scale: float


def sampling_recipe(model_index: Mapping, unet_config: Mapping, scheduler_config: Mapping,
                    guidance_scale: float | None = None) -> Recipe:
  """The pipeline class, scheduler, steps and guidance scale that suit the exported folder."""
  is_lcm_scheduler = (scheduler_config.get("_class_name") == "LCMScheduler"
                      or (model_index.get("scheduler") or [None, None])[1] == "LCMScheduler")
  if unet_config.get("time_cond_proj_dim"):
    return Recipe("LatentConsistencyModelPipeline", None if is_lcm_scheduler else "LCMScheduler", 4,
                  8.5 if guidance_scale is None else float(guidance_scale))
  if is_lcm_scheduler:
    return Recipe("StableDiffusionPipeline", "LCMScheduler", 4, 1.0)
  return Recipe("StableDiffusionPipeline", None, 25, 7.5 if guidance_scale is None else float(guidance_scale))


def diffusers_snippet(model: str, recipe: Recipe, prompt: str) -> str:
  """Python that loads `model` with diffusers and samples one image the way it was made for."""
  imports = recipe.pipeline_class + (f", {recipe.scheduler_class}" if recipe.scheduler_class else "")
  lines = ["import torch", f"from diffusers import {imports}", "",
           f"pipe = {recipe.pipeline_class}.from_pretrained({model!r}, torch_dtype=torch.float16)"]
  if recipe.scheduler_class:
    lines.append(f"pipe.scheduler = {recipe.scheduler_class}.from_config(pipe.scheduler.config)")
  lines += ['pipe.to("cuda")',
            f"image = pipe({prompt!r}, num_inference_steps={recipe.num_inference_steps}, "
            f"guidance_scale={recipe.guidance_scale:g}).images[0]",
            'image.save("image.png")']
  return "\n".join(lines)


def license_of(base: str | None) -> str | None:
  """The licence of a base model: from its folder's README.md front matter, else `KNOWN_LICENSES`."""
  if not base:
    return None
  readme = os.path.join(os.path.expanduser(base), CARD_FILE)
  if os.path.isfile(readme):
    with open(readme, encoding="utf-8", errors="replace") as f:
      text = f.read(65536)
    front = re.match(r"---\n(.*?)\n---", text, re.S)
    found = re.search(r"^license:\s*(\S+)\s*$", front.group(1), re.M) if front else None
    if found:
      return found.group(1).strip("'\"")
  return KNOWN_LICENSES.get(base)


def _hub_id(name: str | None) -> str | None:
  """`name` if it reads as a hub repo id (owner/name, not a local path), else None: the hub
  validates base_model against its repos."""
  if not name or name.count("/") != 1 or name.startswith((".", "/", "~")) or os.path.exists(name):
    return None
  return name


def training_section(config: Mapping[str, Any], step: int | None, params: str) -> str:
  """Markdown: the run's settings (a table) and the checkpoint exported."""
  flat = flatten_dotted(config)
  rows = [(label, flat[key]) for key, label in TRAINING_KEYS if flat.get(key) not in (None, "")]
  lines = ["## Training", "",
           f"Trained with lcm-jax ({flat.get('mode', 'lcd')}); exported from step "
           f"{step if step is not None else '?'} ({'the EMA target' if params == 'ema' else 'the online student'}).",
           "", "| setting | value |", "|---|---|"]
  lines += [f"| {label} | `{json.dumps(value) if not isinstance(value, str) else value}` |" for label, value in rows]
  return "\n".join(lines)


def _title(repo_id: str | None, path: str) -> str:
  """The card's heading: the hub repo's name, else the folder's name."""
  return repo_id.split("/")[-1] if repo_id else os.path.basename(os.path.normpath(path)) or path


def _assemble(*, base: str | None, tags: list[str], title: str, intro: str, usage: str, snippet: str,
              cli: str, training: Mapping | None, step: int | None, params: str) -> str:
  """One card: front matter (base_model, licence, tags), heading, intro, the diffusers snippet,
  the lcm-jax command and, for a workdir export, the training section."""
  from huggingface_hub import ModelCardData
  data = ModelCardData(base_model=_hub_id(base), library_name="diffusers", pipeline_tag="text-to-image",
                       license=license_of(base), tags=tags)
  text = [f"---\n{data.to_yaml()}\n---", "", f"# {title}", "", intro, "", "## Use with diffusers", ""]
  text += [usage, ""] if usage else []
  text += ["```python", snippet, "```", "", "With lcm-jax:", "", "```bash", cli, "```"]
  if training is not None:
    text += ["", training_section(training, step, params)]
  return "\n".join(text) + "\n"


def model_card(*, model_index: Mapping, unet_config: Mapping, scheduler_config: Mapping, source: str,
               base_model: str | None = None, repo_id: str | None = None, training: Mapping | None = None,
               step: int | None = None, params: str = "ema", guidance_scale: float | None = None,
               prompt: str = "a photo of a red fox in the snow, highly detailed") -> str:
  """The README.md text (front matter + markdown) of an exported pipeline.

  Args:
    source: what was exported (a folder, hub id or workdir), named in the card.
    base_model: the model it was distilled or fine-tuned from (the teacher), if any.
    repo_id: where it will live on the hub (the snippet loads it from there; else from a path).
    training: the run's config dict (WORKDIR/config.json) for a workdir export.
    step, params: the checkpoint exported ("ema" or "online").
    guidance_scale: the scale the run sampled with (config.sample_guidance_scale).
  """
  recipe = sampling_recipe(model_index, unet_config, scheduler_config, guidance_scale)
  is_lcm = recipe.num_inference_steps <= 8
  tags = ["text-to-image", "stable-diffusion", "diffusers", "lcm-jax"]
  tags += ["latent-consistency-model", "lcm"] if is_lcm else []
  kind = "A Latent Consistency Model" if is_lcm else "A Stable Diffusion pipeline"
  origin = f" distilled from `{base_model}`" if base_model else f" exported from `{source}`"
  usage = (f"`{recipe.pipeline_class}`" + (f" with `{recipe.scheduler_class}`" if recipe.scheduler_class else "")
           + f", {recipe.num_inference_steps} steps, guidance scale {recipe.guidance_scale:g}"
           + (" (an LCM takes 1-8 steps; the guidance is distilled into it, so no negative prompt)." if is_lcm
              else "."))
  cli = (f"python -m lcm_jax.sample --model {repo_id or source} --prompt {json.dumps(prompt)} "
         f"--steps {recipe.num_inference_steps} --guidance_scale {recipe.guidance_scale:g} --output out/")
  return _assemble(base=base_model or source, tags=tags, title=_title(repo_id, source),
                   intro=f"{kind}{origin} with lcm-jax (JAX/Flax), saved in the diffusers layout.", usage=usage,
                   snippet=diffusers_snippet(repo_id or source, recipe, prompt), cli=cli, training=training,
                   step=step, params=params)


def lora_card(*, base_model: str, source: str, folder: str, repo_id: str | None = None, training: Mapping | None = None,
              step: int | None = None, params: str = "ema", num_inference_steps: int = 4,
              prompt: str = "a photo of a red fox in the snow, highly detailed") -> str:
  """The README.md of a `--lora-only` export: an LCM-LoRA adapter for `base_model` (the run's
  teacher), loaded into the base with diffusers' `load_lora_weights`, sampled with the
  LCMScheduler at guidance scale 1 (the adapter has no guidance input; w was distilled in).
  `source` is the run's workdir, `folder` the export (the snippet loads `repo_id`, else `folder`)."""
  tags = ["text-to-image", "stable-diffusion", "diffusers", "lora", "lcm-jax", "latent-consistency-model",
          "lcm", "lcm-lora"]
  where = repo_id or folder
  snippet = "\n".join([
      "import torch", "from diffusers import DiffusionPipeline, LCMScheduler", "",
      f"pipe = DiffusionPipeline.from_pretrained({base_model!r}, torch_dtype=torch.float16)",
      "pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)",
      f"pipe.load_lora_weights({where!r})", "pipe.fuse_lora()", 'pipe.to("cuda")',
      f"image = pipe({prompt!r}, num_inference_steps={num_inference_steps}, guidance_scale=1, "
      "generator=torch.manual_seed(0)).images[0]",
      'image.save("image.png")'])
  intro = (f"An LCM-LoRA adapter for `{base_model}`, distilled with lcm-jax from the run `{source}` (JAX/Flax) and "
           "saved in diffusers' LoRA format (`pytorch_lora_weights.safetensors`). Loaded into the base model (or a "
           f"fine-tune of it) it samples in 2-8 steps with the LCMScheduler; {num_inference_steps} steps, guidance "
           "scale 1 (no negative prompt: the guidance is distilled into the adapter).")
  cli = (f"python -m lcm_jax.sample --model {base_model} --lora {where} --prompt {json.dumps(prompt)} "
         f"--steps {num_inference_steps} --guidance_scale 1 --output out/")
  return _assemble(base=base_model, tags=tags, title=_title(repo_id, folder), intro=intro, usage="",
                   snippet=snippet, cli=cli, training=training, step=step, params=params)
