r"""Sample-quality metrics: FID, KID, precision / recall, mode-mixture ratio, memorization.

* Fréchet distance between Gaussians fitted to features (Heusel et al. 2017):

      FID = ‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2 (Σ₁ Σ₂)^{1/2}),

  computed like pytorch-fid (scipy `sqrtm`, a small diagonal offset if the product is singular,
  the imaginary part dropped when it is numerical noise). Features come from Inception-v3 pool3
  (`models.inception`) or, for digits, from the classifier's penultimate layer
  (`classifier.features`).
* Kernel distance KID (Bińkowski et al. 2018), unbiased at small n (`kid_from_features`).
  Every stochastic figure is reported as mean ± std over independent draws (`mean_std`);
  `compare` calls A better than B only when those intervals do not overlap.
* Improved precision and recall (Kynkäänniemi et al. 2019): the real manifold is the union of
  balls B(φ_r, ‖φ_r − NN_k(φ_r)‖) around real features with radius the distance to the k-th
  nearest other real feature (k = 3); precision is the share of fake features inside the real
  manifold, recall the share of real features inside the fake manifold.
* Mode-mixture ratio of DPM-OT (arXiv 2307.11308, Sec. 4.3): a sample is mixed when ≥ 2 classes
  get softmax probability ≥ λ (default λ = 0.11); MMR is the share of mixed samples.
* Memorization, in pixel space: a sample is a copy when its nearest target is ≥ 3× closer than
  the second nearest (d₁ · 3 ≤ d₂), and the median nearest-target distance of the samples is
  compared with that of held-out real images (ratio ≪ 1: samples sit closer to the targets
  than fresh data does).

Nearest-neighbour searches run blockwise on the device (jit), so sets of 50k × 3072 fit: only a
(block, block) distance tile exists at a time. Hand-written because no installed library does
a blocked k-NN in JAX.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import numpy as np
import scipy.linalg

import jax
import jax.numpy as jnp

Array = jax.Array


# --------------------------------------------------------------------------------------
# Fréchet distance.


def feature_statistics(features: Any) -> tuple[np.ndarray, np.ndarray]:
  """(μ, Σ) of features (n, d) in float64; Σ is the unbiased sample covariance (as pytorch-fid)."""
  f = np.asarray(features, np.float64).reshape(len(features), -1)
  if f.shape[0] < 2:
    raise ValueError(f"Feature statistics need at least 2 samples, got {f.shape[0]}.")
  return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any, eps: float = 1e-6) -> float:
  """‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2 (Σ₁ Σ₂)^{1/2}) with scipy's `sqrtm`.

  If (Σ₁Σ₂)^{1/2} is not finite (singular product), eps·I is added to both covariances, as in
  pytorch-fid. A complex square root with imaginary diagonal above 1e-3 raises ValueError.
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
    raise ValueError(f"Mismatched statistics: {mu1.shape} vs {mu2.shape}, "
                     f"{sigma1.shape} vs {sigma2.shape}.")
  diff = mu1 - mu2
  covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
  if not np.isfinite(covmean).all():
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(f"Fréchet distance: imaginary component {np.max(np.abs(covmean.imag))}.")
    covmean = covmean.real
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def fid_from_features(features1: Any, features2: Any) -> float:
  """Fréchet distance between Gaussians fitted to two feature sets (n_i, d)."""
  return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))


# --------------------------------------------------------------------------------------
# Kernel inception distance.


def kid_from_features(features1: Any, features2: Any, degree: int = 3,
                      coef0: float = 1.0, scale: float = 1.0) -> float:
  r"""Kernel (inception) distance (Bińkowski et al. 2018): the unbiased estimate of MMD²
  with the polynomial kernel k(x, y) = (xᵀy / (d s²) + c)^3, c = coef0, d = feature dimension,
  s = scale (1: the standard KID of Inception pool3 features, whose xᵀy/d is O(1); features of
  another scale, e.g. a small classifier's, pass their RMS so the kernel stays cubic in an O(1)
  argument instead of being dominated by a few large products),

      KID = 1/(m(m−1)) Σ_{i≠j} k(x_i, x_j) + 1/(n(n−1)) Σ_{i≠j} k(y_i, y_j)
            − 2/(mn) Σ_{i,j} k(x_i, y_j),

  over all m × n features (no subsets). Unbiased at every m, n ≥ 2 (its mean over draws is
  the population MMD², ≥ 0, though one estimate can be negative), unlike FID, whose bias
  grows as the sample shrinks: the number to compare across sample sizes.
  """
  x = np.asarray(features1, np.float64).reshape(len(features1), -1)
  y = np.asarray(features2, np.float64).reshape(len(features2), -1)
  m, n = len(x), len(y)
  if m < 2 or n < 2 or x.shape[1] != y.shape[1]:
    raise ValueError(f"KID needs two feature sets of ≥ 2 rows and equal width, got "
                     f"{x.shape} and {y.shape}.")
  d = x.shape[1] * float(scale) ** 2
  k_xx = (x @ x.T / d + coef0) ** degree
  k_yy = (y @ y.T / d + coef0) ** degree
  k_xy = (x @ y.T / d + coef0) ** degree
  return float((k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
               + (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1)) - 2.0 * k_xy.mean())


