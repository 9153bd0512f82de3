"""The models a run does not train (teacher UNet, VAE, text encoder), loaded straight onto the mesh."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lcm_jax.models.unet import UNetConfig
from lcm_jax.models.vae import scaling_factor as vae_scaling_factor
from lcm_jax.sd_pipeline import abstract_params, build_module, load_component, read_json
from lcm_jax.sharding import param_shardings, replicated
from lcm_jax.tokenizer import tokenize
from lcm_jax.training.sources import Sources


def sharded_placer(abstract: Any, mesh: jax.sharding.Mesh,
                   rules: Sequence | None = None) -> Callable[[tuple[str, ...], np.ndarray], jax.Array]:
  """A `place` for `load_component`: puts each loaded leaf straight into its rule-table sharding."""
  shardings = param_shardings(abstract, mesh, **({"rules": rules} if rules is not None else {}))
  flat = {tuple(str(getattr(k, "key", k)) for k in path): s
          for path, s in jax.tree_util.tree_flatten_with_path(shardings)[0]}
  return lambda path, array: jax.device_put(array, flat[tuple(path)])


def load_sharded(folder: str, component: str, mesh, *, dtype, param_dtype, variant=None, config=None,
                 rules: Sequence | None = None, **module_kwargs):
  """(module, params) of one component folder, each parameter placed in its sharding."""
  config = read_json(os.path.join(folder, "config.json")) if config is None else config
  abstract = abstract_params(build_module(component, config, dtype=dtype, param_dtype=param_dtype))
  module, params, _ = load_component(folder, component, dtype=dtype, param_dtype=param_dtype, variant=variant,
                                     place=sharded_placer(abstract, mesh, rules), **module_kwargs)
  return module, params


@dataclasses.dataclass
class FrozenModels:
  """The frozen side of a run.

  Attributes:
    vae, text_encoder, teacher: Flax modules, or None where the run does not need them.
    vae_params, text_params: their parameters on the mesh (or None).
    teacher_fp32: the teacher UNet's weights in float32 (a fresh student copies them; the
      trainer drops them once the state exists), or None.
    arrays: the frozen inputs of the jitted step: "uncond_context" [1, L, D], and "teacher",
      "vae", "text_encoder" parameters where the step uses them.
    scaling_factor: the VAE's latent scaling factor.
  """
  vae: Any
  vae_params: Any
  text_encoder: Any
  text_params: Any
  teacher: Any
  teacher_fp32: Any
  arrays: dict
  scaling_factor: float


def module_options(config, component: str) -> dict:
  """Module attributes the config sets for a frozen component: the attention backend of the
  UNet and the VAE (the text encoder's 77 tokens need none)."""
  return {"attention": config.attention} if component in ("unet", "vae") else {}


def needed_components(config, latents_format: bool) -> tuple[bool, bool]:
  """(needs the VAE, needs the text encoder): when images are encoded in the step, the
  unconditional context is the empty prompt's (text encoder), or samples are drawn."""
  needs_text = not latents_format or config.loss.uncond == "empty_prompt" or config.sample_every > 0
  needs_vae = not latents_format or config.sample_every > 0
  return needs_vae, needs_text


def load_frozen_models(config, sources: Sources, mesh: jax.sharding.Mesh, *, tokenizer,
                       latents_format: bool) -> FrozenModels:
  """Loads what the run needs: the teacher UNet (LCD), and the VAE and text encoder where
  `needed_components` says so."""
  teacher_dtype = jnp.dtype(config.precision.teacher_dtype)
  rules = tuple(config.mesh.rules)
  needs_vae, needs_text = needed_components(config, latents_format)
  kw = dict(dtype=teacher_dtype, param_dtype=teacher_dtype, variant=sources.base_variant, rules=rules)
  vae, vae_params = (load_sharded(os.path.join(sources.base, "vae"), "vae", mesh, **kw,
                                  **module_options(config, "vae"))
                     if needs_vae else (None, None))
  text_encoder, text_params = (load_sharded(os.path.join(sources.base, "text_encoder"), "text_encoder", mesh, **kw)
                               if needs_text else (None, None))
  context_dim = int(UNetConfig.from_dict(sources.student_unet_config).cross_attention_dim)
  if config.loss.uncond == "empty_prompt":
    ids = tokenize(tokenizer, [""])
    uncond_context = jax.jit(lambda p, i: text_encoder.apply({"params": p}, i)[0])(text_params, ids)
  else:
    uncond_context = jnp.zeros((1, tokenizer.model_max_length, context_dim), jnp.dtype(config.precision.compute_dtype))
  arrays = {"uncond_context": jax.device_put(uncond_context, replicated(mesh))}
  if not latents_format:
    arrays["vae"], arrays["text_encoder"] = vae_params, text_params
  teacher = teacher_fp32 = None
  if sources.teacher:
    teacher, teacher_fp32, arrays["teacher"] = _load_teacher(sources, mesh, teacher_dtype, rules,
                                                                      module_options(config, "unet"))
  return FrozenModels(vae=vae, vae_params=vae_params, text_encoder=text_encoder, text_params=text_params,
                      teacher=teacher, teacher_fp32=teacher_fp32, arrays=arrays,
                      scaling_factor=vae_scaling_factor(sources.vae_config))


def _load_teacher(sources: Sources, mesh, teacher_dtype, rules, options: dict):
  """(module, float32 weights, weights in teacher_dtype): the weights are read once in float32
  (a fresh student copies them as master weights) and the teacher is a cast of them."""
  folder = os.path.join(sources.teacher, "unet")
  config = read_json(os.path.join(folder, "config.json"))
  module = build_module("unet", config, dtype=teacher_dtype, param_dtype=teacher_dtype, **options)
  _, fp32 = load_sharded(folder, "unet", mesh, dtype=teacher_dtype, param_dtype=jnp.float32,
                         variant=sources.base_variant, config=config, rules=rules)
  cast = lambda tree: jax.tree.map(lambda x: x.astype(teacher_dtype), tree)
  return module, fp32, jax.jit(cast, out_shardings=jax.tree.map(lambda x: x.sharding, fp32))(fp32)


def abstract_frozen_models(config, sources: Sources, mesh: jax.sharding.Mesh, *, latents_format: bool,
                           context_length: int) -> FrozenModels:
  """The frozen side as `load_frozen_models` lays it out, with `jax.ShapeDtypeStruct`s (carrying
  their shardings) instead of weights: for compiling the step without loading anything."""
  dtype = jnp.dtype(config.precision.teacher_dtype)
  rules = tuple(config.mesh.rules)
  needs_vae, needs_text = needed_components(config, latents_format)

  def abstract(component: str, component_config, param_dtype=dtype):
    module = build_module(component, component_config, dtype=dtype, param_dtype=param_dtype,
                          **module_options(config, component))
    shapes = abstract_params(module)
    shardings = param_shardings(shapes, mesh, rules=rules)
    return module, jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)

  vae, vae_params = abstract("vae", sources.vae_config) if needs_vae else (None, None)
  text_encoder, text_params = (abstract("text_encoder", read_json(os.path.join(sources.base, "text_encoder",
                                                                               "config.json")))
                               if needs_text and sources.base else (None, None))
  context_dim = int(UNetConfig.from_dict(sources.student_unet_config).cross_attention_dim)
  uncond_dtype = dtype if config.loss.uncond == "empty_prompt" else jnp.dtype(config.precision.compute_dtype)
  arrays = {"uncond_context": jax.ShapeDtypeStruct((1, context_length, context_dim), uncond_dtype,
                                                   sharding=replicated(mesh))}
  if not latents_format:
    arrays["vae"], arrays["text_encoder"] = vae_params, text_params
  teacher = teacher_fp32 = None
  if sources.teacher:
    teacher_config = read_json(os.path.join(sources.teacher, "unet", "config.json"))
    teacher, arrays["teacher"] = abstract("unet", teacher_config)
  return FrozenModels(vae=vae, vae_params=vae_params, text_encoder=text_encoder, text_params=text_params,
                      teacher=teacher, teacher_fp32=teacher_fp32, arrays=arrays,
                      scaling_factor=vae_scaling_factor(sources.vae_config))
