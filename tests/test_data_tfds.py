"""CIFAR through tensorflow-datasets (mocked), and load_cifar's fallback.

tfds.testing.mock_data patches tfds.data_source without TensorFlow. With its
default policy it takes the features from the builder code, where CIFAR's
class names are only '0'..'99' (tfds fills in the real names while preparing,
and this tfds wheel ships no metadata); so the tests write the metadata that
preparing would (dataset_info.json, label files) and mock with USE_FILES.
"""

import hashlib
import importlib.util
import pickle
import tarfile

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")
from tensorflow_datasets.testing import mocking  # noqa: E402

from cifarjax.data import cifar_archive, tfds_source  # noqa: E402
from cifarjax.data.tfds_source import TfdsUnavailableError, load_cifar, load_tfds  # noqa: E402

CIFAR100_FINE = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle",
    "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle",
    "caterpillar", "cattle", "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch",
    "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox",
    "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion",
    "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom",
    "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road",
    "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake",
    "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank",
    "telephone", "television", "tiger", "tractor", "train", "trout", "tulip", "turtle",
    "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm")
CIFAR100_COARSE = (
    "aquatic_mammals", "fish", "flowers", "food_containers", "fruit_and_vegetables",
    "household_electrical_devices", "household_furniture", "insects", "large_carnivores",
    "large_man-made_outdoor_things", "large_natural_outdoor_scenes",
    "large_omnivores_and_herbivores", "medium_mammals", "non-insect_invertebrates", "people",
    "reptiles", "small_mammals", "trees", "vehicles_1", "vehicles_2")
CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                 "ship", "truck")
NAMES = {"cifar100": {"label": CIFAR100_FINE, "coarse_label": CIFAR100_COARSE},
         "cifar10": {"label": CIFAR10_NAMES}}
NUM_EXAMPLES = 7


def _write_metadata(data_dir, name):
  """Writes the metadata tfds would leave after preparing `name` as ArrayRecord."""
  builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
  for feature, names in NAMES[name].items():
    builder.info.features[feature].names = list(names)
  template = tfds.core.ShardedFileTemplate(
      data_dir=builder.data_dir, dataset_name=name, filetype_suffix="array_record")
  builder.info.set_splits(tfds.core.SplitDict([
      tfds.core.SplitInfo(name=split, shard_lengths=[n], num_bytes=0,
                          filename_template=template.replace(split=split))
      for split, n in (("train", 50000), ("test", 10000))]))
  builder.data_path.mkdir(parents=True)
  builder.info.write_to_directory(builder.data_dir)


@pytest.fixture(scope="module")
def metadata_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds_metadata")
  for name in NAMES:
    _write_metadata(data_dir, name)
  return data_dir


def _fixed_getitems(*args, generator, serialized=False):
  """mocking._getitems, callable as the mock calls it.

  tfds 4.9.10's mock stores functools.partial(_getitems, generator=...) as the
  mock data source's `__getitems__`; MagicMock does not bind it (it is no magic
  method it knows), so the keys land in `self` and every batched read fails
  with "missing 1 required positional argument: 'record_keys'".
  """
  assert not serialized
  return [generator[key] for key in args[-1]]


@pytest.fixture
def mocked(metadata_dir, monkeypatch):
  monkeypatch.setattr(mocking, "_getitems", _fixed_getitems)
  with tfds.testing.mock_data(num_examples=NUM_EXAMPLES, policy=tfds.testing.MockPolicy.USE_FILES,
                              data_dir=str(metadata_dir)):
    yield


@pytest.mark.parametrize("split", ["train", "test"])
def test_cifar100_from_tfds(mocked, split):
  data = load_tfds("cifar100", split)
  assert data.images.shape == (NUM_EXAMPLES, 32, 32, 3) and data.images.dtype == np.uint8
  assert data.labels.shape == (NUM_EXAMPLES,) and data.labels.dtype == np.int32
  assert data.labels.min() >= 0 and data.labels.max() < 100
  assert data.class_names == CIFAR100_FINE and len(data.class_names) == 100
  assert data.coarse_labels is not None and data.coarse_labels.dtype == np.int32
  assert data.coarse_labels.min() >= 0 and data.coarse_labels.max() < 20
  assert data.coarse_class_names == CIFAR100_COARSE


def test_cifar10_from_tfds(mocked):
  data = load_tfds("cifar10", "test")
  assert data.images.shape == (NUM_EXAMPLES, 32, 32, 3)
  assert data.class_names == CIFAR10_NAMES
  assert data.labels.max() < 10
  assert data.coarse_labels is None and data.coarse_class_names is None


