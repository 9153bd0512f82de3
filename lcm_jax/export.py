"""Writes a model as a diffusers pipeline folder that PyTorch diffusers loads, with a model card.

Examples:
  python -m lcm_jax.export --model path/to/sd-pipeline --output exported/ --dtype fp16
  python -m lcm_jax.export --model runs/sd21_768 --output lcm-sd21/     # a training workdir
  python -m lcm_jax.export --model runs/sd21_768 --output lcm-sd21/ --overwrite   # replace it
  python -m lcm_jax.export --model runs/sd21_768 --output lcm-sd21/ --push_to_hub me/lcm-sd21
  python -m lcm_jax.export --model runs/sd15_lcm_lora --lora-only --output lcm-lora-sd15/   # adapter only

Every export writes <output>/README.md: a model card the Hugging Face Hub renders (base model,
licence when known, the training settings and step of a workdir, and the diffusers snippet
that samples it). --push_to_hub uploads the folder with huggingface_hub (create_repo +
upload_folder); the token is --token, else HF_TOKEN or the one `hf auth login` saved.
"""

from __future__ import annotations

import os
import time

from absl import flags, logging

from lcm_jax import cli
from lcm_jax.errors import LcmJaxError

FLAGS = flags.FLAGS
def define_flags() -> None:
  """The program's flags, defined when it runs (importing this module defines none)."""
  flags.DEFINE_string("model", None, "Source: a diffusers pipeline folder, a Hugging Face Hub repo id, or a "
                      "training workdir (its latest checkpoint, written for LatentConsistencyModelPipeline).")
  flags.DEFINE_string("output", None, "Destination folder (created). A non-empty folder needs --overwrite.")
  flags.DEFINE_bool("overwrite", False, "Replace a non-empty --output folder whole (written beside it, then "
                    "swapped in: no old file survives next to the new ones).")
  flags.DEFINE_enum("dtype", "fp32", ["fp32", "fp16", "bf16"], "Dtype of the written weights.")
  flags.DEFINE_enum("params", "ema", ["ema", "online"], "For a workdir: the EMA target (default) or the student.")
  flags.DEFINE_string("push_to_hub", None, "A Hugging Face Hub repo id (owner/name): upload the exported folder "
                      "there (the repo is created if missing). The model card's snippet then loads that id.")
  flags.DEFINE_bool("private", False, "With --push_to_hub: create the repo private.")
  cli.define_hub_flags(token_use="--push_to_hub and for a gated or private --model")
  flags.DEFINE_string("base_model", None, "The model card's base_model, for a folder or hub source (a workdir's "
                      "card names its teacher by itself).")
  flags.DEFINE_bool("lora_only", False, "For the workdir of a LoRA run (config.student=lora): write only its "
                    "adapter, <output>/pytorch_lora_weights.safetensors, in diffusers' format "
                    "(StableDiffusionPipeline.load_lora_weights(<output>) loads it). Without it a LoRA run "
                    "exports as a full pipeline with the adapter fused into the UNet.")
  flags.DEFINE_alias("lora-only", "lora_only")
  flags.mark_flags_as_required(["model", "output"])


def check_repo_id(repo_id: str) -> None:
  """Raises LcmJaxError unless `repo_id` is a valid hub model id (owner/name)."""
  from huggingface_hub.utils import HFValidationError, validate_repo_id
  try:
    validate_repo_id(repo_id)
  except HFValidationError as e:
    raise LcmJaxError(f"--push_to_hub {repo_id!r} is not a hub repo id: {str(e).splitlines()[0]}") from None
  if repo_id.count("/") != 1:
    raise LcmJaxError(f"--push_to_hub {repo_id!r} must be owner/name (your user or organisation, then the model)")


def card_for(pipe, source: str, *, repo_id: str | None, params: str, base_model: str | None) -> str:
  """The model card of `pipe`, loaded from `source` (a workdir's card carries its run's config and step)."""
  from lcm_jax import model_card
  from lcm_jax import workdir as workdir_lib
  facts = dict(model_index=pipe.model_index, unet_config=pipe.configs.get("unet", {}),
               scheduler_config=pipe.configs.get("scheduler", {}), source=source, repo_id=repo_id,
               params=params, base_model=base_model)
  path = os.path.expanduser(source)
  if workdir_lib.is_workdir(path):
    config = workdir_lib.saved_config(path) or {}
    info = workdir_lib.model_info(path)
    facts.update(training=config, step=workdir_lib.latest_step(path),
                 base_model=base_model or info.get("teacher") or info.get("init_from") or None,
                 guidance_scale=config.get("sample_guidance_scale"))
  return model_card.model_card(**facts)


