"""Frechet Inception Distance: feature statistics, the distance, cached reference statistics.

FID(1, 2) = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))      (Heusel et al., 2017)

* Statistics are float64 on the host and streamed over batches (`FeatureStats`, Chan's
  pairwise merge of mean and scatter), so 30K x 2048 features never sit in memory at once;
  `sigma` is the unbiased covariance (ddof 1), as pytorch-fid's `np.cov(rowvar=False)`.
* tr((S1 S2)^(1/2)) is the sum of the square roots of the eigenvalues of the symmetric PSD
  matrix S1^(1/2) S2 S1^(1/2), which has the eigenvalues of S1 S2; two `eigh` calls instead
  of scipy's general `sqrtm` of the non-symmetric product (whose `disp=` argument is
  deprecated, which is several times slower, and which goes complex on singular covariances).
* Reference statistics are `.npz` files with `mu` and `sigma` (pytorch-fid's layout, so its
  precomputed files load) plus `num_images` and `mode`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable

import numpy as np

from lcm_jax.errors import LcmJaxError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


@dataclasses.dataclass
class FeatureStats:
  """Running float64 mean and scatter of [N, D] features, updated batch by batch."""
  count: int = 0
  mean: np.ndarray | None = None      # [D]
  scatter: np.ndarray | None = None   # [D, D], sum of (x - mean)(x - mean)^T

  def update(self, features: np.ndarray) -> "FeatureStats":
    """Adds a batch [B, D]; returns self."""
    x = np.asarray(features, np.float64)
    if x.ndim != 2:
      raise ValueError(f"features must be [B, D], got shape {x.shape}")
    if not len(x):
      return self
    if self.mean is not None and x.shape[1] != self.mean.shape[0]:
      raise ValueError(f"features of width {x.shape[1]} added to statistics of width {self.mean.shape[0]}")
    batch_mean = x.mean(axis=0)
    centred = x - batch_mean
    batch_scatter = centred.T @ centred
    if self.mean is None:
      self.count, self.mean, self.scatter = len(x), batch_mean, batch_scatter
      return self
    # Chan et al.'s merge: exact in exact arithmetic, no large cancelling sums in floating point.
    n_a, n_b = self.count, len(x)
    n = n_a + n_b
    delta = batch_mean - self.mean
    self.mean = self.mean + delta * (n_b / n)
    self.scatter = self.scatter + batch_scatter + np.outer(delta, delta) * (n_a * n_b / n)
    self.count = n
    return self

  @property
  def sigma(self) -> np.ndarray:
    """The unbiased covariance [D, D] (needs at least two samples)."""
    if self.count < 2:
      raise LcmJaxError(f"FID needs at least 2 images for a covariance, got {self.count}")
    return self.scatter / (self.count - 1)

  @property
  def mu(self) -> np.ndarray:
    if self.mean is None:
      raise LcmJaxError("FID statistics of no images")
    return self.mean


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """[N, D] features -> (mu [D], sigma [D, D]) in float64."""
  stats = FeatureStats().update(features)
  return stats.mu, stats.sigma


def _sqrt_psd(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(symmetric square root, eigenvalues clipped at 0) of a symmetric PSD matrix."""
  w, v = np.linalg.eigh(0.5 * (matrix + matrix.T))
  w = np.clip(w, 0.0, None)  # rounding leaves tiny negative eigenvalues on singular matrices
  return (v * np.sqrt(w)) @ v.T, w


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
  """The Frechet distance between N(mu1, sigma1) and N(mu2, sigma2); float64 throughout.

  mu: [D]; sigma: [D, D] symmetric PSD (singular is fine: no epsilon is added).
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
    raise ValueError(f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
  root1, _ = _sqrt_psd(sigma1)
  inner = root1 @ sigma2 @ root1
  # Only the eigenvalues of the second matrix are needed (eigvalsh: no eigenvectors, no product).
  eigenvalues = np.clip(np.linalg.eigvalsh(0.5 * (inner + inner.T)), 0.0, None)
  trace_sqrt = float(np.sum(np.sqrt(eigenvalues)))
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)


def fid_from_stats(a: FeatureStats | tuple, b: FeatureStats | tuple) -> float:
  """FID between two `FeatureStats` or (mu, sigma) pairs."""
  unpack = lambda s: (s.mu, s.sigma) if isinstance(s, FeatureStats) else s
  return frechet_distance(*unpack(a), *unpack(b))


# ---------------------------------------------------------------------------------------
# Reference statistics


def save_statistics(path: str, stats: FeatureStats, *, mode: str, **metadata) -> None:
  """Writes `mu`, `sigma` (float64), `num_images`, `mode` and any string metadata to `path`."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  extra = {k: np.asarray(str(v)) for k, v in metadata.items()}
  tmp = path + ".tmp.npz"
  np.savez(tmp, mu=stats.mu, sigma=stats.sigma, num_images=np.asarray(stats.count),
           mode=np.asarray(mode), **extra)
  os.replace(tmp, path)


