"""PNG sheets of uint8 images: a grid with a row per class, and a one-row strip."""

import pathlib

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cifarjax.errors import writing


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
  with writing(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
  return path


def _font(size: int):
  try:
    return ImageFont.load_default(size=size)  # a scalable font where FreeType is present
  except (TypeError, OSError):  # older Pillow, or no FreeType: the fixed bitmap font
    return ImageFont.load_default()


def label_rows(sheet: np.ndarray, names, row_height: int, gap: int, font_size: int = 14,
               background: int = 255) -> np.ndarray:
  """`sheet` with a column on its left holding names[i] beside row i (rows row_height
  pixels tall, `gap` apart, as `tile` lays them out)."""
  font = _font(font_size)
  measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
  width = int(max(measure.textlength(str(n), font=font) for n in names)) + 2 * gap + 4
  canvas = Image.new("RGB", (width + sheet.shape[1], sheet.shape[0]), (background,) * 3)
  canvas.paste(Image.fromarray(sheet), (width, 0))
  draw = ImageDraw.Draw(canvas)
  for i, name in enumerate(names):
    y = gap + i * (row_height + gap) + row_height // 2
    draw.text((gap + 2, y), str(name), fill=(0, 0, 0), font=font, anchor="lm")
  return np.asarray(canvas)


def write_grid(path, images, labels, class_names=None, scale: int = 3) -> pathlib.Path:
  """A PNG with a row per class present in `labels`, the images enlarged `scale` times
  (nearest), each row named by class_names[label] where given."""
  if len(images) == 0:
    raise ValueError("no images to draw")
  gap = 2
  sheet = tile(rows_by_class(images, labels), gap=gap, scale=scale)
  if class_names is not None:
    names = [f"{int(c)} {class_names[int(c)]}" for c in np.unique(np.asarray(labels))]
    sheet = label_rows(sheet, names, np.asarray(images[0]).shape[0] * scale, gap)
  return save_png(path, sheet)


def write_strip(path, frames, sources=None, scale: int = 2, gap: int = 2,
                source_gap: int = 10) -> pathlib.Path:
  """A PNG of the frames side by side (an interpolation runs left to right); `sources`
  (image a, image b) go at the two ends, set apart by `source_gap` pixels."""
  if len(frames) == 0:
    raise ValueError("no frames to draw")
  strip = tile([list(frames)], gap=gap, scale=scale)
  if sources is None:
    return save_png(path, strip)
  a, b = (tile([[im]], gap=gap, scale=scale) for im in sources)
  space = np.full((strip.shape[0], source_gap - gap, strip.shape[2]), 255, np.uint8)
  return save_png(path, np.concatenate([a, space, strip, space, b], axis=1))
