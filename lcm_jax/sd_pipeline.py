"""Reading and writing Stable Diffusion pipelines in the diffusers folder layout.

A diffusers pipeline folder holds `model_index.json` and one folder per component:
`unet/`, `vae/` (config.json + diffusion_pytorch_model.safetensors), `text_encoder/`
(config.json + model.safetensors), `tokenizer/` (CLIP BPE files) and `scheduler/`
(scheduler_config.json). `load_pipeline` turns one into Flax modules and parameter trees;
`save_pipeline` writes one back that diffusers loads.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lcm_jax import jsonfile, weights
from lcm_jax.errors import LcmJaxError, UnsupportedConfigError, WeightsError, check_can_be_folder
from lcm_jax.safetensors_io import (
  SafetensorsFile,
  ShardedSafetensors,
  write_safetensors,
)

# component -> (class names accepted in model_index.json, weights file stem, config file name)
COMPONENTS = {
    "unet": (("UNet2DConditionModel",), "diffusion_pytorch_model", "config.json"),
    "vae": (("AutoencoderKL",), "diffusion_pytorch_model", "config.json"),
    "text_encoder": (("CLIPTextModel",), "model", "config.json"),
    "tokenizer": (("CLIPTokenizer", "CLIPTokenizerFast"), None, None),
    "scheduler": (None, None, "scheduler_config.json"),
}
DEFAULT_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")

# Non-parameter buffers that some transformers versions save beside the weights.
IGNORED_BUFFERS = {"text_encoder": ("text_model.embeddings.position_ids",)}


@dataclasses.dataclass
class Pipeline:
  """A loaded Stable Diffusion pipeline: Flax modules, their parameters and raw configs.

  Attributes:
    unet, vae, text_encoder: Flax modules (None if the component was not loaded).
    params: component name -> parameter tree (the `"params"` collection).
    tokenizer: a transformers `CLIPTokenizer`, or None.
    configs: component name -> the `config.json` (or `scheduler_config.json`) dict as
      stored; `save_pipeline` writes these back, so nothing the loader did not need is lost.
    model_index: the `model_index.json` dict.
    path: the local folder the pipeline was read from.
    unet_loras: LoRA adapters kept apart from the UNet weights, (adapters, scale) pairs
      (`lcm_jax.lora.add_loras(fuse=False)`); samplers add them inside their compiled function.
  """
  unet: Any = None
  vae: Any = None
  text_encoder: Any = None
  tokenizer: Any = None
  params: dict = dataclasses.field(default_factory=dict)
  configs: dict = dataclasses.field(default_factory=dict)
  model_index: dict = dataclasses.field(default_factory=dict)
  path: str = ""
  unet_loras: list = dataclasses.field(default_factory=list)

  @property
  def scheduler_config(self) -> dict:
    return self.configs["scheduler"]

  @property
  def vae_scaling_factor(self) -> float:
    from lcm_jax.models.vae import scaling_factor
    return scaling_factor(self.configs["vae"])


def read_json(path: str) -> dict:
  """A diffusers JSON file (config, model_index, weight index), size-bounded (lcm_jax.jsonfile)."""
  return jsonfile.read_json(path, missing=f"{path} is missing: is this a diffusers pipeline folder?")


SHARD = "-?????-of-?????"  # transformers/diffusers shard suffix: -00001-of-00002


def weights_file_names(stem: str, variant: str | None = None) -> list[str]:
  """The file names (fnmatch patterns for shards) a component's safetensors weights may have.

  As diffusers writes them: `stem.safetensors`, or shards `stem-00001-of-00002.safetensors`
  with `stem.safetensors.index.json`; a variant v: `stem.v.safetensors`, shards
  `stem.v-00001-of-00002.safetensors` with `stem.safetensors.index.v.json`, or the older
  names `stem-00001-of-00002.v.safetensors` with `stem.safetensors.v.index.json`.
  """
  if not variant:
    return [f"{stem}.safetensors", f"{stem}{SHARD}.safetensors", f"{stem}.safetensors.index.json"]
  return [f"{stem}.{variant}.safetensors", f"{stem}.{variant}{SHARD}.safetensors",
          f"{stem}.safetensors.index.{variant}.json",
          f"{stem}{SHARD}.{variant}.safetensors", f"{stem}.safetensors.{variant}.index.json"]


def hub_allow_patterns(components: tuple[str, ...] = DEFAULT_COMPONENTS, variant: str | None = None) -> list[str]:
  """The `allow_patterns` of a hub download: model_index.json and, for each component loaded,
  its config and its safetensors weights of `variant` only (never PyTorch pickles, other
  variants, non-EMA weights, the safety checker or single-file checkpoints at the root)."""
  patterns = ["model_index.json"]
  for component in components:
    _, stem, config_name = COMPONENTS[component]
    if stem is None:  # tokenizer/, scheduler/: small files, all of them (as diffusers)
      patterns.append(f"{component}/*")
      continue
    patterns.append(f"{component}/{config_name}")
    patterns += [f"{component}/{name}" for name in weights_file_names(stem, variant)]
  return patterns


def looks_like_repo_id(path_or_repo_id: str) -> bool:
  """"owner/name" that is not a local path."""
  return (path_or_repo_id.count("/") == 1 and not path_or_repo_id.startswith((".", "/", "~"))
          and not os.path.exists(os.path.expanduser(path_or_repo_id)))


def download_from_hub(repo_id: str, allow_patterns: list[str], *, revision: str | None = None,
                      token: str | bool | None = None, what: str = "", hint: str = "") -> str:
  """`huggingface_hub.snapshot_download` of the files matching `allow_patterns` (a cached
  snapshot when offline); any failure is one LcmJaxError naming `what` with `hint`."""
  try:
    import huggingface_hub
    return huggingface_hub.snapshot_download(repo_id, revision=revision, token=token,
                                             allow_patterns=allow_patterns)
  except Exception as e:  # the hub raises many types: offline, 404, gated, connection errors
    first_line = str(e).splitlines()[0] if str(e) else ""
    raise LcmJaxError(f"could not download {what}{repo_id!r}" + (f" at revision {revision!r}" if revision else "")
                      + f" from the Hugging Face Hub ({type(e).__name__}: {first_line}). {hint}") from None


def resolve_pipeline_folder(path_or_repo_id: str, *, revision: str | None = None, variant: str | None = None,
                            token: str | bool | None = None,
                            components: tuple[str, ...] = DEFAULT_COMPONENTS) -> str:
  """A local folder for `path_or_repo_id`: the folder itself, or a Hugging Face Hub snapshot
  of `components` (`hub_allow_patterns`). `revision`, `token` and `variant` apply to hub ids.

  Raises:
    LcmJaxError: the folder does not exist, or the hub cannot be reached (offline).
  """
  path = os.path.expanduser(path_or_repo_id)
  if os.path.isdir(path):
    return path
  if not looks_like_repo_id(path_or_repo_id):
    raise LcmJaxError(f"model folder {path_or_repo_id!r} does not exist")
  return download_from_hub(
      path_or_repo_id, hub_allow_patterns(components, variant), revision=revision, token=token,
      hint="If this machine is offline, pass a local diffusers pipeline folder instead.")


def open_component_weights(folder: str, stem: str, variant: str | None = None) -> SafetensorsFile | ShardedSafetensors:
  """The safetensors weights of one component folder (single file, or shards with an index;
  the names of `weights_file_names`)."""
  names = weights_file_names(stem, variant)
  single, indexes = names[0], [n for n in names if n.endswith(".json")]
  if os.path.isfile(os.path.join(folder, single)):
    return SafetensorsFile(os.path.join(folder, single))
  index = next((os.path.join(folder, i) for i in indexes if os.path.isfile(os.path.join(folder, i))), None)
  if index is not None:
    weight_map = read_json(index).get("weight_map", {})
    shards = sorted({os.path.join(folder, f) for f in weight_map.values()})
    missing = [s for s in shards if not os.path.isfile(s)]
    if missing:
      raise WeightsError(f"{index} names shards that are missing: {', '.join(missing)}")
    return ShardedSafetensors(shards)
  others = sorted(os.path.basename(p) for p in glob.glob(os.path.join(folder, "*"))
                  if p.endswith((".safetensors", ".bin", ".ckpt", ".pt", ".msgpack")))
  if any(o.endswith((".bin", ".ckpt", ".pt")) for o in others) and not any(o.endswith(".safetensors") for o in others):
    raise WeightsError(
        f"{folder} has only PyTorch pickle weights ({', '.join(others)}); lcm-jax reads safetensors only. "
        "Convert them once with diffusers/transformers: load the component with `from_pretrained(...)` and "
        "call `save_pretrained(folder, safe_serialization=True)`, or download the safetensors version of the model.")
  hint = f" (found: {', '.join(others)}; pass variant=... to pick one)" if others else ""
  raise WeightsError(f"{folder} has no {single}{hint}")


def _model_classes():
  # Imported here so that reading configs does not pay for building all modules.
  from lcm_jax.models import clip, unet, vae
  return {
      "unet": (unet.UNetConfig, unet.UNet2DConditionModel),
      "vae": (vae.VAEConfig, vae.AutoencoderKL),
      "text_encoder": (clip.CLIPTextConfig, clip.CLIPTextModel),
  }


def build_module(component: str, config: Mapping, *, dtype=jnp.float32, param_dtype=jnp.float32, **kwargs):
  """The Flax module for `component` ("unet", "vae", "text_encoder") from its config dict."""
  config_cls, module_cls = _model_classes()[component]
  try:
    cfg = config_cls.from_dict(dict(config))
  except UnsupportedConfigError as e:
    raise UnsupportedConfigError(f"{component}: {e}") from None
  return module_cls(cfg, dtype=dtype, param_dtype=param_dtype, **kwargs)


def abstract_params(module) -> dict:
  """The module's parameter tree as `jax.ShapeDtypeStruct`s: shapes only, nothing initialised."""
  return jax.eval_shape(lambda: module.init(jax.random.key(0), *module.dummy_inputs()))["params"]


