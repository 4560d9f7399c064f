"""Shared fixtures: paths to the read-only reference material in ../shared.

Each path comes from an environment variable (which .ci/run sets) and falls back
to ../shared beside the checkout; a test that needs a missing file is skipped
with the reason.
"""

import os
import pathlib

import pytest

SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared"


def _shared_file(env_var, default_relpath):
  path = pathlib.Path(os.environ.get(env_var) or SHARED / default_relpath)
  if not path.is_file():
    pytest.skip(f"{path} is absent (set {env_var} to its location)")
  return path


@pytest.fixture(scope="session")
def fid_weights_path():
  return _shared_file("CIFARJAX_FID_WEIGHTS", "fid/pt_inception-2015-12-05.npz")


@pytest.fixture(scope="session")
def fid_reference_path():
  return _shared_file("CIFARJAX_FID_REFERENCE", "fid/pytorch-fid-reference-cifar10-train.npz")


@pytest.fixture(scope="session")
def cifar10_zip_path():
  return _shared_file("CIFARJAX_CIFAR10_ZIP", "data/cifar10-jpeg-train.zip")


@pytest.fixture(scope="session", autouse=True)
def jax_compilation_cache(tmp_path_factory):
  """Tests build the same small programs in several places; compile each once."""
  import jax
  cache = pathlib.Path(os.environ.get("CIFARJAX_TEST_JAX_CACHE") or
                       tmp_path_factory.getbasetemp().parent / "jax-cache")
  jax.config.update("jax_compilation_cache_dir", str(cache))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
