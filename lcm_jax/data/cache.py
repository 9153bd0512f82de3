"""Encode an image-caption data set once into a latent cache (see `lcm_jax.data.latents`).

One pass in data set order, centre crop, no flip: each image goes through the pipeline's VAE
encoder (the posterior's mean and log-variance are stored, so training still samples) and
each caption through its text encoder (the last hidden state of the tokenized caption), both
in one jitted function. Unusable records are skipped and counted, as in training.
"""

from __future__ import annotations

import datetime
import glob
import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from lcm_jax.data import latents as latents_lib
from lcm_jax.data import loader as data_loader
from lcm_jax.data import preprocess
from lcm_jax.errors import LcmJaxError, check_can_be_folder
from lcm_jax.models.vae import AutoencoderKL

_NAME_FIRST_SKIPS = 10  # skipped records named in the log; the rest are counted


def make_encoder(vae, text_encoder) -> Callable:
  """jitted (vae_params, text_params, pixels [B, R, R, 3] in [-1, 1], input_ids [B, L] int32)
  -> (mean [B, h, w, C], logvar [B, h, w, C], context [B, L, D]), float32.

  Parameters are arguments, not constants closed over (XLA would fold them into the program).
  """

  @jax.jit
  def encode(vae_params, text_params, pixels, input_ids):
    mean, logvar = vae.apply({"params": vae_params}, pixels, method=AutoencoderKL.encode)
    context, _ = text_encoder.apply({"params": text_params}, input_ids)
    return mean.astype(jnp.float32), logvar.astype(jnp.float32), context.astype(jnp.float32)

  return encode


class _ShardWriter:
  """Writes records to latents-00000.array_record, ... , `shard_size` records per file."""

  def __init__(self, folder: str, shard_size: int):
    self.folder, self.shard_size = folder, shard_size
    self.shards: list[str] = []
    self._writer, self._in_shard = None, 0

  def write(self, record: bytes) -> None:
    from array_record.python.array_record_module import ArrayRecordWriter
    if self._writer is None or self._in_shard == self.shard_size:
      self.close()
      self.shards.append(latents_lib.shard_name(len(self.shards)))
      # group_size:1 makes every record one chunk: cheapest random access for training.
      self._writer = ArrayRecordWriter(os.path.join(self.folder, self.shards[-1]), "group_size:1")
      self._in_shard = 0
    self._writer.write(record)
    self._in_shard += 1

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None


def existing_cache_files(output: str, overwrite: bool) -> list[str]:
  """The files of a cache already in `output`: an error unless `overwrite`; an error too if
  `output` is a file or lies under one."""
  check_can_be_folder(output, "--output")
  old = glob.glob(os.path.join(output, "latents-*.array_record"))
  old += [p for p in [os.path.join(output, latents_lib.METADATA_FILE)] if os.path.exists(p)]
  if old and not overwrite:
    raise LcmJaxError(f"{output} already holds a latent cache; pass --overwrite to replace it")
  return old


def cache_latents(pipe, data_config: ml_collections.ConfigDict, *, resolution: int, output: str,
                  batch_size: int = 8, shard_size: int = 10000, dtype: str = "float32",
                  overwrite: bool = False, progress: bool = True, model_name: str | None = None,
                  source=None) -> dict:
  """Encodes every record of an image data set into a latent cache in `output`.

  Args:
    pipe: a `Pipeline` with vae, text_encoder and tokenizer loaded.
    data_config: as `default_data_config()`, format wds, imagefolder or tfds (crop, flip and
      shuffle settings are ignored: one pass in order, centre crop, no flip).
    resolution: R; must be a multiple of the VAE's downsampling factor.
    dtype: "float32" or "float16", the stored dtype (training reads float32 either way).
    source: the data set's record source if already opened (`loader.image_source`).
  Returns:
    the metadata written to `output/metadata.json`.
  """
  config = data_loader.resolve_data_config(data_config)
  encode = make_encoder(pipe.vae, pipe.text_encoder)
  layout = _check_and_lay_out(pipe, config, encode, resolution=resolution, batch_size=batch_size,
                              shard_size=shard_size, dtype=dtype)
  old = existing_cache_files(output, overwrite)
  total, examples = data_loader.iterate_examples_once(config, resolution=resolution, tokenizer=pipe.tokenizer,
                                                        source=source)
  for path in old:
    os.remove(path)
  os.makedirs(output, exist_ok=True)
  writer = _ShardWriter(output, shard_size)
  start = time.perf_counter()
  try:
    count, skipped = _encode_all(pipe, encode, layout, writer, examples, total, batch_size, progress)
  finally:
    writer.close()
  if count == 0:
    raise LcmJaxError(f"no usable records in {config.path or config.tfds_name}: all {skipped} were skipped")
  metadata = {
      "format": latents_lib.FORMAT_NAME,
      "version": latents_lib.FORMAT_VERSION,
      "model": model_name if model_name is not None else pipe.path,
      "resolution": resolution,
      "vae_scaling_factor": pipe.vae_scaling_factor,
      "latent_shape": list(layout.latent_shape),
      "text_shape": list(layout.text_shape),
      "dtype": dtype,
      "count": count,
      "skipped": skipped,
      "shards": writer.shards,
      "shard_size": shard_size,
      "source": {k: config[k] for k in ("path", "format", "image_key", "caption_key", "tfds_name", "tfds_split",
                                        "data_dir")},
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "seconds": round(time.perf_counter() - start, 1),
  }
  latents_lib.write_metadata(output, metadata)
  return metadata