def test_batched_read_matches_records(mocked, monkeypatch):
  monkeypatch.setattr(tfds_source, "_BATCH", 3)  # 7 records: batches of 3, 3, 1
  data = load_tfds("cifar100", "train")
  source = tfds.data_source("cifar100", split="train", download=False)
  for i in range(NUM_EXAMPLES):
    record = source[i]
    np.testing.assert_array_equal(data.images[i], record["image"])
    assert data.labels[i] == record["label"] and data.coarse_labels[i] == record["coarse_label"]


def test_load_cifar_prefers_tfds(mocked, monkeypatch):
  def no_download(*args, **kwargs):
    raise AssertionError("the archive must not be fetched when tfds serves the data")
  monkeypatch.setattr(cifar_archive, "download_cifar_archive", no_download)
  assert load_cifar("cifar100", "test").class_names == CIFAR100_FINE


def test_not_prepared_without_tensorflow_is_a_clear_error(tmp_path):
  expected = rf"no prepared cifar100 in {tmp_path}.*TensorFlow"
  with pytest.raises(TfdsUnavailableError, match=expected):
    load_tfds("cifar100", "train", data_dir=tmp_path, download=False)


def test_unknown_name_or_split():
  with pytest.raises(ValueError, match="'mnist'"):
    load_tfds("mnist", "train")
  with pytest.raises(ValueError, match="'validation'"):
    load_cifar("cifar100", "validation")


def _small_cifar100_tar(tmp_path, images, labels):
  folder = tmp_path / "cifar-100-python"
  folder.mkdir()
  meta = {b"fine_label_names": [n.encode() for n in CIFAR100_FINE],
          b"coarse_label_names": [n.encode() for n in CIFAR100_COARSE]}
  (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
  batch = {b"data": images.transpose(0, 3, 1, 2).reshape(len(images), -1),
           b"fine_labels": labels, b"coarse_labels": [label // 5 for label in labels]}
  for split in ("train", "test"):
    (folder / split).write_bytes(pickle.dumps(batch, protocol=2))
  tar = tmp_path / "cifar-100-python.tar.gz"
  with tarfile.open(tar, "w:gz") as f:
    f.add(folder, arcname=folder.name)
  return tar


def test_load_cifar_falls_back_to_the_archive(tmp_path, monkeypatch):
  # No TensorFlow and nothing prepared: tfds cannot serve cifar100 here.
  monkeypatch.setattr(tfds_source, "tensorflow_available", lambda: False)
  images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
  tar = _small_cifar100_tar(tmp_path, images, [0, 42, 99, 7])
  md5 = hashlib.md5(tar.read_bytes()).hexdigest()
  monkeypatch.setitem(cifar_archive.ARCHIVES, "cifar100", cifar_archive.Archive(tar.as_uri(), md5))
  data = load_cifar("cifar100", "train", data_dir=tmp_path / "tfds", cache_dir=tmp_path / "cache")
  np.testing.assert_array_equal(data.images, images)
  assert data.labels.tolist() == [0, 42, 99, 7] and data.class_names == CIFAR100_FINE
  assert (tmp_path / "cache" / tar.name).is_file()


def test_load_cifar_falls_back_when_tfds_is_missing(tmp_path, monkeypatch):
  def no_tfds(*args, **kwargs):
    raise ImportError("No module named 'tensorflow_datasets'")
  monkeypatch.setattr(tfds_source, "load_tfds", no_tfds)
  images = np.zeros((1, 32, 32, 3), np.uint8)
  tar = _small_cifar100_tar(tmp_path, images, [5])
  monkeypatch.setattr(cifar_archive, "download_cifar_archive", lambda name, cache_dir: tar)
  assert load_cifar("cifar100", "test").labels.tolist() == [5]


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is not None,
                    reason="documents tfds without TensorFlow; TensorFlow is installed")
def test_tfds_cannot_prepare_cifar_without_tensorflow(tmp_path, monkeypatch):
  # Why load_cifar falls back: even with the binary archive at hand (faked
  # here, 2 records), tfds's cifar100 builder needs TensorFlow to prepare it
  # (tf.io.gfile to read, tf.image.encode_png to store).
  extracted = tmp_path / "extracted"
  binary = extracted / "cifar-100-binary"
  binary.mkdir(parents=True)
  (binary / "fine_label_names.txt").write_text("\n".join(CIFAR100_FINE))
  (binary / "coarse_label_names.txt").write_text("\n".join(CIFAR100_COARSE))
  for name in ("train.bin", "test.bin"):
    (binary / name).write_bytes(bytes(2 * (2 + 3072)))
  monkeypatch.setattr("tensorflow_datasets.core.download.DownloadManager.download_and_extract",
                      lambda self, url: str(extracted))
  builder = tfds.builder("cifar100", data_dir=tmp_path / "tfds", file_format="array_record")
  # Where etils' optional importlib_resources is missing too (as in this
  # venv), tfds stops on that import first, before it reaches TensorFlow.
  with pytest.raises(ImportError, match="'(tensorflow|importlib_resources)'"):
    builder.download_and_prepare()
  assert not builder.is_prepared()
