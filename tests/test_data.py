import io
import zipfile

import numpy as np
import pytest
from PIL import Image

from cifarjax.data import Split, holdout_indices, load_split, with_class_order
from cifarjax.data.synthetic import load_synthetic

CLASSES = ("cat", "airplane", "dog")  # not sorted: the loader must sort them


def _png(array):
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format="PNG")
  return buf.getvalue()


def _tree(splits=("train",), per_class=4, size=32):
  """{relative path: (png bytes, image, class)} of a small `<split>/<class>/<file>` tree."""
  rng = np.random.default_rng(0)
  tree = {}
  for split in splits:
    for cls in CLASSES:
      for i in range(per_class):
        image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        tree[f"{split}/{cls}/{i:04d}.png"] = (_png(image), image, cls)
  return tree


@pytest.fixture(params=["folder", "zip"])
def image_source(request, tmp_path):
  tree = _tree(splits=("train", "test"))
  if request.param == "zip":
    path = tmp_path / "images.zip"
    with zipfile.ZipFile(path, "w") as zf:
      for name, (data, _, _) in tree.items():
        zf.writestr(f"top/{name}", data)  # zips of a folder carry its name first
  else:
    path = tmp_path / "images"
    for name, (data, _, _) in tree.items():
      (path / name).parent.mkdir(parents=True, exist_ok=True)
      (path / name).write_bytes(data)
  return path, tree


def test_image_folder_round_trip(image_source):
  path, tree = image_source
  for split in ("train", "test"):
    data = load_split(str(path), split)
    assert data.class_names == ("airplane", "cat", "dog")
    assert data.images.dtype == np.uint8 and data.images.shape == (12, 32, 32, 3)
    expected = [(img, cls) for name, (_, img, cls) in sorted(tree.items(), key=lambda kv: (kv[1][2], kv[0]))
                if name.startswith(split)]
    for i, (img, cls) in enumerate(expected):
      np.testing.assert_array_equal(data.images[i], img)
      assert data.class_names[data.labels[i]] == cls


def test_missing_test_split_is_a_deterministic_disjoint_holdout(tmp_path):
  path = tmp_path / "train_only.zip"
  with zipfile.ZipFile(path, "w") as zf:
    for name, (data, _, _) in _tree(per_class=10).items():
      zf.writestr(name, data)
  train = load_split(str(path), "train", holdout=6)
  test = load_split(str(path), "test", holdout=6)
  assert len(train) == 24 and len(test) == 6
  rows = lambda d: {d.images[i].tobytes() for i in range(len(d))}
  assert not rows(train) & rows(test)
  again = load_split(str(path), "validation", holdout=6)
  np.testing.assert_array_equal(again.images, test.images)


def test_holdout_indices():
  keep, held = holdout_indices(100, 10)
  assert len(keep) == 90 and len(held) == 10
  assert set(keep).isdisjoint(held) and set(keep) | set(held) == set(range(100))
  with pytest.raises(ValueError, match="holdout must be in"):
    holdout_indices(10, 10)


def test_real_cifar10_jpeg_zip_layout(cifar10_zip_path):
  # Only the listing: decoding all 50,000 JPEGs belongs to training runs, not the suite.
  from cifarjax.data.image_folder import image_folder_splits
  assert image_folder_splits(cifar10_zip_path) == ("train",)


def test_synthetic_is_deterministic_and_class_dependent():
  a, b = load_synthetic("train"), load_synthetic("train")
  np.testing.assert_array_equal(a.images, b.images)
  assert a.images.shape == (2560, 32, 32, 3) and a.num_classes == 10
  means = np.stack([a.images[a.labels == c].mean(axis=(0, 1, 2)) for c in range(10)])
  assert np.ptp(means, axis=0).max() > 30  # classes differ in colour


def test_with_class_order_matches_by_name():
  data = Split(images=np.zeros((3, 2, 2, 3), np.uint8), labels=np.array([0, 1, 2], np.int32),
               class_names=("b", "c", "a"))
  mapped = with_class_order(data, ("a", "b", "c", "d"))
  assert mapped.labels.tolist() == [1, 2, 0]
  with pytest.raises(ValueError, match=r"\['x'\].*not among"):
    with_class_order(Split(data.images, data.labels, ("b", "c", "x")), ("a", "b", "c"))


