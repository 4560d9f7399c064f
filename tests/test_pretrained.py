"""The committed generators in pretrained/: each folder is what `export-diffusion` writes, holds
the preset it names, and samples images that stay in the data range without saturating."""

import json
import pathlib

import numpy as np
import pytest

from cifarjax import generate, run
from cifarjax.config import DIFFUSION_PRESETS

PRETRAINED = pathlib.Path(__file__).resolve().parents[1] / "pretrained"
FOLDERS = {"cifar10-generator-paper": "paper", "cifar10-generator-improved": "improved"}
pytestmark = pytest.mark.integration


@pytest.mark.parametrize("folder", sorted(FOLDERS))
def test_a_pretrained_generator_samples_each_class(folder):
  path = PRETRAINED / folder
  assert run.is_export(path), f"{path} is not an exported generator"
  config = json.loads((path / "config.json").read_text())
  preset = DIFFUSION_PRESETS[FOLDERS[folder]]
  for field in ("schedule", "prediction", "loss_weighting", "label_dropout", "unet"):
    assert config[field] == getattr(preset, field), field
  assert config["batch_size"] == 128  # the paper's batch for its schedule comparison
  summary = json.loads((path / "summary.json").read_text())
  assert summary["exported_weights"] == "ema" and summary["exported_step"] >= 1000
  classes = json.loads((path / "classes.json").read_text())
  assert len(classes) == 10  # CIFAR-10
  images = generate.generate(path, np.arange(10), "dpm++2m", 10, seed=0, batch_size=10,
                             progress=False)
  assert images.shape == (10, 32, 32, 3) and images.dtype == np.uint8
  # A sampler that diverges ends at values far outside the data range, which become 0 or 255:
  # a trained generator's images are mostly neither, and not flat.
  assert np.mean((images == 0) | (images == 255)) < 0.3
  assert images.reshape(10, -1).std(axis=1).min() > 5
