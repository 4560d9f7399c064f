"""Image-folder trees and zips laid out `<split>/<class>/<file>.png|jpg`."""

import io
import pathlib
import zipfile
import zlib

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from cifarjax.data import decode_cache
from cifarjax.data.split import Split
from cifarjax.errors import UserError, clean_message, main_process, note

IMAGE_SUFFIXES = (".bmp", ".jpg", ".jpeg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")


def _open_zip(path: pathlib.Path) -> zipfile.ZipFile:
  try:
    return zipfile.ZipFile(path)
  except (zipfile.BadZipFile, EOFError) as e:
    raise UserError(f"{path} is not a readable zip archive (truncated or corrupt?): "
                    f"{clean_message(e)}") from e


def _list_zip(path: pathlib.Path):
  with _open_zip(path) as zf:
    return [n for n in zf.namelist() if not n.endswith("/")]


def _list_dir(path: pathlib.Path):
  return [p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()]


def _index(names):
  """{split: {class: [member names]}} from paths ending `<split>/<class>/<file>`.

  A single leading folder (as zips made of a folder often have) is allowed.
  """
  tree = {}
  for name in names:
    parts = name.split("/")
    if len(parts) < 3 or not parts[-1].lower().endswith(IMAGE_SUFFIXES):
      continue
    split, cls = parts[-3], parts[-2]
    tree.setdefault(split, {}).setdefault(cls, []).append(name)
  return tree


def decode_image(raw: bytes, name: str) -> np.ndarray:
  """uint8 (H, W, 3) of an encoded image; a UserError naming `name` where PIL cannot."""
  try:
    with Image.open(io.BytesIO(raw)) as im:
      return np.asarray(im.convert("RGB"))
  except UnidentifiedImageError as e:
    raise UserError(f"cannot decode image {name}: not an image file PIL can read "
                    f"(empty, truncated or another format)") from e
  except Exception as e:
    raise UserError(f"cannot decode image {name}: {clean_message(e)}") from e


def decode_members(path: pathlib.Path, members) -> list[np.ndarray]:
  """uint8 (H, W, 3) of each member (a path inside the zip or folder `path`), with a
  progress bar; a UserError naming the member that cannot be read or decoded."""
  zf = _open_zip(path) if not path.is_dir() else None
  try:
    images = []
    for member in tqdm(members, desc=f"decoding {path.name}", unit="img",
                       disable=not main_process()):
      try:
        raw = zf.read(member) if zf else (path / member).read_bytes()
      except (zipfile.BadZipFile, EOFError, zlib.error) as e:
        raise UserError(f"cannot read {member} from {path} (truncated or corrupt zip?): "
                        f"{clean_message(e)}") from e
      images.append(decode_image(raw, f"{path}/{member}"))
    return images
  finally:
    if zf:
      zf.close()


def image_folder_splits(path) -> tuple[str, ...]:
  """The split names a folder tree or zip holds."""
  path = pathlib.Path(path)
  names = _list_zip(path) if path.suffix == ".zip" else _list_dir(path)
  return tuple(sorted(_index(names)))


def load_image_folder(path, split: str) -> Split:
  """Every image of `split`; classes are the sorted folder names. Decoded once per machine
  (`decode_cache`): later loads of the same zip or folder read the decoded arrays back."""
  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"image folder or zip {path} does not exist")
  arrays = decode_cache.cached(path, split, lambda: _decode_split(path, split))
  return Split(images=arrays["images"], labels=arrays["labels"],
               class_names=tuple(arrays["class_names"].tolist()))


def _decode_split(path: pathlib.Path, split: str) -> dict[str, np.ndarray]:
  tree = _index(_list_zip(path) if path.suffix == ".zip" else _list_dir(path))
  if split not in tree:
    raise UserError(
        f"{path} has no split {split!r}: expected <split>/<class>/<image> with split in "
        f"{sorted(tree) or 'nothing found'}")
  class_names = tuple(sorted(tree[split]))
  members = [(m, label) for label, c in enumerate(class_names) for m in sorted(tree[split][c])]

  note(f"decoding the {len(members):,} images of {path} ({split}); once: they are cached")
  images = decode_members(path, [m for m, _ in members])
  shapes = {im.shape for im in images}
  if len(shapes) != 1:
    first = next(m for (m, _), im in zip(members, images) if im.shape != images[0].shape)
    size = lambda im: f"{im.shape[1]}x{im.shape[0]}"  # noqa: E731
    odd = next(im for im in images if im.shape != images[0].shape)
    raise UserError(
        f"images in {path} differ in size: {members[0][0]} is {size(images[0])}, "
        f"{first} is {size(odd)}; resize them to one size (32x32) first")
  return {"images": np.stack(images).astype(np.uint8),
          "labels": np.array([label for _, label in members], np.int32),
          "class_names": np.array(class_names)}
