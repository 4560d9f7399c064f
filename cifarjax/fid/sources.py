"""FID sources: image sets or precomputed statistics, named by one string.

A source is
  - a stats `.npz` with `mu` and `sigma` (as `fid-stats` and pytorch-fid write);
  - an `.npz` with a uint8 NHWC `images` array;
  - a dataset name the data layer knows (cifar100, cifar10, synthetic), with a split;
  - a CIFAR archive (cifar-*-python folder or .tar.gz), read by the data layer;
  - any folder or `.zip` of images, searched recursively in sorted path order,
    decoded with PIL `convert('RGB')` as pytorch-fid does; no labels needed.
"""

import pathlib
import zipfile

import numpy as np

from cifarjax import cache
from cifarjax.data import DATASET_NAMES, decode_cache, is_cifar_archive
from cifarjax.data.image_folder import IMAGE_SUFFIXES, decode_members
from cifarjax.errors import UserError, UserFileNotFoundError, clean_message, note, writing
from cifarjax.fid import features as features_lib
from cifarjax.fid import stats as stats_lib
from cifarjax.fid import weights as weights_lib

def _stack(images, names, where) -> np.ndarray:
  if not images:
    raise UserError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {where}")
  first = images[0].shape
  for im, name in zip(images, names):
    if im.shape != first:
      raise UserError(f"images under {where} differ in size: {names[0]} is {first[1]}x{first[0]}, "
                       f"{name} is {im.shape[1]}x{im.shape[0]}; FID needs one size")
  return np.stack(images).astype(np.uint8)


def read_images(path) -> np.ndarray:
  """uint8 (N, H, W, 3) of every image in a folder or .zip, recursively, sorted by path;
  decoded once per machine (`decode_cache`)."""
  path = pathlib.Path(path)
  if not path.exists():
    raise UserFileNotFoundError(f"no such folder or zip of images: {path}")
  if not path.is_dir() and not zipfile.is_zipfile(path):
    if path.suffix.lower() == ".zip":
      raise UserError(f"{path} is not a readable zip archive (truncated or corrupt?)")
    raise UserError(f"{path} is neither a folder nor a .zip of images")
  return decode_cache.cached(path, "all-images", lambda: {"images": _decode_all(path)})["images"]