def load_component(folder: str, component: str, *, dtype=jnp.float32, param_dtype=jnp.float32,
                   variant: str | None = None,
                   place: Callable[[tuple[str, ...], np.ndarray], Any] | None = None, **module_kwargs):
  """Loads one model component folder (`unet/`, `vae/` or `text_encoder/`).

  Returns:
    (module, params, config dict).
  """
  _, stem, config_name = COMPONENTS[component]
  config = read_json(os.path.join(folder, config_name))
  module = build_module(component, config, dtype=dtype, param_dtype=param_dtype, **module_kwargs)
  stored = open_component_weights(folder, stem, variant)
  total = sum(_data_bytes(f.path) for f in getattr(stored, "files", [stored]))
  with progress_bar(total, f"loading {component}") as bar:
    tensors = _Counted(_stored_names_as_modelled(component, stored), bar)
    params = weights.torch_to_flax(tensors, abstract_params(module), what=folder, place=place)
  return module, params, config


def _data_bytes(path: str) -> int:
  """The bytes of a safetensors file's tensors: its size less the 8-byte length and the header."""
  with open(path, "rb") as f:
    return os.path.getsize(path) - 8 - int.from_bytes(f.read(8), "little")


def progress_bar(total_bytes: int, desc: str):
  """A bytes progress bar on stderr (a widget in notebooks); off where stderr is not a terminal."""
  from tqdm.auto import tqdm
  return tqdm(total=total_bytes, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=False,
              disable=None, file=sys.stderr)


