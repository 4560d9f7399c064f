"""The official CIFAR-10/100 "python version" archives, read and downloaded.

Layouts (https://www.cs.toronto.edu/~kriz/cifar.html):
  cifar-100-python/   train, test, meta
  cifar-10-batches-py/  data_batch_1..5, test_batch, batches.meta
Each file is a protocol-2 pickle of a dict with bytes keys; b'data' holds the
images as (N, 3072) uint8 rows, each the red, green and blue 32x32 planes in
turn. `load_cifar_archive` reads the extracted folder or the .tar.gz itself.
"""

import codecs
import dataclasses
import functools
import gzip
import io
import pathlib
import pickle
import tarfile
import zlib

import numpy as np

from cifarjax import cache
from cifarjax.data.split import Split
from cifarjax.errors import UserError, clean_message

SPLITS = ("train", "test")
IMAGE_SHAPE = (3, 32, 32)  # as stored: channel planes first


@dataclasses.dataclass(frozen=True)
class Archive:
  """Where an official archive lives and the md5 it must have."""
  url: str
  md5: str

  @property
  def filename(self) -> str:
    return self.url.rsplit("/", 1)[-1]


ARCHIVES = {
    "cifar100": Archive("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                        "eb9058c3a382ffc7106e4002c42a8d85"),
    "cifar10": Archive("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                       "c58f30108f718f92721af3b95e74349a"),
}


@dataclasses.dataclass(frozen=True)
class _Layout:
  """Which files of one archive hold each split, its labels and its names."""
  meta: str
  split_files: dict
  label_key: str
  names_key: str
  coarse_label_key: str | None = None
  coarse_names_key: str | None = None


_CIFAR100 = _Layout(
    meta="meta", split_files={"train": ("train",), "test": ("test",)},
    label_key="fine_labels", names_key="fine_label_names",
    coarse_label_key="coarse_labels", coarse_names_key="coarse_label_names")
_CIFAR10 = _Layout(
    meta="batches.meta",
    split_files={"train": tuple(f"data_batch_{i}" for i in range(1, 6)),
                 "test": ("test_batch",)},
    label_key="labels", names_key="label_names")
_LAYOUTS = (_CIFAR100, _CIFAR10)


ChecksumError = cache.ChecksumError
ArchiveUnavailableError = cache.DownloadError


# --- Restricted unpickling ----------------------------------------------------


def _numpy_core():
  # numpy 2 renamed numpy.core to numpy._core (keeping numpy.core as a
  # deprecated alias); the official files, written by numpy 1, name numpy.core.
  try:
    from numpy import _core as core
  except ImportError:  # numpy 1.x
    from numpy import core
  return core


@functools.cache
def _allowed_globals():
  core = _numpy_core()
  reconstruct = core.multiarray._reconstruct
  allowed = {
      ("numpy", "ndarray"): np.ndarray,
      ("numpy", "dtype"): np.dtype,
      ("numpy.core.multiarray", "_reconstruct"): reconstruct,
      ("numpy._core.multiarray", "_reconstruct"): reconstruct,
      # Python 3 pickles bytes at protocol 2 as _codecs.encode(str, 'latin1').
      ("_codecs", "encode"): codecs.encode,
  }
  frombuffer = getattr(core.numeric, "_frombuffer", None)
  if frombuffer is not None:  # numpy 2 arrays re-pickled at protocol 5
    allowed[("numpy._core.numeric", "_frombuffer")] = frombuffer
    allowed[("numpy.core.numeric", "_frombuffer")] = frombuffer
  return allowed


class _RestrictedUnpickler(pickle.Unpickler):
  """Builds only dicts, lists, bytes, numbers and numpy arrays.

  dict and list come from pickle opcodes and need no global; any other global
  (os.system, builtins.eval, ...) is refused, so a tampered download cannot run
  code when read.
  """

  def find_class(self, module, name):
    allowed = _allowed_globals()
    if (module, name) not in allowed:
      raise pickle.UnpicklingError(
          f"refusing to unpickle {module}.{name}: CIFAR files hold only dicts, lists and "
          "numpy arrays")
    return allowed[(module, name)]


def _unpickle(data: bytes, where: str) -> dict:
  """The dict pickled in `data`, with str keys; `where` names it in errors."""
  try:
    # encoding='bytes' keeps Python 2 strings as bytes (they are latin1
    # filenames and names), and lets numpy read the raw array buffers.
    obj = _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
  except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
    raise ValueError(f"{where} is not a readable CIFAR pickle: {e}") from e
  if not isinstance(obj, dict):
    raise ValueError(f"{where} must hold a dict, got {type(obj).__name__}")
  return {_text(k): v for k, v in obj.items()}


def _text(s) -> str:
  return s.decode("latin1") if isinstance(s, bytes) else str(s)


# --- Reading a folder or a .tar.gz --------------------------------------------


def _is_tar(path: pathlib.Path) -> bool:
  return path.is_file() and path.name.endswith((".tar.gz", ".tgz", ".tar"))


def _list_members(path: pathlib.Path) -> list[str]:
  """Base names of the files in the folder or archive (for error messages)."""
  if _is_tar(path):
    with tarfile.open(path) as tar:
      return sorted(pathlib.PurePosixPath(m.name).name for m in tar if m.isfile())
  return sorted(p.name for p in path.iterdir() if p.is_file())


def _read_members(path: pathlib.Path, names) -> dict[str, bytes]:
  """{base name: bytes} of those files `names` that the folder or archive has."""
  names = set(names)
  if not _is_tar(path):
    return {n: (path / n).read_bytes() for n in names if (path / n).is_file()}
  found = {}
  # One pass over the members: a .tar.gz decompresses sequentially, so
  # looking members up by name would inflate it once per lookup.
  with tarfile.open(path) as tar:
    for member in tar:
      base = pathlib.PurePosixPath(member.name).name
      if member.isfile() and base in names and base not in found:
        found[base] = tar.extractfile(member).read()
  return found


def _read_split_files(path: pathlib.Path, split: str) -> tuple[_Layout, dict[str, bytes]]:
  """The archive's layout and the raw meta and `split` files, in one read."""
  wanted = set()
  for layout in _LAYOUTS:
    wanted.update((layout.meta,) + layout.split_files[split])
  contents = _read_members(path, wanted)
  for layout in _LAYOUTS:
    if layout.meta in contents:
      missing = [f for f in layout.split_files[split] if f not in contents]
      if missing:
        raise FileNotFoundError(
            f"{path} lacks {', '.join(missing)}, needed for split {split!r}")
      return layout, contents
  raise ValueError(
      f"{path} is not a CIFAR python-version archive: it has neither 'meta' (cifar-100-python) "
      f"nor 'batches.meta' (cifar-10-batches-py); found {_list_members(path)[:10] or 'no files'}")


def _images(data, where: str) -> np.ndarray:
  """(N, 3072) planar rows -> (N, 32, 32, 3) NHWC uint8."""
  data = np.asarray(data)
  if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != np.prod(IMAGE_SHAPE):
    raise ValueError(
        f"{where}: b'data' must be uint8 of shape (N, 3072), got {data.dtype} {data.shape}")
  return np.ascontiguousarray(data.reshape(-1, *IMAGE_SHAPE).transpose(0, 2, 3, 1))


def _labels(batch: dict, key: str, n: int, where: str) -> np.ndarray:
  if key not in batch:
    raise ValueError(f"{where} has no {key!r} entry (keys: {sorted(batch)})")
  labels = np.asarray(batch[key], dtype=np.int32)
  if labels.shape != (n,):
    raise ValueError(f"{where}: {key!r} must hold {n} labels, got shape {labels.shape}")
  return labels


def _names(meta: dict, key: str, where: str) -> tuple[str, ...]:
  if key not in meta:
    raise ValueError(f"{where} has no {key!r} entry (keys: {sorted(meta)})")
  return tuple(_text(n) for n in meta[key])


def _concatenate(arrays):
  # CIFAR-100 has one file per split: no need for a second 150 MB copy.
  return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)


def load_cifar_archive(path, split: str) -> Split:
  """Reads `split` ('train' or 'test') of an official CIFAR python archive.

  Args:
    path: the extracted `cifar-100-python/` or `cifar-10-batches-py/` folder,
      or the `.tar.gz` it came in (read in place, not extracted).
    split: 'train' or 'test'.

  Returns:
    The whole split; CIFAR-100 adds its 20 coarse labels and their names.
  """
  path = pathlib.Path(path).expanduser()
  if split not in SPLITS:
    raise ValueError(f"unknown CIFAR split {split!r} for {path}; expected one of {SPLITS}")
  if not path.exists():
    raise FileNotFoundError(
        f"CIFAR archive {path} does not exist (expected a cifar-100-python or "
        "cifar-10-batches-py folder, or its .tar.gz)")
  try:
    layout, contents = _read_split_files(path, split)
  except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
    raise UserError(f"{path} is not a readable .tar.gz archive (truncated or corrupt?): "
                    f"{clean_message(e)}") from e
  meta = _unpickle(contents[layout.meta], f"{path}/{layout.meta}")
  images, labels, coarse = [], [], []
  for f in layout.split_files[split]:
    where = f"{path}/{f}"
    batch = _unpickle(contents.pop(f), where)  # pop: free each raw file once decoded
    if "data" not in batch:
      raise ValueError(f"{where} has no 'data' entry (keys: {sorted(batch)})")
    images.append(_images(batch["data"], where))
    labels.append(_labels(batch, layout.label_key, len(images[-1]), where))
    if layout.coarse_label_key:
      coarse.append(_labels(batch, layout.coarse_label_key, len(images[-1]), where))
  meta_where = f"{path}/{layout.meta}"
  return Split(
      images=_concatenate(images),
      labels=_concatenate(labels),
      class_names=_names(meta, layout.names_key, meta_where),
      coarse_labels=_concatenate(coarse) if coarse else None,
      coarse_class_names=(_names(meta, layout.coarse_names_key, meta_where)
                          if layout.coarse_names_key else None))


# --- Downloading --------------------------------------------------------------


def _archive(name: str) -> Archive:
  if name not in ARCHIVES:
    raise ValueError(f"unknown CIFAR archive {name!r}; expected one of {tuple(ARCHIVES)}")
  return ARCHIVES[name]


def download_cifar_archive(name: str, cache_dir=None) -> pathlib.Path:
  """The path of the md5-checked official archive for `name`, downloading it once.

  Args:
    name: 'cifar100' or 'cifar10'.
    cache_dir: where archives are kept; default $CIFARJAX_CACHE, else
      ~/.cache/cifarjax.

  Returns:
    The path of the `.tar.gz` in the cache, for `load_cifar_archive`.

  Raises:
    ChecksumError: the cached file or the download has the wrong md5.
    ArchiveUnavailableError: not cached and the download failed (offline).
  """
  archive = _archive(name)
  target = cache.cache_dir(cache_dir) / archive.filename
  if target.exists():
    actual = cache.file_digest(target, "md5")
    if actual != archive.md5:
      raise ChecksumError(
          f"{target} has md5 {actual}, but the official {archive.filename} has "
          f"{archive.md5}: it is truncated or not the official archive. Delete it to "
          "download it again, or replace it with the official archive.")
    return target

  offline_hint = (
      f"Without network, point at a local copy: --data /path/to/{archive.filename} (or the "
      f"extracted folder), or put the archive at {target}.")
  return cache.download(archive.url, target, algorithm="md5", expected=archive.md5,
                        offline_hint=offline_hint)
