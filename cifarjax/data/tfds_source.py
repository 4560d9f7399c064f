"""CIFAR-10/100 through tensorflow-datasets, with the official archive as fallback.

`tfds.data_source` reads prepared ArrayRecord files without TensorFlow, but
preparing cifar10/cifar100 needs it: the tfds builder reads the binary
archive with `tf.io.gfile` and PNG-encodes every image with `tf.image`. So
without TensorFlow, tfds serves only data already prepared (as ArrayRecord) in
its data_dir, and `load_cifar` otherwise falls back to the official python
archive (`cifar_archive`). tensorflow-datasets is imported only inside the
functions: the accelerator machines do not have it.
"""

import contextlib
import importlib.util
import logging
import pathlib

import numpy as np

from cifarjax.data import cifar_archive
from cifarjax.data.split import Split

NAMES = ("cifar100", "cifar10")
SPLITS = ("train", "test")
_BATCH = 2048  # records decoded per __getitems__ call: bounds the transient list

log = logging.getLogger(__name__)


class TfdsUnavailableError(RuntimeError):
  """tfds has no prepared copy of the dataset and cannot make one here."""


def tensorflow_available() -> bool:
  """Whether TensorFlow is importable (tfds needs it to prepare CIFAR)."""
  return importlib.util.find_spec("tensorflow") is not None


def _import_tfds():
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise ImportError(
        "tensorflow-datasets is not installed; install it, or pass the official archive "
        "with --data /path/to/cifar-100-python.tar.gz") from e
  return tfds


def _check_args(name: str, split: str) -> None:
  if name not in NAMES:
    raise ValueError(f"unknown CIFAR dataset {name!r}; expected one of {NAMES}")
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r} for {name}; expected one of {SPLITS}")


def _open_source(tfds, name: str, split: str, data_dir, download: bool):
  """tfds.data_source over ArrayRecord, with a clear error if not prepared."""
  # data_source picks ArrayRecord by itself only when data_dir is None; with a
  # data_dir it would prepare TFRecord, which has no random access.
  builder_kwargs = {"file_format": "array_record"}
  with _quiet_variant_warnings():
    try:
      return tfds.data_source(name, split=split, data_dir=data_dir, download=download,
                              builder_kwargs=builder_kwargs)
    except Exception as e:
      if download:
        raise
      builder = tfds.builder(name, data_dir=data_dir, **builder_kwargs)
      if builder.is_prepared():
        raise
      # Without a prepared copy tfds fails with a KeyError about empty splits. Name
      # the data dir the user chose (or tfds's default), not tfds's versioned subfolder.
      root = pathlib.Path(builder.data_dir).parent.parent
      where = f"{root}" + ("" if root.is_dir() else ", which does not exist")
      raise TfdsUnavailableError(
          f"tfds has no prepared {name} in {where}, and preparing it needs "
          "TensorFlow, which is not installed") from e


class _DropVariantWarnings(logging.Filter):
  """Drops tfds's "Variant folder <data_dir>/<name>/<version> has no dataset_info.json":
  it names a folder that does not exist wherever nothing is prepared, which is the
  normal case here (the caller says what happens instead)."""

  def filter(self, record):
    return "has no dataset_info.json" not in record.getMessage()


@contextlib.contextmanager
def _quiet_variant_warnings():
  absl = logging.getLogger("absl")
  drop = _DropVariantWarnings()
  absl.addFilter(drop)
  try:
    yield
  finally:
    absl.removeFilter(drop)


def _read_all(source, length: int, has_coarse: bool):
  """(images, labels, coarse labels or None) of every record, read in batches."""
  images = np.empty((length, 32, 32, 3), np.uint8)
  labels = np.empty((length,), np.int32)
  coarse = np.empty((length,), np.int32) if has_coarse else None
  for start in range(0, length, _BATCH):
    keys = list(range(start, min(start + _BATCH, length)))
    records = source.__getitems__(keys)
    images[start:start + len(keys)] = np.stack([r["image"] for r in records])
    labels[start:start + len(keys)] = [r["label"] for r in records]
    if has_coarse:
      coarse[start:start + len(keys)] = [r["coarse_label"] for r in records]
  return images, labels, coarse


def load_tfds(name: str, split: str, data_dir=None, *, download: bool | None = None) -> Split:
  """Reads a whole CIFAR split with `tfds.data_source` (no TensorFlow needed to read).

  Args:
    name: 'cifar100' or 'cifar10'.
    split: 'train' or 'test'.
    data_dir: the tfds data dir; default $TFDS_DATA_DIR or ~/tensorflow_datasets.
    download: whether tfds may download and prepare the dataset. Default: only
      where TensorFlow is installed, since preparing needs it (and would
      otherwise download the archive only to fail).

  Raises:
    ImportError: tensorflow-datasets is missing, or preparing needs TensorFlow.
    TfdsUnavailableError: download is off and nothing is prepared in data_dir.
  """
  _check_args(name, split)
  tfds = _import_tfds()
  if download is None:
    download = tensorflow_available()
  source = _open_source(tfds, name, split, data_dir, download)
  features = source.dataset_info.features
  has_coarse = "coarse_label" in features
  images, labels, coarse = _read_all(source, len(source), has_coarse)
  return Split(
      images=images, labels=labels,
      class_names=tuple(features["label"].names),
      coarse_labels=coarse,
      coarse_class_names=tuple(features["coarse_label"].names) if has_coarse else None)


def _fallback_errors() -> tuple[type[BaseException], ...]:
  """Errors from tfds that mean 'use the official archive instead'."""
  errors = (ImportError, OSError, TfdsUnavailableError)  # OSError: no network
  try:
    from tensorflow_datasets.core.download import DownloadError  # HTTP errors
  except ImportError:
    return errors
  return errors + (DownloadError,)


def load_cifar(name: str, split: str, data_dir=None, cache_dir=None) -> Split:
  """A CIFAR split from tfds where it can serve it, else the official archive.

  tfds is tried first (`load_tfds`); where it is not installed, cannot prepare
  the dataset (no TensorFlow) or has no network, the official python archive
  is downloaded into the cache (md5-checked) and read instead.

  Args:
    name: 'cifar100' or 'cifar10'.
    split: 'train' or 'test'.
    data_dir: the tfds data dir (see `load_tfds`).
    cache_dir: where the official archive is kept (see
      `cifar_archive.download_cifar_archive`).
  """
  _check_args(name, split)
  try:
    return load_tfds(name, split, data_dir=data_dir)
  except _fallback_errors() as e:
    log.warning("tfds cannot provide %s (%s); using the official archive instead", name, e)
  path = cifar_archive.download_cifar_archive(name, cache_dir)
  return cifar_archive.load_cifar_archive(path, split)
