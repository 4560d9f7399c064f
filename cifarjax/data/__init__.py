"""One entry point that loads a whole dataset split into host memory.

`load_split(source, split)` where source is
  - "cifar100" (default) or "cifar10": tensorflow-datasets, falling back to the
    official python-version archive (md5-checked) where tfds cannot prepare it;
  - "synthetic": deterministic class-dependent images for smoke runs;
  - a path: the official `cifar-100-python` / `cifar-10-batches-py` folder or its
    `.tar.gz`, or an image-folder tree or `.zip` laid out `<split>/<class>/<file>`.
Where the source lacks the split asked for (an image zip with only `train`), a
deterministic held-out slice of train of `holdout` examples stands in for
"test"/"validation", and "train" is the rest, so the two never overlap.
"""

import functools
import pathlib

import numpy as np

from cifarjax.data.split import Split, check_images
from cifarjax.errors import UserError, UserFileNotFoundError

DATASET_NAMES = ("cifar100", "cifar10", "synthetic")
EVAL_SPLITS = ("test", "validation")
DEFAULT_HOLDOUT = 5000
IMAGE_SIZE = (32, 32)  # what the models take
HOLDOUT_SEED = 0  # fixed: the held-out slice must not move between runs


def is_cifar_archive(path: pathlib.Path) -> bool:
  """Whether `path` is an official CIFAR python-version archive (.tar.gz) or its extracted folder."""
  if path.name.endswith((".tar.gz", ".tgz")):
    return True
  return path.is_dir() and any((path / f).exists() for f in ("meta", "batches.meta"))


def _available_splits(source: str, path: pathlib.Path | None) -> tuple[str, ...]:
  if path is None:
    return ("train", "test")
  if is_cifar_archive(path):
    return ("train", "test")
  from cifarjax.data.image_folder import image_folder_splits
  return image_folder_splits(path)


@functools.lru_cache(maxsize=2)  # train and its holdout come from one decode
def _load_native(source: str, path: pathlib.Path | None, split: str, data_dir) -> Split:
  if source == "synthetic":
    from cifarjax.data.synthetic import load_synthetic
    return load_synthetic(split)
  if source in ("cifar100", "cifar10"):
    from cifarjax.data.tfds_source import load_cifar
    return load_cifar(source, split, data_dir=data_dir)
  if is_cifar_archive(path):
    from cifarjax.data.cifar_archive import load_cifar_archive
    return load_cifar_archive(path, split)
  from cifarjax.data.image_folder import load_image_folder
  return load_image_folder(path, split)


def holdout_indices(n: int, holdout: int) -> tuple[np.ndarray, np.ndarray]:
  """(train, held-out) indices: a fixed permutation's first n-holdout and last holdout."""
  if not 0 < holdout < n:
    raise UserError(f"--holdout must be in (0, {n}) for a split of {n} examples, got {holdout}")
  perm = np.random.default_rng(HOLDOUT_SEED).permutation(n)
  return np.sort(perm[:n - holdout]), np.sort(perm[n - holdout:])


def load_split(source: str = "cifar100", split: str = "train", *,
               holdout: int = DEFAULT_HOLDOUT, data_dir=None,
               image_size: tuple[int, int] | None = IMAGE_SIZE) -> Split:
  """Loads `split` of `source` (see the module docstring) into host memory.

  image_size: the (height, width) every image must have (the models take 32x32);
  None accepts any size. Raises a UserError naming the source otherwise.
  """
  return _load_split(source, split, holdout, data_dir, image_size)


def check_training_data(data: Split, source: str, batch_size: int, min_classes: int = 2):
  """Raises a UserError unless `data` (a training split) can train a model: at least
  `min_classes` classes and at least `batch_size` images."""
  if data.num_classes < min_classes:
    raise UserError(f"{source} has {data.num_classes} class(es); training needs at least "
                    f"{min_classes}")
  if len(data) < batch_size:
    raise UserError(f"--batch-size {batch_size} exceeds the {len(data)} training images of "
                    f"{source}")


def _checked(data: Split, source: str, split: str, image_size) -> Split:
  if image_size is not None and data.images.shape[1:3] != tuple(image_size):
    h, w = data.images.shape[1:3]
    raise UserError(
        f"{source}:{split} holds {w}x{h} images, but the models take "
        f"{image_size[1]}x{image_size[0]}; resize the images first")
  return data


def _load_split(source, split, holdout, data_dir, image_size) -> Split:
  path = None
  if source not in DATASET_NAMES:
    path = pathlib.Path(source).expanduser()
    if not path.exists():
      raise UserFileNotFoundError(
          f"unknown data source {source!r}: not one of {', '.join(DATASET_NAMES)} and no such "
          f"file or folder (expected a cifar-100-python folder or .tar.gz, or an image folder "
          f"or .zip laid out <split>/<class>/<image>)")
  available = _available_splits(source, path)
  needs_holdout = "train" in available and not any(s in available for s in EVAL_SPLITS)
  if needs_holdout and split in EVAL_SPLITS + ("train",):
    train = _checked(_load_native(source, path, "train", data_dir), source, "train", image_size)
    keep, held = holdout_indices(len(train), holdout)
    return train.take(held if split in EVAL_SPLITS else keep)
  if not available:
    raise UserError(f"{source} holds no images laid out <split>/<class>/<image> (as "
                    f"train/cat/0001.png)")
  if split not in available:
    raise UserError(f"{source} has no split {split!r}; it has {', '.join(available)}")
  return _checked(_load_native(source, path, split, data_dir), source, split, image_size)




def with_class_order(data: Split, class_names) -> Split:
  """Relabels `data` so that label i means class_names[i] (matching by name).

  Lets a model trained on one source evaluate on another whose classes are the
  same but listed in another order (or a subset of them).
  """
  class_names = tuple(class_names)
  if tuple(data.class_names) == class_names:
    return data
  unknown = sorted(set(data.class_names) - set(class_names))
  if unknown:
    raise ValueError(
        f"classes {unknown} of the evaluation data are not among the model's "
        f"{len(class_names)} classes")
  index = {name: i for i, name in enumerate(class_names)}
  mapping = np.array([index[name] for name in data.class_names], np.int32)
  return Split(images=data.images, labels=mapping[data.labels], class_names=class_names)


__all__ = ["Split", "check_images", "check_training_data", "load_split", "with_class_order",
           "holdout_indices", "is_cifar_archive", "DATASET_NAMES", "IMAGE_SIZE"]
