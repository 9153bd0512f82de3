"""Evaluation metrics of text-to-image models: FID (Inception pool3) and CLIP score; prompt sets.

The metrics know nothing of sampling: they take uint8 images [B, H, W, 3] and prompts.

* `inception`: the FID InceptionV3 (pytorch-fid's network) in Flax; `InceptionFeatures`
  turns images into pool3 features, mode "pytorch_fid" (default) or "clean" (clean-fid).
* `convert_inception`: `python -m lcm_jax.eval.convert_inception --input <.pth> --output
  <.safetensors>`, the one-time conversion of pytorch-fid's weights (needs torch), and
  `fetch_inception_weights(cache_dir)`, which downloads and converts them when online.
  (Not imported here, so that `python -m` runs it cleanly.)
* `fid`: float64 streaming statistics, the Frechet distance, `.npz` reference statistics.
* `clip_score`: CLIP score with a transformers-layout CLIPModel (ViT-g/14 in the paper).
* `prompts`: COCO-2014 captions, PartiPrompts, text files; deterministic samples by seed.
"""

from lcm_jax.eval.clip_score import ClipScores, CLIPPreprocess, CLIPScorer, load_clip, mean_clip_score, pair_scores
from lcm_jax.eval.fid import (
  FeatureStats,
  feature_statistics,
  frechet_distance,
  load_statistics,
  reference_statistics,
  save_statistics,
)
from lcm_jax.eval.inception import InceptionFeatures, load_inception
from lcm_jax.eval.prompts import PromptSet, load_prompt_set

__all__ = [
    "CLIPPreprocess", "CLIPScorer", "ClipScores", "FeatureStats", "InceptionFeatures", "PromptSet",
    "feature_statistics", "frechet_distance", "load_clip",
    "load_inception", "load_prompt_set", "load_statistics", "mean_clip_score", "pair_scores", "reference_statistics",
    "save_statistics",
]
