r"""Encodes an image-caption data set once into a latent cache for training (`data.format=latents`).

Each image (centre crop, no flip, data set order) goes through the pipeline's VAE encoder and
each caption through its text encoder; the VAE posterior (mean, logvar) and the text encoder's
last hidden state are written to ArrayRecord shards with a metadata.json.

Example:
  python -m lcm_jax.cache_latents --model path/to/sd-pipeline --data_path 'shards/{00000..00099}.tar' \
      --data_format wds --resolution 512 --output latents/
"""

from __future__ import annotations

from absl import flags

from lcm_jax import cli

FLAGS = flags.FLAGS
def define_flags() -> None:
  """The program's flags, defined when it runs (importing this module defines none)."""
  flags.DEFINE_string("model", None, "A diffusers pipeline folder (or hub id): its VAE, text encoder and tokenizer.")
  flags.DEFINE_string("data_path", "", "The data: a folder, file, glob, brace pattern or URL (gs://...); "
                      "for tfds, the dataset name unless --tfds_name is given.")
  flags.DEFINE_enum("data_format", "wds", ["wds", "imagefolder", "tfds"], "Format of the data.")
  flags.DEFINE_integer("resolution", None, "Image side R: shorter side resized to R (bilinear), centre crop R x R.")
  flags.DEFINE_string("output", None, "Folder for the cache (latents-*.array_record, metadata.json).")
  flags.DEFINE_integer("batch_size", 8, "Images encoded per jitted call.")
  flags.DEFINE_integer("shard_size", 10000, "Records per ArrayRecord shard.")
  flags.DEFINE_enum("dtype", "float32", ["float32", "float16"], "Stored dtype (float16 halves the cache).")
  flags.DEFINE_bool("overwrite", False, "Replace a cache already in --output.")
  flags.DEFINE_string("image_key", "", "wds: image extensions in order of preference (default jpg,jpeg,png,webp); "
                      "tfds: image feature (default image).")
  flags.DEFINE_string("caption_key", "", "wds: caption extension (default txt); imagefolder: metadata column "
                      "(default text); tfds: caption feature (default caption).")
  flags.DEFINE_string("tfds_name", "", "TFDS dataset name (tfds format).")
  flags.DEFINE_string("tfds_split", "train", "TFDS split (tfds format).")
  flags.DEFINE_string("data_dir", "", "TFDS data_dir (tfds format; default: TFDS's).")
  flags.DEFINE_integer("read_threads", 16, "Threads reading and decoding images.")
  cli.define_hub_flags()
  flags.mark_flags_as_required(["model", "resolution", "output"])


def main(argv: list[str]) -> None:
  del argv
  from lcm_jax.data.cache import cache_latents, existing_cache_files
  from lcm_jax.data.loader import image_source, resolve_data_config
  from lcm_jax.load import load_pipeline
  config = resolve_data_config(dict(
      path=FLAGS.data_path, format=FLAGS.data_format, image_key=FLAGS.image_key, caption_key=FLAGS.caption_key,
      tfds_name=FLAGS.tfds_name, tfds_split=FLAGS.tfds_split, data_dir=FLAGS.data_dir,
      read_threads=FLAGS.read_threads))
  # Check the output and open (index) the data before the slow model load, so mistakes fail fast.
  existing_cache_files(FLAGS.output, FLAGS.overwrite)
  source, _ = image_source(config)
  print(f"{FLAGS.data_path or FLAGS.tfds_name}: {len(source)} records", flush=True)
  print(f"loading {FLAGS.model} (vae, text_encoder, tokenizer) ...", flush=True)
  pipe = load_pipeline(FLAGS.model, components=("vae", "text_encoder", "tokenizer"), variant=FLAGS.variant,
                       revision=FLAGS.revision, token=FLAGS.token)
  meta = cache_latents(pipe, config, resolution=FLAGS.resolution, output=FLAGS.output,
                       batch_size=FLAGS.batch_size, shard_size=FLAGS.shard_size, dtype=FLAGS.dtype,
                       overwrite=FLAGS.overwrite, model_name=FLAGS.model, source=source)
  rate = meta["count"] / max(meta["seconds"], 1e-9)
  print(f"cached {meta['count']} images ({meta['skipped']} skipped) in {len(meta['shards'])} shard(s) to "
        f"{FLAGS.output} in {meta['seconds']:.1f}s ({rate:.1f} img/s); latents {'x'.join(map(str, meta['latent_shape']))}, "
        f"text {'x'.join(map(str, meta['text_shape']))}, {meta['dtype']}, vae scaling factor "
        f"{meta['vae_scaling_factor']}")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
