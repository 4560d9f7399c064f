"""The official CIFAR python-version archives: reading, md5 checks, downloads.

The archives are built here, small, in the official format: protocol-2
pickles of dicts with bytes keys, images as (N, 3072) planar uint8 rows.
"""

import hashlib
import os
import pickle
import struct
import tarfile
import urllib.error

import numpy as np
import pytest

from cifarjax import cache as cache_lib
from cifarjax.data import cifar_archive
from cifarjax.data.cifar_archive import (ArchiveUnavailableError, ChecksumError,
                                         download_cifar_archive, load_cifar_archive)

CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                 "ship", "truck")


def _dump(path, obj):
  path.write_bytes(pickle.dumps(obj, protocol=2))


def _planar(images):
  """NHWC uint8 -> the official (N, 3072) rows: red plane, green, blue."""
  return images.transpose(0, 3, 1, 2).reshape(len(images), -1)


def _images(rng, n):
  return rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)


def _batch(images, labels_key, labels, name, extra=None):
  # Labels as Python ints, like the originals (not numpy scalars).
  return {b"batch_label": name.encode(), labels_key: [int(x) for x in labels],
          b"data": _planar(images),
          b"filenames": [f"img_{i}.png".encode() for i in range(len(images))], **(extra or {})}


def _tar(folder):
  path = folder.parent / f"{folder.name}.tar.gz"
  with tarfile.open(path, "w:gz") as tar:
    tar.add(folder, arcname=folder.name)
  return path


@pytest.fixture(scope="module")
def cifar100(tmp_path_factory):
  """(folder, {split: (images, fine, coarse)}, fine names, coarse names)."""
  folder = tmp_path_factory.mktemp("c100") / "cifar-100-python"
  folder.mkdir()
  rng = np.random.default_rng(0)
  fine_names = tuple(f"fine_{i}" for i in range(100))
  coarse_names = tuple(f"coarse_{i}" for i in range(20))
  _dump(folder / "meta", {b"fine_label_names": [n.encode() for n in fine_names],
                          b"coarse_label_names": [n.encode() for n in coarse_names]})
  expected = {}
  for split, n in (("train", 5), ("test", 3)):
    images = _images(rng, n)
    fine = rng.integers(0, 100, n)
    coarse = rng.integers(0, 20, n)
    _dump(folder / split, _batch(images, b"fine_labels", fine, f"{split} batch",
                                 {b"coarse_labels": coarse.tolist()}))
    expected[split] = (images, fine, coarse)
  return folder, expected, fine_names, coarse_names


@pytest.fixture(scope="module")
def cifar10(tmp_path_factory):
  """(folder, {split: (images, labels)}) with five training batches."""
  folder = tmp_path_factory.mktemp("c10") / "cifar-10-batches-py"
  folder.mkdir()
  rng = np.random.default_rng(1)
  _dump(folder / "batches.meta", {b"label_names": [n.encode() for n in CIFAR10_NAMES],
                                  b"num_cases_per_batch": 2, b"num_vis": 3072})
  files = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
  expected = {}
  for split, names in files.items():
    images = _images(rng, 2 * len(names))
    labels = rng.integers(0, 10, len(images))
    for i, name in enumerate(names):
      part = slice(2 * i, 2 * i + 2)
      _dump(folder / name, _batch(images[part], b"labels", labels[part], name))
    expected[split] = (images, labels)
  return folder, expected


@pytest.mark.parametrize("as_tar", [False, True], ids=["folder", "tar.gz"])
@pytest.mark.parametrize("split", ["train", "test"])
def test_cifar100_round_trips(cifar100, as_tar, split):
  folder, expected, fine_names, coarse_names = cifar100
  data = load_cifar_archive(_tar(folder) if as_tar else folder, split)
  images, fine, coarse = expected[split]
  assert data.images.dtype == np.uint8 and data.images.shape == (len(images), 32, 32, 3)
  np.testing.assert_array_equal(data.images, images)
  assert data.labels.dtype == np.int32 and data.coarse_labels.dtype == np.int32
  np.testing.assert_array_equal(data.labels, fine)
  np.testing.assert_array_equal(data.coarse_labels, coarse)
  assert data.class_names == fine_names and data.coarse_class_names == coarse_names


