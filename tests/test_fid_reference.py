"""The JAX port against pytorch-fid's own outputs on real CIFAR-10 photos.

Reference vectors: ../shared/fid/pytorch-fid-reference-cifar10-train.npz (see
shared/README.md). The network runs only on the 64 `images_a` (one compile,
batch 32); the 1000-image statistics and FID start from pytorch-fid's
activations, since running XLA over 2000 images on a small CPU takes minutes.
"""

import os

import chex
import numpy as np
import pytest

from cifarjax import fid

BATCH_SIZE = 32
# Measured (64 images, batch 32, CPU): max |diff| 1.7e-5 on features up to 8.6,
# at most 4.8e-5 relative where |feature| > 0.1, per-image relative L2 error
# <= 5.1e-6: float32 rounding (pytorch-fid's own batching moves features by up
# to 2e-5).
FEATURE_RTOL = 1e-4
FEATURE_ATOL = 5e-5
FEATURE_REL_L2 = 2e-5
# Measured: mu and sigma from pytorch-fid's activations are bit-identical; FID
# by sqrtm equals fid_12 exactly, by eigh within 2.8e-7 relative.
FID_RTOL = 1e-6


@pytest.fixture(scope="module")
def reference(fid_reference_path):
  with np.load(fid_reference_path) as npz:
    return {k: npz[k] for k in npz.files}


@pytest.fixture(scope="module")
def features_a(fid_weights_path, reference):
  variables = fid.load_inception_params(fid_weights_path)
  return fid.extract_features(reference["images_a"], variables, batch_size=BATCH_SIZE,
                              progress=False)


def test_features_match_pytorch_fid(features_a, reference):
  want = reference["features_a"]
  chex.assert_shape(features_a, (64, 2048))
  assert features_a.dtype == np.float32
  np.testing.assert_allclose(features_a, want, rtol=FEATURE_RTOL, atol=FEATURE_ATOL)
  rel = np.linalg.norm(features_a - want, axis=1) / np.linalg.norm(want, axis=1)
  assert rel.max() < FEATURE_REL_L2, rel.max()


def test_statistics_match_pytorch_fid(reference):
  for acts, mu_key in (("acts_set1", "mu1"), ("acts_set2", "mu2")):
    mu, sigma = fid.activation_statistics(reference[acts])
    np.testing.assert_allclose(mu, reference[mu_key], rtol=1e-12, atol=1e-12)
    # shared/README.md: this is exactly how pytorch-fid's sigma is rebuilt.
    want_sigma = np.cov(reference[acts].astype(np.float64), rowvar=False)
    np.testing.assert_allclose(sigma, want_sigma, rtol=1e-12, atol=1e-12)


def _fid_12(reference, method):
  mu1, sigma1 = fid.activation_statistics(reference["acts_set1"])
  mu2, sigma2 = fid.activation_statistics(reference["acts_set2"])
  return fid.frechet_distance(mu1, sigma1, mu2, sigma2, method=method)


def test_fid_matches_pytorch_fid(reference):
  np.testing.assert_allclose(_fid_12(reference, "eigh"), float(reference["fid_12"]), rtol=FID_RTOL)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("CIFARJAX_FID_SLOW_TESTS"),
                    reason="scipy sqrtm of a 2048x2048 product takes ~60 s on 2 cores; "
                           "set CIFARJAX_FID_SLOW_TESTS=1")
def test_fid_sqrtm_matches_pytorch_fid(reference):
  np.testing.assert_allclose(_fid_12(reference, "sqrtm"), float(reference["fid_12"]), rtol=1e-9)

