"""The toy text-to-image domain, its tiny Stable Diffusion teacher and its metrics (issue 6).

* `domain`: procedurally generated captioned 32x32 images (coloured shapes).
* `vocabulary`: a CLIP tokenizer whose tokens are the domain's words.
* `teacher`: builds the toy SD from scratch (`python -m lcm_jax.toy.teacher`).
* `metrics`: the attribute classifier, its FID and the text-alignment score.
"""