@pytest.mark.parametrize("as_tar", [False, True], ids=["folder", "tar.gz"])
@pytest.mark.parametrize("split", ["train", "test"])
def test_cifar10_round_trips(cifar10, as_tar, split):
  folder, expected = cifar10
  data = load_cifar_archive(_tar(folder) if as_tar else folder, split)
  images, labels = expected[split]
  np.testing.assert_array_equal(data.images, images)  # all five batches, in order
  np.testing.assert_array_equal(data.labels, labels)
  assert data.class_names == CIFAR10_NAMES
  assert data.coarse_labels is None and data.coarse_class_names is None


def test_pixel_order_is_planar_rgb(tmp_path):
  # Written straight in the documented layout, not through _planar: the first
  # 1024 bytes are the red plane in row-major order, then green, then blue.
  row = np.zeros(3072, np.uint8)
  row[0 * 1024 + 0 * 32 + 1] = 11  # red at (y=0, x=1)
  row[1 * 1024 + 2 * 32 + 3] = 22  # green at (y=2, x=3)
  row[2 * 1024 + 31 * 32 + 0] = 33  # blue at (y=31, x=0)
  folder = tmp_path / "cifar-10-batches-py"
  folder.mkdir()
  _dump(folder / "batches.meta", {b"label_names": [n.encode() for n in CIFAR10_NAMES]})
  _dump(folder / "test_batch", {b"data": row[None], b"labels": [7]})
  image = load_cifar_archive(folder, "test").images[0]
  assert image[0, 1].tolist() == [11, 0, 0]
  assert image[2, 3].tolist() == [0, 22, 0]
  assert image[31, 0].tolist() == [0, 0, 33]
  assert int(image.sum()) == 66


def _py2_str(b: bytes) -> bytes:
  """Pickle opcode BINSTRING: how Python 2 wrote a str."""
  return b"T" + struct.pack("<i", len(b)) + b


def _py2_pickle(data: np.ndarray, labels) -> bytes:
  """What Python 2 cPickle with numpy 1 wrote for {'data': data, 'labels': labels}.

  Assembled opcode by opcode, as the official files were: str keys and the
  array buffer are Python 2 str (BINSTRING), the array is rebuilt through
  numpy.core.multiarray._reconstruct (numpy 2 calls it numpy._core).
  """
  rows, cols = data.shape
  array = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + _py2_str(b"b")
           + b"\x87R(K\x01" + b"J" + struct.pack("<i", rows) + b"J" + struct.pack("<i", cols)
           + b"\x86cnumpy\ndtype\n" + _py2_str(b"u1") + b"K\x00K\x01\x87R(K\x03"
           + _py2_str(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89"
           + _py2_str(data.tobytes()) + b"tb")
  label_list = b"](" + b"".join(b"K" + bytes([int(x)]) for x in labels) + b"e"
  return (b"\x80\x02}(" + _py2_str(b"data") + array + _py2_str(b"labels") + label_list
          + _py2_str(b"batch_label") + _py2_str(b"testing batch 1 of 1") + b"u.")


def test_python2_numpy1_pickles_load(tmp_path):
  rng = np.random.default_rng(2)
  images = _images(rng, 2)
  folder = tmp_path / "cifar-10-batches-py"
  folder.mkdir()
  _dump(folder / "batches.meta", {b"label_names": [n.encode() for n in CIFAR10_NAMES]})
  (folder / "test_batch").write_bytes(_py2_pickle(_planar(images), [3, 9]))
  data = load_cifar_archive(folder, "test")
  np.testing.assert_array_equal(data.images, images)
  assert data.labels.tolist() == [3, 9]


class _RunsShell:
  def __init__(self, command):
    self.command = command

  def __reduce__(self):
    return (os.system, (self.command,))


def test_malicious_pickle_is_refused(cifar10, tmp_path):
  folder = tmp_path / "cifar-10-batches-py"
  folder.mkdir()
  (folder / "batches.meta").write_bytes((cifar10[0] / "batches.meta").read_bytes())
  sentinel = tmp_path / "pwned"
  _dump(folder / "test_batch", {b"data": _RunsShell(f"touch {sentinel}"), b"labels": [0]})
  with pytest.raises(ValueError, match=r"test_batch.*refusing to unpickle (posix|nt|os)\.system"):
    load_cifar_archive(folder, "test")
  assert not sentinel.exists()


def test_unknown_split_names_it(cifar100):
  with pytest.raises(ValueError, match=r"'validation'.*'train', 'test'"):
    load_cifar_archive(cifar100[0], "validation")


def test_missing_path_names_it(tmp_path):
  missing = tmp_path / "nowhere" / "cifar-100-python.tar.gz"
  with pytest.raises(FileNotFoundError, match=str(missing)):
    load_cifar_archive(missing, "train")