def load_statistics(path: str, *, mode: str | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
  """(mu, sigma, metadata) from a `.npz` (ours or pytorch-fid's, which has only mu and sigma).

  Raises:
    LcmJaxError if the file is unreadable, lacks mu/sigma, or was made in another FID mode.
  """
  try:
    with np.load(path) as f:
      data = {k: f[k] for k in f.files}
  except (OSError, ValueError) as e:
    raise LcmJaxError(f"cannot read FID statistics {path}: {e}") from None
  if "mu" not in data or "sigma" not in data:
    raise LcmJaxError(f"{path} has no 'mu' and 'sigma' arrays; it is not an FID statistics file")
  meta = {k: v.item() for k, v in data.items() if k not in ("mu", "sigma")}
  stored = meta.get("mode")
  if mode is not None and stored is not None and stored != mode:
    raise LcmJaxError(f"{path} holds FID statistics of mode {stored!r}, not {mode!r}; "
                      "FIDs of different modes are not comparable")
  return data["mu"].astype(np.float64), data["sigma"].astype(np.float64), meta


def list_images(folder: str) -> list[str]:
  """Image files directly in `folder` and below, sorted (a deterministic order)."""
  if not os.path.isdir(folder):
    raise LcmJaxError(f"reference image folder {folder} does not exist")
  found = []
  for root, _, files in os.walk(folder):
    found += [os.path.join(root, f) for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
  if not found:
    raise LcmJaxError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {folder}")
  return sorted(found)


def read_rgb(path: str) -> np.ndarray:
  """[H, W, 3] uint8, as pytorch-fid reads a file (`Image.open(path).convert("RGB")`)."""
  from PIL import Image
  try:
    with Image.open(path) as im:
      return np.asarray(im.convert("RGB"))
  except OSError as e:
    raise LcmJaxError(f"cannot read image {path}: {e}") from None


def statistics_of_images(images: Iterable[np.ndarray], features: Callable[[list[np.ndarray]], np.ndarray],
                         *, chunk: int = 500) -> FeatureStats:
  """Streams images ([H, W, 3] uint8, any sizes) through `features` (e.g.
  `InceptionFeatures.of_images`) in chunks; returns their statistics."""
  stats, pending = FeatureStats(), []
  for image in images:
    pending.append(image)
    if len(pending) == chunk:
      stats.update(features(pending))
      pending = []
  if pending:
    stats.update(features(pending))
  return stats


def reference_statistics(source: str, features, *, mode: str, cache: str | None = None,
                         limit: int | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
  """(mu, sigma, metadata) of a reference: a `.npz` file, or a folder of images.

  A folder's statistics are written to `cache` (if given) and read from there next time.
  features: a callable list of images -> [N, 2048] (`InceptionFeatures(...).of_images`).
  limit: use only the first `limit` images of the sorted folder listing.
  """
  if source.endswith(".npz"):
    return load_statistics(source, mode=mode)
  recipe = {"source": os.path.abspath(source), "limit": str(limit)}
  if cache and os.path.exists(cache):
    mu, sigma, meta = load_statistics(cache, mode=mode)
    stale = {k: meta.get(k) for k in recipe if meta.get(k) != recipe[k]}
    if stale:
      raise LcmJaxError(f"{cache} holds statistics of {stale}, not of {recipe}; delete it or pass another cache")
    return mu, sigma, meta
  paths = list_images(source)[:limit]
  stats = statistics_of_images((read_rgb(p) for p in paths), features)
  if cache:
    save_statistics(cache, stats, mode=mode, **recipe)
  return stats.mu, stats.sigma, {"num_images": stats.count, "mode": mode, **recipe}
