"""Shared fixtures: paths to the read-only reference material in ../shared, fast
stand-ins for FID's Inception features, and registries as cifarjax defines them.

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


@pytest.fixture
def fake_inception(monkeypatch, tmp_path):
  """600-d random features instead of Inception's (counted), and no weights to read."""
  import numpy as np
  from cifarjax.fid import features, sources
  seen = []

  def extract(images, variables, *args, **kwargs):
    seen.append(len(images))
    rng = np.random.default_rng(len(seen))
    return rng.normal(size=(len(images), 600)).astype(np.float32)

  monkeypatch.setattr(features, "extract_features", extract)
  monkeypatch.setattr(sources, "as_variables", lambda weights: {})
  monkeypatch.setenv("CIFARJAX_CACHE", str(tmp_path / "cache"))
  weights = tmp_path / "weights.npz"
  weights.write_bytes(b"stand-in: never read")
  return seen, weights


@pytest.fixture
def fresh_registries(tmp_path_factory):
  """Every registry as it is when the test starts, and again after it. Its value, called
  with module names, does it again and forgets those modules, as a fresh process would
  have neither the entries they registered nor them. Modules that tests wrote (in their
  temporary folders) are forgotten after the test, so that the next can reuse the names."""
  import sys
  from cifarjax import plugins
  originals = {name: dict(entries) for name, entries in plugins.registries().items()}

  def restore():
    # In place, not a new dict: the modules that look entries up (diffusion.samplers, ...)
    # hold the dict itself, which the package only re-exports.
    for name, entries in plugins.registries().items():
      entries.clear()
      entries.update(originals[name])

  def fresh(*modules):
    restore()
    for module in modules:
      sys.modules.pop(module, None)

  fresh()
  yield fresh
  restore()
  written_by_tests = str(tmp_path_factory.getbasetemp())
  for name, module in list(sys.modules.items()):
    if str(getattr(module, "__file__", None) or "").startswith(written_by_tests):
      del sys.modules[name]


@pytest.fixture(scope="session", autouse=True)
def cifarjax_cache(tmp_path_factory):
  """Downloads and decoded images go to a cache of the session's own, not the user's."""
  previous = os.environ.get("CIFARJAX_CACHE")
  os.environ["CIFARJAX_CACHE"] = str(tmp_path_factory.mktemp("cifarjax-cache"))
  yield pathlib.Path(os.environ["CIFARJAX_CACHE"])
  if previous is None:
    del os.environ["CIFARJAX_CACHE"]
  else:
    os.environ["CIFARJAX_CACHE"] = previous


@pytest.fixture(scope="session", autouse=True)
def jax_compilation_cache(tmp_path_factory):
  """Tests build the same small programs in several places; compile each once."""
  import jax
  cache = pathlib.Path(os.environ.get("CIFARJAX_TEST_JAX_CACHE") or
                       tmp_path_factory.getbasetemp().parent / "jax-cache")
  jax.config.update("jax_compilation_cache_dir", str(cache))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