def test_missing_split_file_names_it(cifar10, tmp_path):
  folder = tmp_path / "cifar-10-batches-py"
  folder.mkdir()
  for name in ("batches.meta", "data_batch_1", "data_batch_2"):
    (folder / name).write_bytes((cifar10[0] / name).read_bytes())
  with pytest.raises(FileNotFoundError, match=r"data_batch_3, data_batch_4, data_batch_5.*'train'"):
    load_cifar_archive(folder, "train")


def test_not_an_archive_names_path(tmp_path):
  (tmp_path / "readme.txt").write_text("hello")
  with pytest.raises(ValueError, match=rf"{tmp_path} is not a CIFAR.*readme\.txt"):
    load_cifar_archive(tmp_path, "train")


# --- download_cifar_archive ---------------------------------------------------


def _md5(path):
  return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def served(cifar100, monkeypatch):
  """Points the cifar100 entry at a small local archive (file:// URL, its md5)."""
  tar = _tar(cifar100[0])
  archive = cifar_archive.Archive(tar.as_uri(), _md5(tar))
  monkeypatch.setitem(cifar_archive.ARCHIVES, "cifar100", archive)
  return tar, archive


def test_download_checks_md5_then_caches(served, cifar100, tmp_path):
  tar, archive = served
  path = download_cifar_archive("cifar100", cache_dir=tmp_path / "cache")
  assert path == tmp_path / "cache" / tar.name
  assert path.read_bytes() == tar.read_bytes()
  assert sorted(p.name for p in path.parent.iterdir()) == [tar.name]  # no leftover .part
  np.testing.assert_array_equal(load_cifar_archive(path, "test").images, cifar100[1]["test"][0])
  tar.unlink()  # a second call must use the cached, md5-checked copy
  assert download_cifar_archive("cifar100", cache_dir=tmp_path / "cache") == path


def test_cache_dir_from_env(served, tmp_path, monkeypatch):
  monkeypatch.setenv("CIFARJAX_CACHE", str(tmp_path / "env_cache"))
  path = download_cifar_archive("cifar100")
  assert path.parent == tmp_path / "env_cache" and path.is_file()


def test_download_md5_mismatch_leaves_nothing(served, tmp_path, monkeypatch):
  tar, archive = served
  wrong = "0" * 32
  monkeypatch.setitem(cifar_archive.ARCHIVES, "cifar100", cifar_archive.Archive(archive.url, wrong))
  cache = tmp_path / "cache"
  expected = rf"md5 {archive.md5}, expected {wrong}.*nothing was saved"
  with pytest.raises(ChecksumError, match=expected):
    download_cifar_archive("cifar100", cache_dir=cache)
  assert list(cache.iterdir()) == []  # neither the archive nor a partial file


def test_corrupt_cached_file_is_refused(served, tmp_path):
  tar, archive = served
  cached = tmp_path / "cache" / tar.name
  cached.parent.mkdir()
  cached.write_bytes(tar.read_bytes()[:-100])  # truncated
  actual = _md5(cached)
  with pytest.raises(ChecksumError) as info:
    download_cifar_archive("cifar100", cache_dir=tmp_path / "cache")
  message = str(info.value)
  assert str(cached) in message and actual in message and archive.md5 in message
  assert "Delete it" in message
  assert cached.read_bytes() == tar.read_bytes()[:-100]  # left for the user to inspect


def test_offline_error_says_how_to_use_a_local_copy(served, tmp_path, monkeypatch):
  def offline(*args, **kwargs):
    raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
  monkeypatch.setattr(cache_lib.urllib.request, "urlopen", offline)
  cache = tmp_path / "cache"
  with pytest.raises(ArchiveUnavailableError, match="name resolution") as info:
    download_cifar_archive("cifar100", cache_dir=cache)
  message = str(info.value)
  assert "--data /path/to/" in message and str(cache / served[0].name) in message
  assert list(cache.iterdir()) == []


def test_official_archives_are_listed():
  assert cifar_archive.ARCHIVES["cifar100"].md5 == "eb9058c3a382ffc7106e4002c42a8d85"
  assert cifar_archive.ARCHIVES["cifar100"].filename == "cifar-100-python.tar.gz"
  assert cifar_archive.ARCHIVES["cifar10"].md5 == "c58f30108f718f92721af3b95e74349a"
  with pytest.raises(ValueError, match="'imagenet'"):
    download_cifar_archive("imagenet")