class _Counted(Mapping):
  """A lazy tensor mapping that advances `bar` by each tensor's bytes as it is read."""

  def __init__(self, tensors, bar):
    self._t, self._bar = tensors, bar

  def __getitem__(self, k):
    array = self._t[k]
    self._bar.update(getattr(array, "nbytes", 0))
    return array

  def shape(self, k):
    return self._t.shape(k)

  def __iter__(self):
    return iter(self._t)

  def __len__(self):
    return len(self._t)


def _stored_names_as_modelled(component: str, tensors):
  """A view of `tensors` under the names our modules use.

  Drops known non-parameter buffers, and gives a text encoder saved by transformers v5 from
  a freshly built model (which stores `embeddings.`, `encoder.`, `final_layer_norm.` at the
  top level) the `text_model.` prefix that published checkpoints and our modules use.
  """
  names = {k: k for k in tensors if k not in IGNORED_BUFFERS.get(component, ())}
  if component == "text_encoder" and names and not any(k.startswith("text_model.") for k in names):
    names = {"text_model." + k: k for k in names}
  if all(k == v for k, v in names.items()) and len(names) == len(tensors):
    return tensors
  return _Renamed(tensors, names)


class _Renamed(Mapping):
  """A view of a lazy tensor mapping under other names (new name -> stored name)."""

  def __init__(self, tensors, names: dict[str, str]):
    self._t, self._names = tensors, names

  def __getitem__(self, k):
    return self._t[self._names[k]]

  def shape(self, k):
    return self._t.shape(self._names[k])

  def __iter__(self):
    return iter(self._names)

  def __len__(self):
    return len(self._names)


