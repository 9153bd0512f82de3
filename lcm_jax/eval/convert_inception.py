"""Converts pytorch-fid's Inception weights (a torch pickle) to safetensors, once.

    python -m lcm_jax.eval.convert_inception \
        --input pt_inception-2015-12-05-6726825d.pth --output inception.safetensors

The pickle is read with `torch.load(weights_only=True)`, which refuses anything but tensors
and plain containers (never an unrestricted pickle). The output keeps torch's names and
layout (`Mixed_5b.branch1x1.conv.weight`, `...bn.running_var`); `lcm_jax.eval.inception.
load_inception` reads it without torch. The classifier (`fc.*`) and BatchNorm's
`num_batches_tracked` counters are left out: pool3 features do not use them. Needs torch.

`fetch_inception_weights(cache_dir)` downloads pytorch-fid's file and converts it, when online.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
from absl import flags

from lcm_jax import cli
from lcm_jax.errors import LcmJaxError
from lcm_jax.eval.inception import torch_state_to_params
from lcm_jax.safetensors_io import write_safetensors

FLAGS = flags.FLAGS


def read_torch_state_dict(path: str) -> dict[str, np.ndarray]:
  """A `.pth` state dict -> name -> float32 NumPy array, through torch's safe loader."""
  try:
    import torch
  except ImportError:
    raise LcmJaxError("converting a .pth needs PyTorch once (pip install torch); the converted "
                      "safetensors file is then read without it") from None
  if not os.path.exists(path):
    raise LcmJaxError(f"{path} does not exist")
  try:
    state = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises UnpicklingError, RuntimeError, ... for bad files
    raise LcmJaxError(f"cannot read {path} as a PyTorch state dict ({type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''})") from None
  if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
    raise LcmJaxError(f"{path} is not a state dict (name -> tensor)")
  return {k: v.detach().to(torch.float32).numpy() for k, v in state.items()
          if v.is_floating_point()}  # drops the integer num_batches_tracked counters


def convert(input_path: str, output_path: str) -> dict[str, np.ndarray]:
  """Reads `input_path`, checks it against the Flax network, writes `output_path`.

  Returns the tensors written. Raises WeightsError (listing keys) if it is not the FID
  Inception's state dict.
  """
  tensors = {k: v for k, v in read_torch_state_dict(input_path).items() if not k.startswith("fc.")}
  torch_state_to_params(tensors)  # every key and shape must match the network
  with open(input_path, "rb") as f:
    digest = hashlib.sha256(f.read()).hexdigest()
  out_dir = os.path.dirname(os.path.abspath(output_path))
  os.makedirs(out_dir, exist_ok=True)
  write_safetensors(output_path, tensors, metadata={
      "format": "pt", "source": os.path.basename(input_path), "source_sha256": digest,
      "network": "pytorch-fid InceptionV3 (FID variant), pool3"})
  return tensors


# ---------------------------------------------------------------------------------------
# Download (when online)

FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   + FID_WEIGHTS_FILE)
# torch.hub's convention: the file name carries the first hex digits of its SHA-256.
FID_WEIGHTS_SHA256_PREFIX = "6726825d"


def fetch_inception_weights(cache_dir: str, url: str = FID_WEIGHTS_URL, timeout: float = 60.0) -> str:
  """Path of `inception.safetensors` in `cache_dir`, downloading and converting it if needed.

  Needs network access once, and torch for the one-time conversion of pytorch-fid's pickle.

  Raises:
    LcmJaxError with one message saying what to do when the download or the conversion fails.
  """
  import urllib.request
  target = os.path.join(cache_dir, "inception.safetensors")
  if os.path.exists(target):
    return target
  os.makedirs(cache_dir, exist_ok=True)
  pth = os.path.join(cache_dir, FID_WEIGHTS_FILE)
  offline_help = (f"Download {url} on a machine with network access, then convert it once: python -m "
                  f"lcm_jax.eval.convert_inception --input {FID_WEIGHTS_FILE} --output {target}")
  if not os.path.exists(pth):
    try:
      with urllib.request.urlopen(url, timeout=timeout) as response, open(pth + ".part", "wb") as f:
        f.write(response.read())
    except OSError as e:
      raise LcmJaxError(f"could not download the FID Inception weights ({type(e).__name__}: {e}). "
                        + offline_help) from None
    os.replace(pth + ".part", pth)
  with open(pth, "rb") as f:
    digest = hashlib.sha256(f.read()).hexdigest()
  if not digest.startswith(FID_WEIGHTS_SHA256_PREFIX):
    raise LcmJaxError(f"{pth} has SHA-256 {digest[:16]}..., not pytorch-fid's {FID_WEIGHTS_SHA256_PREFIX}...; "
                      "delete it and retry")
  convert(pth, target)
  return target


def _define_flags() -> None:
  """Defined when run as a program only (importing this module defines no flags)."""
  flags.DEFINE_string("input", None, "pytorch-fid's weights, pt_inception-2015-12-05-6726825d.pth.")
  flags.DEFINE_string("output", None, "The safetensors file to write.")
  flags.mark_flags_as_required(["input", "output"])


def main(argv) -> None:
  del argv
  tensors = convert(FLAGS.input, FLAGS.output)
  print(f"[convert_inception] wrote {FLAGS.output}: {len(tensors)} tensors, "
        f"{sum(v.size for v in tensors.values()) / 1e6:.1f}M values")


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