def _decode_all(path: pathlib.Path) -> np.ndarray:
  if path.is_dir():
    names = sorted(p.relative_to(path).as_posix() for p in path.rglob("*")
                   if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
  else:
    try:
      with zipfile.ZipFile(path) as zf:
        names = sorted(n for n in zf.namelist()
                       if not n.endswith("/") and pathlib.PurePosixPath(n).suffix.lower()
                       in IMAGE_SUFFIXES)
    except (zipfile.BadZipFile, EOFError) as e:
      raise UserError(f"{path} is not a readable zip archive (truncated or corrupt?): "
                      f"{clean_message(e)}") from e
  note(f"decoding the {len(names):,} images of {path}; once: they are cached")
  return _stack(decode_members(path, names), names, path)


def load_source(source, split: str = "train"):
  """("stats", (mu, sigma)) or ("images", uint8 NHWC array) for a source string or array."""
  if isinstance(source, np.ndarray):
    return "images", source
  source = str(source)
  if source in DATASET_NAMES:
    from cifarjax.data import load_split  # lazy: the data layer is heavy (tfds)
    return "images", load_split(source, split, image_size=None).images
  path = pathlib.Path(source).expanduser()
  if not path.exists():
    raise UserFileNotFoundError(
        f"FID source {source!r} is not a dataset name ({', '.join(DATASET_NAMES)}) nor an "
        f"existing .npz, folder or .zip of images")
  if path.suffix == ".npz":
    npz = weights_lib.load_npz(path, "FID source")
    if "mu" in npz and "sigma" in npz:
      return "stats", (npz["mu"].astype(np.float64), npz["sigma"].astype(np.float64))
    if "images" in npz:
      return "images", npz["images"]
    raise UserError(f"{path} holds neither FID statistics (mu, sigma) nor images "
                    f"(a uint8 'images' array); it has {', '.join(npz) or 'nothing'}")
  if is_cifar_archive(path):
    from cifarjax.data import load_split
    return "images", load_split(str(path), split, image_size=None).images
  return "images", read_images(path)


def stats_from_images(images, variables, batch_size=features_lib.DEFAULT_BATCH_SIZE, mesh=None,
                      progress=True, desc="FID features"):
  """(mu, sigma) float64 of the pool3 features of uint8 NHWC images."""
  acts = features_lib.extract_features(images, variables, batch_size, mesh, progress, desc=desc)
  return stats_lib.activation_statistics(acts)


def as_variables(weights):
  """FIDInception variables from a weights path, None (the default file) or variables."""
  if isinstance(weights, dict):
    return weights
  return weights_lib.load_inception_params(weights)


def _checked(loaded, source):
  """A loaded source, refused (before any features are computed) where it holds fewer
  images than a covariance needs."""
  kind, value = loaded
  if kind == "images" and len(value) < 2:
    raise UserError(f"FID needs at least 2 images; {source} holds {len(value)}")
  return loaded


def _stats(loaded, variables_box, weights, batch_size, mesh, progress):
  kind, value = loaded
  if kind == "stats":
    return value
  if not variables_box:  # weights are read once, and only where images need them
    variables_box.append(as_variables(weights))
  return stats_from_images(value, variables_box[0], batch_size, mesh, progress)


def stats_from_source(source, split: str = "train", weights=None,
                      batch_size=features_lib.DEFAULT_BATCH_SIZE, mesh=None, progress=True):
  """(mu, sigma) of a source (see the module docstring); `weights` as in `as_variables`."""
  loaded = _checked(load_source(source, split), source)
  return _stats(loaded, [], weights, batch_size, mesh, progress)


def fid_from_sources(source_a, source_b, split: str = "train", weights=None,
                     batch_size=features_lib.DEFAULT_BATCH_SIZE, mesh=None,
                     progress=True) -> float:
  """FID between two sources (image sets or stats files), as `python -m pytorch_fid A B`."""
  a, b = (_checked(load_source(s, split), s) for s in (source_a, source_b))
  box = []
  mu1, sigma1 = _stats(a, box, weights, batch_size, mesh, progress)
  mu2, sigma2 = _stats(b, box, weights, batch_size, mesh, progress)
  return stats_lib.frechet_distance(mu1, sigma1, mu2, sigma2)


def compute_fid(images, reference, weights=None, batch_size=features_lib.DEFAULT_BATCH_SIZE,
                mesh=None, progress=True) -> float:
  """FID of uint8 NHWC `images` against `reference`: images, (mu, sigma), or a source string."""
  mine = _checked(("images", images), "the images given")
  ref = (("stats", reference) if isinstance(reference, tuple)
         else _checked(load_source(reference), reference))
  box = []
  mu1, sigma1 = _stats(mine, box, weights, batch_size, mesh, progress)
  mu2, sigma2 = _stats(ref, box, weights, batch_size, mesh, progress)
  return stats_lib.frechet_distance(mu1, sigma1, mu2, sigma2)


def _source_key(dataset: str) -> str:
  """Cache-file stem for a dataset name, or for a path: what it holds (a file's sha256, a
  folder's listing), as the decode cache keys it, so that a copy of the data, or the same zip
  provisioned again with a new mtime, finds the statistics computed once."""
  if dataset in DATASET_NAMES:
    return dataset
  path = pathlib.Path(dataset).expanduser().resolve()
  safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in path.name)
  return f"{safe}-{decode_cache.source_key(path)[:12]}"


