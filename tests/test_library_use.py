"""The code of README's "Use as a library" section runs as written."""

import pathlib
import re


README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def library_blocks() -> list[str]:
  text = README.read_text()
  section = text.split("## Use as a library", 1)[1].split("\n## ", 1)[0]
  return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def run_block(index, monkeypatch, tmp_path):
  monkeypatch.chdir(tmp_path)  # blocks write runs/ where they run
  namespace = {"__name__": f"readme_block_{index}"}
  exec(compile(library_blocks()[index], f"README.md:library:{index}", "exec"), namespace)
  return namespace


def test_readme_has_the_three_examples():
  assert len(library_blocks()) == 3


def test_custom_block_classifier(monkeypatch, tmp_path):
  from cifarjax import models
  monkeypatch.setattr(models, "CLASSIFIERS", dict(models.CLASSIFIERS))  # the block registers one
  ns = run_block(0, monkeypatch, tmp_path)
  summary = ns["summary"]
  assert summary["steps"] == 4 and summary["model"] == "fire"
  assert ns["config"].model == "fire" and ns["class_names"]
  assert any("FireBlock_0" in str(k) for k in ns["state"].params)
  assert int(ns["state"].step) == 4


def test_custom_schedule_sampler(monkeypatch, tmp_path):
  from cifarjax import diffusion
  monkeypatch.setattr(diffusion, "SCHEDULES", dict(diffusion.SCHEDULES))  # the block adds one
  ns = run_block(1, monkeypatch, tmp_path)
  assert ns["images"].shape == (4, 32, 32, 3)
  assert ns["schedule"].num_timesteps == 100


def test_fid_of_arrays(monkeypatch, tmp_path, fid_weights_path, capsys):
  """The block prints the FID of two sets of 16 noise images: the Fréchet distance of the
  features it extracted, which tests/_fid_exact.py computes again without cifarjax.fid.stats."""
  import functools

  import numpy as np

  from cifarjax.fid import features as features_lib
  from cifarjax.fid import stats as stats_lib
  from _fid_exact import fid_from_features
  monkeypatch.setenv("CIFARJAX_FID_WEIGHTS", str(fid_weights_path))
  # The Fréchet distance's plumbing is what runs here: its eigh form, seconds faster than
  # scipy's sqrtm of a 2048 x 2048 product (test_fid_units.py checks both agree).
  monkeypatch.setattr(stats_lib, "frechet_distance",
                      functools.partial(stats_lib.frechet_distance, method="eigh"))
  extracted = []
  real_extract = features_lib.extract_features

  def extract(images, *args, **kwargs):
    extracted.append((np.asarray(images), real_extract(images, *args, **kwargs)))
    return extracted[-1][1]
  monkeypatch.setattr(features_lib, "extract_features", extract)

  ns = run_block(2, monkeypatch, tmp_path)
  printed = float(capsys.readouterr().out.strip().splitlines()[-1])
  (images_a, feats_a), (images_b, feats_b) = extracted
  np.testing.assert_array_equal(images_a, ns["a"])
  np.testing.assert_array_equal(images_b, ns["b"])
  assert feats_a.shape == feats_b.shape == (16, 2048)
  np.testing.assert_allclose(printed, fid_from_features(feats_a, feats_b), rtol=1e-6)
  assert printed > 1  # two different sets; 16 samples in 2048 dimensions sit far apart
  mu, sigma = stats_lib.activation_statistics(feats_a)  # and a set against itself: zero
  assert abs(stats_lib.frechet_distance(mu, sigma, mu, sigma)) < 1e-6 * printed
