"""Batching, sharding and caching around the network, with a cheap stand-in for it."""

import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cifarjax import mesh as mesh_lib
from cifarjax.fid import features as features_lib
from cifarjax.fid import sources
from cifarjax.fid import weights as weights_lib


def fake_feature_step(mesh):
  """Like feature_step, but 'features' are each image's per-channel mean, tiled to 2048."""
  calls = []

  def features(variables, images):
    del variables
    calls.append(images.shape)
    means = images.astype(jnp.float32).mean(axis=(1, 2))  # (B, 3)
    return jnp.tile(means, (1, 683))[:, :2048]

  step = jax.jit(features, in_shardings=(mesh_lib.replicated(mesh), mesh_lib.batch_sharded(mesh)),
                 out_shardings=mesh_lib.replicated(mesh))
  step.calls = calls
  return step


def _expected(images):
  return np.tile(images.astype(np.float32).mean(axis=(1, 2)), (1, 683))[:, :2048]


def test_last_batch_is_padded_not_recompiled(monkeypatch):
  steps = {}
  monkeypatch.setattr(features_lib, "feature_step",
                      lambda mesh: steps.setdefault("step", fake_feature_step(mesh)))
  images = np.random.default_rng(0).integers(0, 256, (23, 5, 7, 3), dtype=np.uint8)
  got = features_lib.extract_features(images, {}, batch_size=10, progress=False)
  assert got.shape == (23, 2048) and got.dtype == np.float32
  np.testing.assert_allclose(got, _expected(images), rtol=1e-6)
  # Traced once, for the one batch shape (10, 5, 7, 3).
  assert steps["step"].calls == [(10, 5, 7, 3)]


@pytest.mark.integration
def test_sharded_over_several_devices():
  """On 4 (fake CPU) devices: batch 6 rounds up to 8 and results keep their order."""
  code = textwrap.dedent("""
      import numpy as np, jax
      import tests.test_fid_pipeline as t
      from cifarjax.fid import features as features_lib
      assert jax.device_count() == 4
      features_lib.feature_step = t.fake_feature_step
      images = np.random.default_rng(1).integers(0, 256, (13, 4, 4, 3), dtype=np.uint8)
      got = features_lib.extract_features(images, {}, batch_size=6, progress=False)
      np.testing.assert_allclose(got, t._expected(images), rtol=1e-6)
      print("ok")
  """)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True,
                       text=True, timeout=120)
  assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_reference_stats_are_cached_per_weights(tmp_path, monkeypatch):
  monkeypatch.setenv("CIFARJAX_CACHE", str(tmp_path / "cache"))
  weights_a, weights_b = tmp_path / "a.npz", tmp_path / "b.npz"
  weights_a.write_bytes(b"weights a")
  weights_b.write_bytes(b"weights b")
  computed = []

  def fake_stats(source, split, weights, **kw):
    computed.append((source, split, weights))
    return np.full(3, float(len(computed))), np.eye(3)
  monkeypatch.setattr(sources, "stats_from_source", fake_stats)

  mu1, _ = sources.reference_stats("cifar100", "train", weights=weights_a)
  mu2, sigma2 = sources.reference_stats("cifar100", "train", weights=weights_a)
  assert len(computed) == 1
  np.testing.assert_array_equal(mu1, mu2)
  np.testing.assert_array_equal(sigma2, np.eye(3))
  sources.reference_stats("cifar100", "test", weights=weights_a)  # another split
  sources.reference_stats("cifar100", "train", weights=weights_b)  # other weights
  assert len(computed) == 3
  files = sorted(p.name for p in (tmp_path / "cache" / "fid_stats").iterdir())
  sha_a = weights_lib.file_sha256(weights_a)[:16]
  assert f"cifar100-train-{sha_a}.npz" in files and len(files) == 3


def test_reference_stats_of_a_file_are_keyed_by_what_it_holds(tmp_path, monkeypatch):
  # The same zip provisioned again (a new mtime) or copied elsewhere reuses the statistics;
  # other bytes do not.
  monkeypatch.setenv("CIFARJAX_CACHE", str(tmp_path / "cache"))
  weights = tmp_path / "w.npz"
  weights.write_bytes(b"weights")
  computed = []
  monkeypatch.setattr(sources, "stats_from_source",
                      lambda *a, **k: computed.append(a) or (np.zeros(3), np.eye(3)))
  data = tmp_path / "a" / "images.zip"
  data.parent.mkdir()
  data.write_bytes(b"the images")
  sources.reference_stats(str(data), "train", weights=weights)
  os.utime(data, ns=(1, 1))
  sources.reference_stats(str(data), "train", weights=weights)
  copy = tmp_path / "b" / "images.zip"
  copy.parent.mkdir()
  shutil.copy(data, copy)
  sources.reference_stats(str(copy), "train", weights=weights)
  assert len(computed) == 1
  data.write_bytes(b"other images")
  sources.reference_stats(str(data), "train", weights=weights)
  assert len(computed) == 2


def test_stats_sources_never_load_weights(tmp_path, monkeypatch):
  def no_weights(*a, **k):
    raise AssertionError("weights loaded for a stats-only FID")
  monkeypatch.setattr(weights_lib, "load_inception_params", no_weights)
  np.savez(tmp_path / "a.npz", mu=np.zeros(2), sigma=np.eye(2))
  np.savez(tmp_path / "b.npz", mu=np.ones(2), sigma=np.eye(2))
  assert sources.fid_from_sources(tmp_path / "a.npz", tmp_path / "b.npz") == pytest.approx(2.0)
