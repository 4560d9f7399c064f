"""Gaussian statistics of features and the Fréchet distance, as pytorch-fid computes them."""

import warnings

import numpy as np
from scipy import linalg

from cifarjax.errors import Notice, UserError, note

# pytorch-fid's tolerance on the diagonal of sqrtm's imaginary part.
IMAGINARY_ATOL = 1e-3


def activation_statistics(acts):
  """(mu, sigma) in float64: the mean and the covariance (rowvar=False) of (N, D) features.

  Warns (`errors.Notice`) where N < D: the covariance of fewer images than feature
  dimensions is singular, and the FID it gives is far above the FID of many images.
  """
  acts = np.asarray(acts, np.float64)
  if acts.ndim != 2 or len(acts) < 2:
    raise UserError(f"FID needs the features of at least 2 images, got shape {acts.shape}")
  n, d = acts.shape
  if n < d:
    warnings.warn(Notice(
        f"FID statistics from {n:,} images, fewer than the {d:,} feature dimensions: the "
        f"covariance is singular and the FID is biased high, comparable only with FIDs of "
        f"as many images; use at least {d:,} (the paper: 10,000)"), stacklevel=2)
  return np.mean(acts, axis=0), np.cov(acts, rowvar=False)


def _sqrtm(a):
  with warnings.catch_warnings():
    # scipy warns when the product is singular; the finiteness check below handles it.
    warnings.simplefilter("ignore", RuntimeWarning)
    warnings.simplefilter("ignore", linalg.LinAlgWarning)
    return linalg.sqrtm(a)


def _trace_sqrt_product_eigh(sigma1, sigma2):
  """Tr sqrt(sigma1 sigma2) = sum sqrt(eig(s1^1/2 sigma2 s1^1/2)): symmetric, so eigh."""
  w, v = np.linalg.eigh(sigma1)
  root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
  lam = np.linalg.eigvalsh(root1 @ sigma2 @ root1)
  return float(np.sqrt(np.clip(lam, 0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6, method: str = "sqrtm") -> float:
  """||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2)).

  method="sqrtm" (default) is pytorch-fid's `calculate_frechet_distance`:
  sqrt(sigma1 sigma2) by scipy.linalg.sqrtm; where that is not finite (a
  singular product), eps is added to both diagonals and it is taken again; a
  complex result is accepted, and its real part used, only when the imaginary
  part of its diagonal is within 1e-3 of 0. For 2048-d statistics the Schur
  decomposition inside takes tens of seconds on a small CPU.
  method="eigh" takes the same trace from two symmetric eigendecompositions,
  several times faster; on real 2048-d statistics it lands within ~3e-7
  relative of the sqrtm value.
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape:
    raise ValueError(f"mean vectors differ in shape: {mu1.shape} vs {mu2.shape}")
  if sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
    raise ValueError(
        f"covariances must both be {mu1.shape * 2}, got {sigma1.shape} and {sigma2.shape}")

  diff = mu1 - mu2
  if mu1.size >= 512:
    note(f"Fréchet distance of {mu1.size}-d statistics ({method}"
         + ("; about a minute on a CPU)" if method == "sqrtm" else ")"))
  if method == "eigh":
    tr_covmean = _trace_sqrt_product_eigh(sigma1, sigma2)
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)
  if method != "sqrtm":
    raise ValueError(f"method must be 'sqrtm' or 'eigh', got {method!r}")
  covmean = _sqrtm(sigma1.dot(sigma2))
  if not np.isfinite(covmean).all():
    warnings.warn(f"fid calculation produces singular product; adding {eps} to diagonal of cov "
                  "estimates", RuntimeWarning)
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = _sqrtm((sigma1 + offset).dot(sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=IMAGINARY_ATOL):
      m = np.max(np.abs(covmean.imag))
      raise ValueError(f"Fréchet distance: sqrtm has an imaginary component {m}")
    covmean = covmean.real
  return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))
