r"""The LCM-LoRA paper's "acceleration vector" on the toy: fine-tune the toy teacher on the shifted
colours, then add the LCM-LoRA distilled from the *original* teacher to the fine-tune.

    python -m lcm_jax.toy.finetune --output workdirs/toy_teacher_shifted --steps 400
    python -m lcm_jax.toy.finetune --with_lora workdirs/toy_lora64 \
        --teacher workdirs/toy_teacher_shifted --output workdirs/toy_shifted_lcm_lora64
    python -m lcm_jax.toy.evaluate --teacher workdirs/toy_teacher_shifted \
        --lcm workdirs/toy_shifted_lcm_lora64 --domain shifted --output docs/toy/acceleration

The fine-tune continues the teacher's own recipe (`lcm_jax.toy.teacher.train_unet`: epsilon
prediction, 10% caption dropout, min-SNR-5, AdamW with a cosine schedule, an EMA) from the
teacher's UNet on images whose shapes are orange, purple or pink (plus, half of each batch, the
teacher's own colours, so that it learns the new words without forgetting the old); the VAE,
text encoder and tokenizer are the teacher's. `--with_lora WORKDIR` writes a pipeline folder:
the UNet of --teacher with the adapter of a LoRA run (configs/toy_lora.py) fused in, and that
run's LCMScheduler, which `lcm_jax.toy.evaluate --lcm` scores like any LCM.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import numpy as np
from absl import flags

from lcm_jax import cli
from lcm_jax.toy import TEACHER_DIR, display_path, domain

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_string("teacher", display_path(TEACHER_DIR), "The teacher pipeline folder to start from.")
  flags.DEFINE_string("output", None, "Pipeline folder to write.")
  flags.DEFINE_integer("steps", 400, "Fine-tuning steps.")
  flags.DEFINE_integer("batch", 64, "Images per step.")
  flags.DEFINE_float("lr", 2e-4, "Peak learning rate (cosine decay, 10% warm-up).")
  flags.DEFINE_integer("num_images", 8000, "Shifted-colour images (and as many of the teacher's colours).")
  flags.DEFINE_integer("seed", 11, "Seed of the data and noise.")
  flags.DEFINE_string("with_lora", None, "Instead of fine-tuning: a LoRA run's workdir whose EMA adapter is fused "
                      "into --teacher's UNet, written with the run's LCMScheduler as --output.")
  flags.mark_flags_as_required(["output"])


def finetune(teacher: str, output: str, *, steps: int, batch: int, lr: float, num_images: int, seed: int) -> dict:
  """Writes `output`: `teacher` with its UNet fine-tuned on shifted + original colours; returns a report."""
  from lcm_jax.load import load_pipeline
  from lcm_jax.sd_pipeline import save_pipeline
  from lcm_jax.toy import teacher as teacher_lib
  start = time.perf_counter()
  pipe = load_pipeline(teacher)
  shifted, shifted_attrs = domain.batch(seed, 0, num_images, colours=domain.SHIFTED_COLOURS)
  original, original_attrs = domain.batch(seed + 1, 0, num_images)
  images, attrs = np.concatenate([shifted, original]), shifted_attrs + original_attrs
  captions = sorted({a.caption for a in attrs})
  row = {c: i for i, c in enumerate(captions)}
  contexts = teacher_lib.encode_texts(pipe.text_encoder, pipe.params["text_encoder"], pipe.tokenizer, captions)
  uncond = teacher_lib.encode_texts(pipe.text_encoder, pipe.params["text_encoder"], pipe.tokenizer, [""])[0]
  mean, logvar = teacher_lib.encode_images(pipe.vae, pipe.params["vae"], images)
  recipe = dataclasses.replace(teacher_lib.Recipe(), seed=seed, unet_steps=steps, unet_batch=batch, unet_lr=lr,
                               warmup_steps=steps // 10, ema_decay=0.99)
  scaling = float(pipe.configs["vae"]["scaling_factor"])
  caption_ids = np.asarray([row[a.caption] for a in attrs], np.int32)
  _, params, loss = teacher_lib.train_unet(mean, logvar, scaling, caption_ids, contexts, uncond, recipe,
                                           init_params=jax.tree.map(np.array, pipe.params["unet"]))
  pipe.params["unet"] = params
  save_pipeline(pipe, output, overwrite=True)
  report = {"from": teacher, "steps": steps, "batch": batch, "lr": lr, "ema_decay": recipe.ema_decay,
            "num_images": 2 * num_images, "final_loss": loss, "seconds": round(time.perf_counter() - start, 1)}
  with open(os.path.join(output, "toy_finetune.json"), "w") as f:
    json.dump(report, f, indent=2)
  return report


def with_lora(teacher: str, workdir: str, output: str) -> None:
  """`teacher`'s pipeline with the EMA adapter of the LoRA run `workdir` fused into its UNet and
  the run's LCMScheduler config, written to `output`."""
  from lcm_jax import workdir as workdir_lib
  from lcm_jax.load import load_pipeline
  from lcm_jax.lora import merge
  from lcm_jax.sd_pipeline import read_json, save_pipeline
  adapters, scale = workdir_lib.load_lora(workdir, "ema")
  pipe = load_pipeline(teacher)
  pipe.params["unet"] = jax.jit(merge, static_argnums=2)(pipe.params["unet"], adapters, scale)
  pipe.configs["scheduler"] = read_json(os.path.join(workdir_lib.model_dir(workdir), "scheduler",
                                                     "scheduler_config.json"))
  pipe.model_index = dict(pipe.model_index, scheduler=["diffusers", "LCMScheduler"])
  save_pipeline(pipe, output, overwrite=True)


def main(argv) -> None:
  del argv
  if FLAGS.with_lora:
    with_lora(FLAGS.teacher, FLAGS.with_lora, FLAGS.output)
    print(f"wrote {FLAGS.output}: {FLAGS.teacher} + the LoRA of {FLAGS.with_lora}", flush=True)
    return
  report = finetune(FLAGS.teacher, FLAGS.output, steps=FLAGS.steps, batch=FLAGS.batch, lr=FLAGS.lr,
                    num_images=FLAGS.num_images, seed=FLAGS.seed)
  print(json.dumps(report), flush=True)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
