"""FID computed from the features themselves, independently of cifarjax.fid.stats.

For features A (n1 x d) and B (n2 x d) with means m1, m2, let Xa = (A - m1) / sqrt(n1 - 1) and
Xb = (B - m2) / sqrt(n2 - 1), so that the covariances are S1 = Xa^T Xa and S2 = Xb^T Xb. The
nonzero eigenvalues of S1 S2 = Xa^T (Xa Xb^T) Xb are those of (Xa Xb^T)(Xa Xb^T)^T, the squared
singular values of M = Xa Xb^T (n1 x n2). So Tr sqrt(S1 S2) is M's nuclear norm, and

  FID = |m1 - m2|^2 + |Xa|_F^2 + |Xb|_F^2 - 2 sum(svd(M)),

exact for any n, and cheap where n is small: no d x d matrix function at all.
"""

import numpy as np


def fid_from_features(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  m1, m2 = a.mean(axis=0), b.mean(axis=0)
  xa = (a - m1) / np.sqrt(len(a) - 1)
  xb = (b - m2) / np.sqrt(len(b) - 1)
  nuclear = np.linalg.svd(xa @ xb.T, compute_uv=False).sum()
  return float(((m1 - m2) ** 2).sum() + (xa**2).sum() + (xb**2).sum() - 2 * nuclear)


def covariance(acts) -> np.ndarray:
  """The unbiased covariance (N - 1 in the denominator) from centred products, float64."""
  x = np.asarray(acts, np.float64)
  x = x - x.mean(axis=0)
  return (x.T @ x) / (len(x) - 1)