def lora_card_for(workdir: str, folder: str, *, repo_id: str | None, params: str, base_model: str | None) -> str:
  """The model card of a LoRA run's adapter: its base is the run's teacher (or --base_model)."""
  from lcm_jax import model_card
  from lcm_jax import workdir as workdir_lib
  path = os.path.expanduser(workdir)
  return model_card.lora_card(base_model=base_model or workdir_lib.model_info(path)["teacher"], source=workdir,
                              folder=folder, repo_id=repo_id, training=workdir_lib.saved_config(path) or {},
                              step=workdir_lib.latest_step(path), params=params)


def write_card(folder: str, text: str) -> str:
  from lcm_jax.model_card import CARD_FILE
  path = os.path.join(folder, CARD_FILE)
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)
  return path


def push_folder(folder: str, repo_id: str, *, token: str | None = None, private: bool = False,
                commit_message: str = "Upload pipeline exported with lcm-jax") -> str:
  """Uploads `folder` to the hub model repo `repo_id` (created if missing); returns its URL.

  Raises:
    LcmJaxError: the hub cannot be reached (offline), the token is missing or may not write there.
  """
  try:
    from huggingface_hub import HfApi
    api = HfApi(token=token)
    url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model", commit_message=commit_message)
  except Exception as e:  # offline, no token, no write access: the hub raises many types
    first_line = str(e).splitlines()[0] if str(e) else ""
    raise LcmJaxError(
        f"could not push {folder} to the Hugging Face Hub repo {repo_id!r} ({type(e).__name__}: {first_line}). "
        f"The export itself is complete; upload it later with `hf upload {repo_id} {folder}` "
        "(log in with `hf auth login` or set HF_TOKEN).") from None
  return str(getattr(url, "url", url))


def main(argv: list[str]) -> None:
  del argv
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # keep stderr for progress and errors (as lcm_jax.sample)
  from lcm_jax.load import load_pipeline
  from lcm_jax.sd_pipeline import check_output_folder, save_pipeline
  check_output_folder(FLAGS.output, FLAGS.overwrite)  # before the (slow) load
  if FLAGS.push_to_hub:
    check_repo_id(FLAGS.push_to_hub)
  start = time.perf_counter()
  if FLAGS.lora_only:
    export_lora_only(start)
    return
  print(f"loading {FLAGS.model} ...", flush=True)
  pipe = load_pipeline(FLAGS.model, variant=FLAGS.variant, revision=FLAGS.revision, token=FLAGS.token,
                       params=FLAGS.params)
  print(f"writing {FLAGS.output} ({FLAGS.dtype}) ...", flush=True)
  save_pipeline(pipe, FLAGS.output, dtype=FLAGS.dtype, overwrite=FLAGS.overwrite)
  card = write_card(FLAGS.output, card_for(pipe, FLAGS.model, repo_id=FLAGS.push_to_hub, params=FLAGS.params,
                                           base_model=FLAGS.base_model))
  print(f"exported {', '.join(sorted(pipe.params))} to {FLAGS.output} in {time.perf_counter() - start:.1f}s "
        f"(model card: {card})", flush=True)
  if FLAGS.push_to_hub:
    print(f"pushing {FLAGS.output} to {FLAGS.push_to_hub} ...", flush=True)
    url = push_folder(FLAGS.output, FLAGS.push_to_hub, token=FLAGS.token, private=FLAGS.private,
                      commit_message=f"Upload {os.path.basename(os.path.normpath(FLAGS.model))} exported with lcm-jax")
    print(f"pushed to {url}")


def export_lora_only(start: float) -> None:
  """--lora-only: the adapter of a LoRA run's checkpoint, in diffusers' LoRA format (and pushed)."""
  from lcm_jax.workdir import export_lora
  path = export_lora(FLAGS.model, FLAGS.output, params=FLAGS.params, dtype=FLAGS.dtype, overwrite=FLAGS.overwrite)
  card = write_card(FLAGS.output, lora_card_for(FLAGS.model, FLAGS.output, repo_id=FLAGS.push_to_hub,
                                                params=FLAGS.params, base_model=FLAGS.base_model))
  print(f"exported the LoRA adapter of {FLAGS.model} to {path} in {time.perf_counter() - start:.1f}s "
        f"(model card: {card})", flush=True)
  if FLAGS.push_to_hub:
    print(f"pushing {FLAGS.output} to {FLAGS.push_to_hub} ...", flush=True)
    print(f"pushed to {push_folder(FLAGS.output, FLAGS.push_to_hub, token=FLAGS.token, private=FLAGS.private)}")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
