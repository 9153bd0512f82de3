r"""Where along t an LCM knows a colour: one consistency step f(z_t, w, c, t) from real images
noised to t, read back by the attribute network.

    python -m lcm_jax.toy.lcf_probe --lcm workdirs/toy --domain shifted --output docs/toy/lcf/probe_before.json

For --num_images real images of the domain (VAE posterior mean latents x, their captions),
z_t = alpha_t x + sigma_t eps at each t of --timesteps, one UNet call, the decoded f; the
colour / shape / position read back and the alignment (all three right) per t. A model that
learnt a colour only near the data (small t) draws it after one step from small t but not
from t = 999, where 1- to 4-step sampling decides it.
"""

from __future__ import annotations

import json
import os

import numpy as np
from absl import flags, logging

from lcm_jax import cli
from lcm_jax.toy import METRIC_DIR

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_string("lcm", None, "An LCM workdir (EMA target) or pipeline folder.")
  flags.DEFINE_integer("lcm_step", None, "Checkpoint step of a workdir (default: the latest).")
  flags.DEFINE_enum("domain", "shifted", ["teacher", "shifted"], "Colours of the real images.")
  flags.DEFINE_list("timesteps", ["19", "199", "399", "599", "799", "999"], "Timesteps t.")
  flags.DEFINE_integer("num_images", 500, "Real images.")
  flags.DEFINE_float("guidance_scale", 9.0, "g = 1 + w embedded.")
  flags.DEFINE_string("output", None, "JSON file for the numbers.")


def probe(pipe, attrs, timesteps, guidance_scale: float, seed: int = 0) -> dict:
  import jax
  import jax.numpy as jnp

  from lcm_jax.consistency import consistency_output, guidance_embedding
  from lcm_jax.models.vae import AutoencoderKL
  from lcm_jax.schedule import alpha_sigma, schedule_from_config, to_x0_eps
  from lcm_jax.text_to_image import encode_prompts, to_uint8_images
  from lcm_jax.toy import domain
  from lcm_jax.toy.metrics import DomainMetrics, alignment_scores

  schedule = schedule_from_config(pipe.scheduler_config)
  scaling = pipe.vae_scaling_factor
  images = domain.draw_all(attrs, 4321)
  context = encode_prompts(pipe, [a.caption for a in attrs])
  unet, vae = pipe.unet, pipe.vae
  dim = int(unet.config.time_cond_proj_dim)
  timestep_scaling = float(pipe.scheduler_config.get("timestep_scaling", 10.0))

  @jax.jit
  def one(params, x_img, ctx, t, key):
    mean, _ = vae.apply({"params": params["vae"]}, x_img, method=AutoencoderKL.encode)
    x = mean * scaling
    b = x.shape[0]
    tt = jnp.full((b,), t, jnp.int32)
    alpha, sigma = alpha_sigma(schedule, tt)
    z = alpha[:, None, None, None] * x + sigma[:, None, None, None] * jax.random.normal(key, x.shape)
    w = guidance_embedding(jnp.full((b,), guidance_scale - 1.0, jnp.float32), dim)
    out = unet.apply({"params": params["unet"]}, z, tt, ctx, w)
    x0, _ = to_x0_eps(out, z, alpha, sigma, schedule.prediction_type)
    f = consistency_output(z, x0, tt, timestep_scaling)
    return to_uint8_images(vae.apply({"params": params["vae"]}, f / scaling, method=AutoencoderKL.decode))

  metrics = DomainMetrics.load(METRIC_DIR)
  params = {"unet": pipe.params["unet"], "vae": pipe.params["vae"]}
  x_img = jnp.asarray(images, jnp.float32) / 127.5 - 1.0
  out = {}
  for i, t in enumerate(timesteps):
    decoded = []
    for s in range(0, len(attrs), 250):
      decoded.append(np.asarray(one(params, x_img[s:s + 250], context[s:s + 250], int(t),
                                    jax.random.fold_in(jax.random.key(seed), i * 1000 + s))))
    _, predictions = metrics.read(np.concatenate(decoded))
    scores = alignment_scores(predictions, attrs)
    out[str(t)] = {k: round(float(v), 4) for k, v in scores.items()}
    print(f"[lcf_probe] t={t}: {out[str(t)]}", flush=True)
  return out


def main(argv):
  del argv
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  from lcm_jax import workdir as workdir_lib
  from lcm_jax.load import load_pipeline
  from lcm_jax.toy import domain
  if workdir_lib.is_workdir(FLAGS.lcm):
    pipe = workdir_lib.load_pipeline_from_workdir(FLAGS.lcm, "ema", FLAGS.lcm_step)
  else:
    pipe = load_pipeline(FLAGS.lcm)
  colours = domain.TRAIN_COLOURS if FLAGS.domain == "teacher" else domain.SHIFTED_COLOURS
  attrs = domain.prompt_set(FLAGS.num_images, 99, colours=colours)
  result = {"lcm": FLAGS.lcm, "lcm_step": FLAGS.lcm_step, "domain": FLAGS.domain, "num_images": FLAGS.num_images,
            "guidance_scale": FLAGS.guidance_scale,
            "per_timestep": probe(pipe, attrs, [int(t) for t in FLAGS.timesteps], FLAGS.guidance_scale)}
  if FLAGS.output:
    os.makedirs(os.path.dirname(FLAGS.output) or ".", exist_ok=True)
    with open(FLAGS.output, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