def load_pipeline_folder(path_or_repo_id: str, *, dtype=jnp.float32, param_dtype=jnp.float32,
                         components: tuple[str, ...] = DEFAULT_COMPONENTS, variant: str | None = None,
                         revision: str | None = None, token: str | bool | None = None) -> Pipeline:
  """Loads a diffusers Stable Diffusion pipeline folder (or hub repo) into Flax.

  `lcm_jax.load_pipeline` also takes training workdirs; this takes folders and hub ids only.

  Args:
    path_or_repo_id: a local diffusers pipeline folder, or a Hugging Face Hub repo id
      (downloaded with `huggingface_hub` when online).
    dtype: compute dtype of the modules (jnp.float32 or jnp.bfloat16).
    param_dtype: dtype the parameters are stored in.
    components: which of unet, vae, text_encoder, tokenizer, scheduler to load.
    variant: a weights variant such as "fp16" (`diffusion_pytorch_model.fp16.safetensors`).
    revision: hub revision (a branch, tag or commit hash).
    token: hub token for gated or private repos (default: HF_TOKEN or the saved login).

  Raises:
    LcmJaxError (and subclasses) with a message that says what is wrong.
  """
  unknown = set(components) - set(COMPONENTS)
  if unknown:
    raise LcmJaxError(f"unknown pipeline components {sorted(unknown)}; choose from {list(COMPONENTS)}")
  folder = resolve_pipeline_folder(path_or_repo_id, revision=revision, variant=variant, token=token,
                                  components=tuple(components))
  model_index = read_json(os.path.join(folder, "model_index.json"))
  pipe = Pipeline(model_index=model_index, path=folder)
  for component in components:
    entry = model_index.get(component)
    if not entry or entry[1] is None:
      raise LcmJaxError(f"{folder}: model_index.json has no {component!r} component")
    accepted = COMPONENTS[component][0]
    if accepted is not None and entry[1] not in accepted:
      raise UnsupportedConfigError(
          f"{folder}: {component} is a {entry[1]}; lcm-jax supports {' or '.join(accepted)}")
    sub = os.path.join(folder, component)
    if not os.path.isdir(sub):
      raise LcmJaxError(f"{folder}: the {component}/ folder is missing")
    if component == "tokenizer":
      from lcm_jax.tokenizer import load_tokenizer
      pipe.tokenizer = load_tokenizer(sub)
    elif component == "scheduler":
      pipe.configs["scheduler"] = read_json(os.path.join(sub, COMPONENTS["scheduler"][2]))
    else:
      module, params, config = load_component(sub, component, dtype=dtype, param_dtype=param_dtype,
                                              variant=variant)
      setattr(pipe, component, module)
      pipe.params[component] = params
      pipe.configs[component] = config
  return pipe


EXPORT_DTYPES = {"fp32": np.float32, "fp16": np.float16, "bf16": jnp.bfloat16}


def unet_config_for_params(config: Mapping, unet_params: Mapping) -> dict:
  """The UNet config.json that matches `unet_params` (adds `time_cond_proj_dim` if it has cond_proj)."""
  config = dict(config)
  cond_proj = unet_params.get("time_embedding", {}).get("cond_proj")
  config["time_cond_proj_dim"] = int(cond_proj["kernel"].shape[0]) if cond_proj is not None else None
  return config