@pytest.mark.parametrize("source, error, match", [
    ("nonsense", FileNotFoundError, "unknown data source 'nonsense'"),
    ("/no/such/archive.tar.gz", FileNotFoundError, "no such file"),
])
def test_unknown_sources(source, error, match):
  with pytest.raises(error, match=match):
    load_split(source, "train")


def test_unknown_split(image_source):
  path, _ = image_source
  with pytest.raises(ValueError, match="no split 'extra'"):
    load_split(str(path), "extra")


def test_images_of_different_sizes(tmp_path):
  path = tmp_path / "mixed"
  for i, size in enumerate((8, 9)):
    (path / "train" / "a").mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((size, size, 3), np.uint8)).save(path / "train" / "a" / f"{i}.png")
  with pytest.raises(ValueError, match="differ in size"):
    load_split(str(path), "train")


def test_undecodable_image(tmp_path):
  path = tmp_path / "bad" / "train" / "a"
  path.mkdir(parents=True)
  (path / "0.png").write_bytes(b"not a png")
  with pytest.raises(ValueError, match="cannot decode image .*0.png"):
    load_split(str(tmp_path / "bad"), "train")


@pytest.mark.parametrize("images, match", [
    (np.zeros((2, 4, 4, 3), np.float32), "uint8"),
    (np.zeros((2, 4, 4), np.uint8), r"\(N, H, W, 3\)"),
    (np.zeros((2, 4, 4, 1), np.uint8), r"\(N, H, W, 3\)"),
])
def test_split_rejects_bad_images(images, match):
  with pytest.raises(ValueError, match=match):
    Split(images=images, labels=np.zeros(2, np.int32), class_names=("a",))


def test_split_rejects_bad_labels():
  with pytest.raises(ValueError, match=r"lie in \[0, 2\)"):
    Split(images=np.zeros((2, 4, 4, 3), np.uint8), labels=np.array([0, 5]), class_names=("a", "b"))


def test_an_image_source_is_decoded_once_until_it_changes(image_source, monkeypatch, tmp_path):
  """The second load of a zip or folder (in a later command: the in-process cache cleared)
  reads the decoded arrays back; a copy or a touch decodes nothing, an edit decodes again."""
  import os
  import shutil
  from cifarjax import data as data_lib
  from cifarjax.data import decode_cache, image_folder
  monkeypatch.setenv("CIFARJAX_CACHE", str(tmp_path / "cache"))
  path, _ = image_source
  decoded = []
  decode = image_folder.decode_image
  monkeypatch.setattr(image_folder, "decode_image",
                      lambda raw, name: decoded.append(name) or decode(raw, name))

  def load(source):
    data_lib._load_native.cache_clear()  # what a new process starts with
    decoded.clear()
    return load_split(str(source), "train")

  first = load(path)
  assert len(decoded) == 12
  again = load(path)
  assert decoded == []
  for a, b in ((first.images, again.images), (first.labels, again.labels)):
    np.testing.assert_array_equal(a, b)
    assert a.dtype == b.dtype
  assert again.class_names == first.class_names == ("airplane", "cat", "dog")
  (cached,) = (tmp_path / "cache" / "decoded").iterdir()
  assert cached == decode_cache.cache_file(path, "train")

  if path.is_dir():
    edited = next(path.rglob("*.png"))
    later = edited.stat().st_mtime_ns + 10**9
    os.utime(edited, ns=(later, later))  # a folder's key is its listing: mtimes count
    load(path)
    assert len(decoded) == 12
  else:
    os.utime(path, ns=(1, 10**18))  # a zip's key is its bytes: a touch alone is no change
    copy = shutil.copy(path, tmp_path / "copy.zip")
    load(copy)
    assert decoded == []
    with zipfile.ZipFile(path, "a") as zf:
      zf.writestr("top/train/cat/9999.png", _png(np.zeros((32, 32, 3), np.uint8)))
    assert len(load(path)) == 13 and len(decoded) == 13


def test_a_cache_that_cannot_be_written_costs_only_time(image_source, monkeypatch, tmp_path):
  from cifarjax import data as data_lib
  blocked = tmp_path / "not-a-folder"
  blocked.write_text("the cache folder's place is taken")
  monkeypatch.setenv("CIFARJAX_CACHE", str(blocked))
  data_lib._load_native.cache_clear()
  path, _ = image_source
  assert len(load_split(str(path), "train")) == 12
