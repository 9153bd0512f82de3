"""The toy reproduction: a demo that uses the library (the library never imports it).

A procedurally generated text-to-image domain (captioned 32x32 coloured shapes), a tiny
Stable Diffusion teacher trained on it and shipped with its weights, and metrics that read
the images back, so that the paper's claims can be checked on a CPU in minutes. See
lcm_jax/toy/README.md.

* `domain`: the captioned images (`python -m lcm_jax.toy.domain` writes training folders).
* `vocabulary`: a CLIP tokenizer whose tokens are the domain's words.
* `teacher`: builds the toy SD from scratch (`python -m lcm_jax.toy.teacher`).
* `metrics`: the attribute classifier, its FID and the text-alignment score.
* `demo`: `make demo` (`python -m lcm_jax.toy.demo`); `evaluate`: the toy Table 1.
* `weights/teacher`, `weights/metric`: the shipped teacher pipeline and attribute network.
"""

import os

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
TEACHER_DIR = os.path.join(WEIGHTS_DIR, "teacher")
METRIC_DIR = os.path.join(WEIGHTS_DIR, "metric")


def display_path(path: str) -> str:
  """`path` relative to the working directory when it lies below it (for printed commands)."""
  rel = os.path.relpath(path)
  return path if rel.startswith("..") else rel