# --------------------------------------------------------------------------------------
# Spread over independent draws.


def mean_std(values: Sequence[float]) -> tuple[float, float]:
  """(mean, sample standard deviation, ddof 1) of a metric over independent draws; the std
  is nan for a single draw."""
  v = np.asarray(values, np.float64)
  return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else float("nan")


def compare(a: tuple[float, float], b: tuple[float, float], lower_is_better: bool = True) -> int:
  """+1 when A beats B, −1 when B beats A, 0 when they are tied, for two (mean, std)
  summaries: A beats B only when the intervals mean ± std do not overlap (and A's lies on the
  better side). A nan std counts as 0."""
  (ma, sa), (mb, sb) = a, b
  sa, sb = (0.0 if np.isnan(s) else s for s in (sa, sb))
  if ma + sa < mb - sb:
    return 1 if lower_is_better else -1
  if mb + sb < ma - sa:
    return -1 if lower_is_better else 1
  return 0


# --------------------------------------------------------------------------------------
# Blocked nearest neighbours.


def _pad_rows(x: np.ndarray, multiple: int) -> np.ndarray:
  pad = (-len(x)) % multiple
  return np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)]) if pad else x


def _sq_dist(a: Array, b: Array) -> Array:
  """‖a_i − b_j‖² via norms and one matmul, clipped at 0 (rounding)."""
  d = (jnp.sum(a * a, axis=1)[:, None] + jnp.sum(b * b, axis=1)[None, :] - 2.0 * (a @ b.T))
  return jnp.maximum(d, 0.0)


@functools.partial(jax.jit, static_argnames=("k", "n_ref"))
def _smallest_k_block(queries: Array, refs_blocks: Array, k: int, n_ref: int) -> Array:
  """The k smallest squared distances from each query to the (n_ref valid) reference rows.

  refs_blocks: (num_blocks, block, d); rows beyond n_ref are padding and ignored.
  """
  block = refs_blocks.shape[1]
  init = jnp.full((queries.shape[0], k), jnp.inf, queries.dtype)

  def body(best, inputs):
    i, refs = inputs
    d = _sq_dist(queries, refs)
    valid = (i * block + jnp.arange(block)) < n_ref
    d = jnp.where(valid[None, :], d, jnp.inf)
    merged = jnp.concatenate([best, d], axis=1)
    return -jax.lax.top_k(-merged, k)[0], None

  best, _ = jax.lax.scan(body, init, (jnp.arange(refs_blocks.shape[0]), refs_blocks))
  return best


def smallest_sq_distances(queries: Any, refs: Any, k: int, block_size: int = 1024,
                          dtype=np.float32) -> np.ndarray:
  """(n_q, k) ascending k smallest squared Euclidean distances from each query row to `refs`.

  Rows are flattened; both sets are processed in blocks of `block_size` rows, so memory is
  O(block_size² + block_size · d) on the device besides the reference set itself.
  """
  q = np.asarray(queries, dtype).reshape(len(queries), -1)
  r = np.asarray(refs, dtype).reshape(len(refs), -1)
  if len(r) < k:
    raise ValueError(f"Need at least k={k} reference points, got {len(r)}.")
  block = min(block_size, max(len(r), 1))
  r_blocks = jnp.asarray(_pad_rows(r, block).reshape(-1, block, r.shape[1]))
  qblock = min(block_size, len(q))
  out = []
  for start in range(0, len(q), qblock):
    chunk = q[start:start + qblock]
    n_valid = len(chunk)
    chunk = _pad_rows(chunk, qblock)
    out.append(np.asarray(_smallest_k_block(jnp.asarray(chunk), r_blocks, k, len(r)))[:n_valid])
  return np.concatenate(out, axis=0)


@functools.partial(jax.jit, static_argnames=("n_ref",))
def _inside_any_ball_block(queries: Array, centers_blocks: Array, radii_blocks: Array,
                           n_ref: int) -> Array:
  block = centers_blocks.shape[1]

  def body(inside, inputs):
    i, centers, radii = inputs
    valid = (i * block + jnp.arange(block)) < n_ref
    hit = (_sq_dist(queries, centers) <= radii[None, :]) & valid[None, :]
    return inside | jnp.any(hit, axis=1), None

  init = jnp.zeros((queries.shape[0],), bool)
  inside, _ = jax.lax.scan(body, init, (jnp.arange(centers_blocks.shape[0]), centers_blocks,
                                        radii_blocks))
  return inside