def reference_stats_path(dataset: str, split: str, weights_sha256: str) -> pathlib.Path:
  return (cache.cache_dir() / "fid_stats"
          / f"{_source_key(dataset)}-{split}-{weights_sha256[:16]}.npz")


def reference_stats(dataset: str = "cifar100", split: str = "train", weights=None,
                    batch_size=features_lib.DEFAULT_BATCH_SIZE, mesh=None, progress=True):
  """(mu, sigma) of a dataset split or any FID source, computed once per machine and cached.

  The cache file (in `cifarjax.cache.cache_dir()/fid_stats`) is keyed by the dataset, the split
  and the weights file's sha256, so other weights never reuse stale statistics. A stats
  `.npz` (mu, sigma) is used as it is: neither copied nor cached. Says (`errors.note`)
  which statistics it uses, and when it computes them.
  """
  loaded = None
  if isinstance(dataset, (str, pathlib.PurePath)) and pathlib.Path(dataset).suffix == ".npz":
    loaded = load_source(dataset, split)
    if loaded[0] == "stats":
      note(f"FID reference: the statistics in {dataset}, used as they are")
      return loaded[1]
  path = weights_lib.resolve_weights_path(weights)
  cached = reference_stats_path(str(dataset), split, weights_lib.file_sha256(path))
  if cached.is_file():
    note(f"FID reference: {dataset} ({split}), its statistics cached in {cached}")
    with np.load(cached, allow_pickle=False) as npz:
      return npz["mu"], npz["sigma"]
  note(f"FID reference: {dataset} ({split}); computing its statistics once, cached in {cached}")
  if loaded is not None:  # an .npz of images, already read
    mu, sigma = _stats(loaded, [], path, batch_size, mesh, progress)
  else:
    mu, sigma = stats_from_source(dataset, split, weights=path, batch_size=batch_size, mesh=mesh,
                                  progress=progress)
  save_stats(cached, mu, sigma)
  return mu, sigma


def training_reference_stats(data: str, holdout: int, weights=None,
                             batch_size=features_lib.DEFAULT_BATCH_SIZE, mesh=None,
                             progress=True):
  """(mu, sigma) of the images a generator trained on: `load_split(data, "train",
  holdout=holdout)`, so where the source has no test split the held-out slice stays out
  of the reference. Cached as `reference_stats` (keyed by the holdout too)."""
  path = weights_lib.resolve_weights_path(weights)
  # Datasets and CIFAR archives have a test split: their train split is all of train.
  whole = data in DATASET_NAMES or is_cifar_archive(pathlib.Path(data).expanduser())
  split = "train" if whole else f"train-holdout{holdout}"
  cached = reference_stats_path(data, split, weights_lib.file_sha256(path))
  if cached.is_file():
    note(f"FID reference: the training images of {data}, their statistics cached in {cached}")
    with np.load(cached, allow_pickle=False) as npz:
      return npz["mu"], npz["sigma"]
  from cifarjax.data import load_split
  note(f"FID reference: loading the training images of {data}")
  images = load_split(data, "train", holdout=holdout).images
  held_out = "" if whole else f" (the {holdout:,} held out for testing left out)"
  note(f"FID reference: the {len(images):,} training images of {data}{held_out}; computing "
       f"their statistics once, cached in {cached}")
  mu, sigma = stats_from_images(images, as_variables(path), batch_size, mesh, progress,
                                desc="FID reference")
  save_stats(cached, mu, sigma)
  return mu, sigma


def save_stats(path, mu, sigma):
  """Writes `mu` and `sigma` to an .npz (atomically: concurrent readers see whole files)."""
  path = pathlib.Path(path)
  tmp = path.with_name(path.name + ".part.npz")
  try:
    with writing(path):
      path.parent.mkdir(parents=True, exist_ok=True)
      np.savez(tmp, mu=mu, sigma=sigma)
      tmp.replace(path)
  finally:
    tmp.unlink(missing_ok=True)