def _check_and_lay_out(pipe, config, encode, *, resolution: int, batch_size: int, shard_size: int,
                       dtype: str) -> latents_lib.LatentsLayout:
  """Checks the arguments against the model (before anything is read or written) and returns
  the record layout of the cache."""
  if config.format not in data_loader.IMAGE_FORMATS:
    raise LcmJaxError(f"cache_latents reads an image format ({', '.join(data_loader.IMAGE_FORMATS)}), "
                      f"not {config.format!r}")
  if dtype not in latents_lib.DTYPES:
    raise LcmJaxError(f"unknown cache dtype {dtype!r}; choose from {', '.join(latents_lib.DTYPES)}")
  if batch_size <= 0 or shard_size <= 0:
    raise LcmJaxError("batch_size and shard_size must be positive")
  factor = pipe.vae.config.downsampling_factor
  if resolution <= 0 or resolution % factor:
    raise LcmJaxError(f"resolution {resolution} is not a positive multiple of the VAE's downsampling factor {factor}")
  shapes = jax.eval_shape(encode, pipe.params["vae"], pipe.params["text_encoder"],
                          jax.ShapeDtypeStruct((1, resolution, resolution, 3), jnp.float32),
                          jax.ShapeDtypeStruct((1, pipe.tokenizer.model_max_length), jnp.int32))
  return latents_lib.LatentsLayout(tuple(shapes[0].shape[1:]), tuple(shapes[2].shape[1:]), dtype)


def _encode_all(pipe, encode, layout, writer: _ShardWriter, examples, total: int, batch_size: int,
                progress: bool) -> tuple[int, int]:
  """Encodes and writes every usable example; (records written, records skipped). A batch is
  written while the next one computes on the device."""
  from tqdm import tqdm
  count = skipped = 0
  in_flight = None  # (device outputs, captions, n)

  def write(flight):
    nonlocal count
    outputs, captions, n = flight
    mean, logvar, context = (np.asarray(o)[:n] for o in outputs)
    for i in range(n):
      writer.write(layout.encode({"latent_mean": mean[i], "latent_logvar": logvar[i], "context": context[i]},
                                 captions[i]))
    count += n

  def dispatch(batch: list[dict]):
    n = len(batch)
    batch = batch + [batch[-1]] * (batch_size - n)  # a full batch: one compiled shape
    pixels = preprocess.to_model_pixels(np.stack([e["pixels"] for e in batch]))
    input_ids = np.stack([e["input_ids"] for e in batch])
    outputs = encode(pipe.params["vae"], pipe.params["text_encoder"], pixels, input_ids)
    return outputs, [e["caption"] for e in batch[:n]], n

  pending: list[dict] = []
  with tqdm(total=total, unit="img", desc="encoding", disable=not progress) as bar:
    for example in examples:
      bar.update(1)
      if preprocess.is_skip(example):
        skipped += 1
        bar.set_postfix(skipped=skipped)
        if skipped <= _NAME_FIRST_SKIPS:  # records are read in order here: no read-ahead to count
          info = preprocess.skip_info(example)
          logging.warning("data: skipped record %d: %s [%s #%s]: %s", skipped, info["id"], info["source"],
                          info["index"], info["reason"])
        continue
      pending.append(example)
      if len(pending) == batch_size:
        flight, pending = dispatch(pending), []
        if in_flight is not None:
          write(in_flight)
        in_flight = flight
    for flight in ([dispatch(pending)] if pending else []) + [None]:
      if in_flight is not None:
        write(in_flight)
      in_flight = flight
  return count, skipped