def _manifold_coverage(queries: np.ndarray, centers: np.ndarray, sq_radii: np.ndarray,
                       block_size: int) -> float:
  """Share of queries with ‖q − c_i‖² ≤ r_i² for some i."""
  block = min(block_size, len(centers))
  c_blocks = jnp.asarray(_pad_rows(centers, block).reshape(-1, block, centers.shape[1]))
  r_blocks = jnp.asarray(_pad_rows(sq_radii, block).reshape(-1, block))
  qblock = min(block_size, len(queries))
  inside = []
  for start in range(0, len(queries), qblock):
    chunk = queries[start:start + qblock]
    n_valid = len(chunk)
    hit = _inside_any_ball_block(jnp.asarray(_pad_rows(chunk, qblock)), c_blocks, r_blocks,
                                 len(centers))
    inside.append(np.asarray(hit)[:n_valid])
  return float(np.mean(np.concatenate(inside)))


def precision_recall(real_features: Any, fake_features: Any, k: int = 3,
                     block_size: int = 1024) -> dict[str, float]:
  """Improved precision and recall (Kynkäänniemi et al. 2019) with k-NN manifolds.

  r_k(φ) = distance from φ to its k-th nearest neighbour in its own set (itself excluded);
  precision = mean over fake φ_g of 1[∃ real φ_r: ‖φ_g − φ_r‖ ≤ r_k(φ_r)],
  recall    = mean over real φ_r of 1[∃ fake φ_g: ‖φ_r − φ_g‖ ≤ r_k(φ_g)].
  """
  real = np.asarray(real_features, np.float32).reshape(len(real_features), -1)
  fake = np.asarray(fake_features, np.float32).reshape(len(fake_features), -1)
  if len(real) <= k or len(fake) <= k:
    raise ValueError(f"precision_recall needs more than k={k} points per set, "
                     f"got {len(real)} real and {len(fake)} fake.")
  # k+1 smallest include the point itself at distance 0.
  real_radii = smallest_sq_distances(real, real, k + 1, block_size)[:, k]
  fake_radii = smallest_sq_distances(fake, fake, k + 1, block_size)[:, k]
  return {
      "precision": _manifold_coverage(fake, real, real_radii, block_size),
      "recall": _manifold_coverage(real, fake, fake_radii, block_size),
  }


# --------------------------------------------------------------------------------------
# Classifier-based metrics.


def mode_mixture_ratio(probs: Any, lam: float = 0.11) -> float:
  """MMR = share of samples with at least 2 classes of softmax probability ≥ λ (DPM-OT)."""
  p = np.asarray(probs)
  return float(np.mean(np.sum(p >= lam, axis=-1) >= 2))


def mmr_sweep(probs: Any, lams: Sequence[float] = (0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4)
              ) -> list[float]:
  """[MMR(λ) for λ in lams]: the λ sweep the DPM-OT paper reports."""
  return [mode_mixture_ratio(probs, lam) for lam in lams]


def recognized_fraction(probs: Any, threshold: float = 0.5) -> float:
  """Share of samples whose top class probability is ≥ `threshold`."""
  return float(np.mean(np.max(np.asarray(probs), axis=-1) >= threshold))


# --------------------------------------------------------------------------------------
# Memorization.


def memorization(samples: Any, targets: Any, heldout: Any, copy_ratio: float = 3.0,
                 block_size: int = 1024) -> dict[str, float]:
  """Do the samples copy the targets? Pixel-space nearest-target distances.

  With d₁ ≤ d₂ the distances from a point to its nearest and second-nearest target:
    'copy_fraction': share of samples with copy_ratio · d₁ ≤ d₂ (nearest target ≥ 3× closer);
    'heldout_copy_fraction': the same for held-out real images (what fresh data shows);
    'nn_distance_ratio': median d₁ of samples / median d₁ of held-out images;
    'median_nn_distance', 'heldout_median_nn_distance': the two medians.
  `heldout` must not be part of `targets` (it is the reference for "new" data).
  """
  d_samples = np.sqrt(smallest_sq_distances(samples, targets, 2, block_size).astype(np.float64))
  d_heldout = np.sqrt(smallest_sq_distances(heldout, targets, 2, block_size).astype(np.float64))
  med_samples = float(np.median(d_samples[:, 0]))
  med_heldout = float(np.median(d_heldout[:, 0]))
  return {
      "copy_fraction": float(np.mean(copy_ratio * d_samples[:, 0] <= d_samples[:, 1])),
      "heldout_copy_fraction": float(np.mean(copy_ratio * d_heldout[:, 0] <= d_heldout[:, 1])),
      "nn_distance_ratio": med_samples / med_heldout if med_heldout > 0 else float("inf"),
      "median_nn_distance": med_samples,
      "heldout_median_nn_distance": med_heldout,
  }
