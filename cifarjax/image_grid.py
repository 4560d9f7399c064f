"""PNG sheets of uint8 images: a grid with a row per class, and a one-row strip."""

import pathlib

import numpy as np
from PIL import Image


def tile(rows, gap: int = 2, scale: int = 1, background: int = 255) -> np.ndarray:
  """One uint8 image of `rows` (each a list of HWC images, ragged allowed), `gap` pixels
  apart on a `background` canvas; each image enlarged `scale` times (nearest)."""
  rows = [list(r) for r in rows]
  h, w, c = np.asarray(next(im for r in rows for im in r)).shape
  h, w = h * scale, w * scale
  cols = max(len(r) for r in rows)
  canvas = np.full((gap + len(rows) * (h + gap), gap + cols * (w + gap), c), background, np.uint8)
  for i, row in enumerate(rows):
    for j, im in enumerate(row):
      im = np.repeat(np.repeat(np.asarray(im, np.uint8), scale, 0), scale, 1)
      y, x = gap + i * (h + gap), gap + j * (w + gap)
      canvas[y:y + h, x:x + w] = im
  return canvas


def rows_by_class(images, labels) -> list[list[np.ndarray]]:
  """The images grouped by label in ascending label order, each group in input order."""
  labels = np.asarray(labels)
  return [[images[i] for i in np.flatnonzero(labels == c)] for c in np.unique(labels)]


def save_png(path, array) -> pathlib.Path:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array).save(path)
  return path


def write_grid(path, images, labels, scale: int = 1) -> pathlib.Path:
  """A PNG with a row per class present in `labels`."""
  if len(images) == 0:
    raise ValueError("no images to draw")
  return save_png(path, tile(rows_by_class(images, labels), scale=scale))


def write_strip(path, frames, scale: int = 2) -> pathlib.Path:
  """A PNG of the frames side by side (an interpolation runs left to right)."""
  if len(frames) == 0:
    raise ValueError("no frames to draw")
  return save_png(path, tile([list(frames)], scale=scale))