def check_output_folder(output: str, overwrite: bool = False) -> None:
  """Raises LcmJaxError unless `output` can become a pipeline folder: it must not be a file or
  lie under one, and an existing non-empty folder needs `overwrite` (it is then replaced whole)."""
  check_can_be_folder(output)
  if os.path.isdir(output) and os.listdir(output) and not overwrite:
    raise LcmJaxError(f"{output} is not empty; pass --overwrite (overwrite=True) to replace it")


def save_pipeline(pipe: Pipeline, output: str, *, dtype: str = "fp32", overwrite: bool = False) -> None:
  """Writes `pipe` as a diffusers pipeline folder that diffusers' `from_pretrained` loads.

  The folder is written beside `output` first and then moved into place, so an existing
  folder (replaced only with `overwrite`) never mixes old files with new ones, and an
  interrupted export leaves the old folder as it was.

  Args:
    dtype: "fp32", "fp16" or "bf16": the dtype of the written weights.
    overwrite: replace a non-empty `output` folder.
  """
  if dtype not in EXPORT_DTYPES:
    raise LcmJaxError(f"unknown export dtype {dtype!r}; choose from {', '.join(EXPORT_DTYPES)}")
  check_output_folder(output, overwrite)
  output = os.path.abspath(output)
  os.makedirs(os.path.dirname(output), exist_ok=True)
  staging = tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.writing-", dir=os.path.dirname(output))
  try:
    _write_pipeline_folder(pipe, staging, dtype)
    if os.path.isdir(output):
      retired = tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.old-", dir=os.path.dirname(output))
      os.rename(output, os.path.join(retired, "folder"))
      os.rename(staging, output)
      shutil.rmtree(retired)
    else:
      os.rename(staging, output)
  finally:
    if os.path.isdir(staging):
      shutil.rmtree(staging)


def _write_pipeline_folder(pipe: Pipeline, output: str, dtype: str) -> None:
  """The files of `save_pipeline`, written into the (empty) folder `output`."""
  def nbytes(params) -> int:
    return sum(np.dtype(EXPORT_DTYPES[dtype]).itemsize * int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))

  with progress_bar(sum(nbytes(p) for p in pipe.params.values()), "writing") as bar:
    for component, params in pipe.params.items():
      _write_component(pipe, output, component, params, dtype)
      bar.update(nbytes(params))
  _write_small_components(pipe, output, dict(pipe.model_index))


def _write_component(pipe: Pipeline, output: str, component: str, params, dtype: str) -> None:
  """One model component's folder: its config and its safetensors weights in `dtype`."""
  _, stem, config_name = COMPONENTS[component]
  sub = os.path.join(output, component)
  os.makedirs(sub, exist_ok=True)
  config = pipe.configs[component]
  if component == "unet":
    config = unet_config_for_params(config, params)
  with open(os.path.join(sub, config_name), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
  tensors = weights.flax_to_torch(params, dtype=EXPORT_DTYPES[dtype])
  write_safetensors(os.path.join(sub, stem + ".safetensors"), tensors, metadata={"format": "pt"})


def _write_small_components(pipe: Pipeline, output: str, index: dict) -> None:
  """Tokenizer, scheduler, components copied as they are, and model_index.json."""
  if pipe.tokenizer is not None:
    pipe.tokenizer.save_pretrained(os.path.join(output, "tokenizer"))
  if "scheduler" in pipe.configs:
    os.makedirs(os.path.join(output, "scheduler"), exist_ok=True)
    with open(os.path.join(output, "scheduler", COMPONENTS["scheduler"][2]), "w") as f:
      json.dump(pipe.configs["scheduler"], f, indent=2, sort_keys=True)
  # Copy components this code does not model (safety_checker, feature_extractor, ...) as they are.
  for name, entry in pipe.model_index.items():
    if name.startswith("_") or name in COMPONENTS or not isinstance(entry, list) or entry[1] is None:
      continue
    src = os.path.join(pipe.path, name)
    if os.path.isdir(src):
      shutil.copytree(src, os.path.join(output, name), dirs_exist_ok=True)
    else:
      index[name] = [None, None]
  with open(os.path.join(output, "model_index.json"), "w") as f:
    json.dump(index, f, indent=2, sort_keys=True)
