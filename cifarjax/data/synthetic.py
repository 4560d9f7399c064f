"""Deterministic, class-dependent images for smoke runs and tests.

Each class is a colour and a stripe orientation and frequency, with per-image
noise and phase; a small convnet separates them within a few hundred steps.
"""

import numpy as np

from cifarjax.data.split import Split

SIZES = {"train": 2560, "test": 512}


def load_synthetic(split: str, num_classes: int = 10, size: int = 32) -> Split:
  if split not in SIZES:
    raise ValueError(f"synthetic data has splits {sorted(SIZES)}, not {split!r}")
  n = SIZES[split]
  rng = np.random.default_rng({"train": 0, "test": 1}[split])
  labels = np.arange(n, dtype=np.int32) % num_classes
  rng.shuffle(labels)
  classes = np.random.default_rng(1234)  # class looks: the same in every split
  colours = classes.uniform(0.2, 0.8, (num_classes, 3))
  angles = classes.uniform(0, np.pi, num_classes)
  freqs = classes.uniform(0.2, 0.8, num_classes)
  yy, xx = np.mgrid[:size, :size].astype(np.float32)
  a, f = angles[labels, None, None], freqs[labels, None, None]
  phase = rng.uniform(0, 2 * np.pi, (n, 1, 1))
  stripes = np.sin(f * (np.cos(a) * xx + np.sin(a) * yy) + phase)
  images = colours[labels, None, None, :] + 0.2 * stripes[..., None]
  images += rng.normal(0, 0.05, images.shape)
  images = np.clip(images * 255, 0, 255).astype(np.uint8)
  return Split(images=images, labels=labels,
               class_names=tuple(f"class_{i}" for i in range(num_classes)))
