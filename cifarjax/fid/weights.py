"""Finding, checking and loading the FID Inception weights.

Accepted files hold pytorch-fid's state dict (`Mixed_5b.branch1x1.conv.weight`,
...): an `.npz` of those arrays, or pytorch-fid's release file
`pt_inception-2015-12-05-6726825d.pth` (read without torch, see torch_file.py).
Where no file is named, `CIFARJAX_FID_WEIGHTS` names one; failing that, the copy
that `install_weights` (`cifarjax fid-weights install PATH`) put in the cache directory
is used, or else the release file is downloaded once into it.
"""

import functools
import os
import pathlib
import pickle
import shutil
import struct
import zipfile
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from cifarjax import cache
from cifarjax.errors import UserError, UserFileNotFoundError, clean_message, writing

WEIGHTS_ENV = "CIFARJAX_FID_WEIGHTS"
WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
               "pt_inception-2015-12-05-6726825d.pth")
WEIGHTS_FILENAME = WEIGHTS_URL.rsplit("/", 1)[1]
# pytorch-fid names its release file after the first 8 hex digits of the file's
# sha256 (torch.hub's convention); that prefix is all there is to check against.
WEIGHTS_SHA256_PREFIX = "6726825d"

# State-dict entries that the pool3 network does not use: the 1008-way logits
# layer, torchvision's auxiliary classifier and BatchNorm's step counters.
IGNORED_PREFIXES = ("fc.", "AuxLogits.")
IGNORED_SUFFIXES = (".num_batches_tracked",)

_TORCH_TO_FLAX = {  # last two torch name parts -> (collection, flax leaf)
    ("conv", "weight"): ("params", "kernel"),
    ("bn", "weight"): ("params", "scale"),
    ("bn", "bias"): ("params", "bias"),
    ("bn", "running_mean"): ("batch_stats", "mean"),
    ("bn", "running_var"): ("batch_stats", "var"),
}
_FLAX_TO_TORCH = {v: k for k, v in _TORCH_TO_FLAX.items()}


def _offline_hint():
  return (f"install a local copy of {WEIGHTS_FILENAME} (or of an .npz with pytorch-fid's "
          f"state-dict keys) once with `cifarjax fid-weights install PATH`, or name it with "
          f"--weights PATH (weights=PATH in Python) or {WEIGHTS_ENV}")


def file_sha256(path) -> str:
  return cache.file_digest(path, "sha256")


def download_weights(dest_dir=None, url=None) -> pathlib.Path:
  """Downloads pytorch-fid's release file into the cache, checking its sha256 prefix."""
  url = url or WEIGHTS_URL
  try:
    return cache.download(url, cache.cache_dir(dest_dir) / WEIGHTS_FILENAME, algorithm="sha256",
                          expected=WEIGHTS_SHA256_PREFIX, offline_hint=f"When offline, {_offline_hint()}")
  except cache.DownloadError as e:
    raise cache.DownloadError(f"no FID Inception weights: {e}") from e


def installed_dir() -> pathlib.Path:
  """Where `install_weights` puts the weights (with their sha256 beside them)."""
  return cache.cache_dir() / "fid-weights"


def _installed() -> pathlib.Path | None:
  """The installed weights, checked against the sha256 recorded when they were installed."""
  folder = installed_dir()
  files = sorted(folder.glob("inception.*")) if folder.is_dir() else []
  if not files:
    return None
  path = files[0]
  recorded = (folder / "sha256").read_text().strip() if (folder / "sha256").is_file() else None
  if recorded != file_sha256(path):
    raise UserError(f"the installed FID weights {path} no longer have the sha256 they were "
                    f"installed with; install them again (`cifarjax fid-weights install PATH`)")
  return path


def install_weights(path, sha256: str | None = None) -> pathlib.Path:
  """Copies a weights file to `installed_dir()`, where every command finds it, once its
  sha256 starts with `sha256` (8 hex digits or more; default pytorch-fid's release
  file's, WEIGHTS_SHA256_PREFIX) and it holds FIDInception's state dict. Returns the
  installed copy; a refused file leaves nothing."""
  path = pathlib.Path(path).expanduser()
  if not path.is_file():
    raise UserFileNotFoundError(f"no such FID weights file: {path}")
  expected = (sha256 or WEIGHTS_SHA256_PREFIX).lower()
  if len(expected) < 8 or any(c not in "0123456789abcdef" for c in expected):
    raise UserError(f"--sha256 wants 8 or more hex digits of the file's sha256, got {sha256!r}")
  digest = file_sha256(path)
  if not digest.startswith(expected):
    other = ("" if sha256 else f": that of pytorch-fid's {WEIGHTS_FILENAME}. For another file "
             f"of its state dict, pass the sha256 its source gives with --sha256")
    raise UserError(f"{path} has sha256 {digest}, not {expected}...{other}")
  variables_from_state_dict(read_state_dict(path), source=str(path))
  folder = installed_dir()
  suffix = ".npz" if path.suffix == ".npz" else ".pth"  # read_state_dict goes by the suffix
  target = folder / f"inception{suffix}"
  with writing(folder):
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{target.name}.part"
    try:
      shutil.copyfile(path, tmp)
      for old in folder.glob("inception.*"):
        old.unlink()
      (folder / "sha256").write_text(digest + "\n")
      os.replace(tmp, target)
    finally:
      tmp.unlink(missing_ok=True)
  return target


def resolve_weights_path(path=None, download: bool = True) -> pathlib.Path:
  """The weights file to use: `path`, else $CIFARJAX_FID_WEIGHTS, else the installed copy
  (`install_weights`), else the cached download (made now where there is none)."""
  if path is not None:
    path = pathlib.Path(path).expanduser()
    if not path.is_file():
      raise UserFileNotFoundError(
          f"FID weights file {path} does not exist; {_offline_hint()}")
    return path
  if os.environ.get(WEIGHTS_ENV):
    path = pathlib.Path(os.environ[WEIGHTS_ENV]).expanduser()
    if not path.is_file():
      raise FileNotFoundError(
          f"{WEIGHTS_ENV}={path} does not exist; point {WEIGHTS_ENV} at a local copy of "
          f"{WEIGHTS_FILENAME} or of an .npz with pytorch-fid's state-dict keys, or unset it to "
          f"download {WEIGHTS_URL}")
    return path
  installed = _installed()
  if installed is not None:
    return installed
  cached = cache.cache_dir() / WEIGHTS_FILENAME
  if cached.is_file():
    if not file_sha256(cached).startswith(WEIGHTS_SHA256_PREFIX):
      raise ValueError(f"cached FID weights {cached} fail their sha256 check; delete the file")
    return cached
  if not download:
    raise FileNotFoundError(f"no FID Inception weights in {cached.parent}; {_offline_hint()}")
  return download_weights()


def load_npz(path, what: str) -> dict[str, np.ndarray]:
  """Every array of an .npz (no pickles); a UserError naming `what` and the file where it
  is truncated, corrupt or not an .npz."""
  with open(path, "rb") as f:
    if f.read(2) != b"PK":  # numpy would take it for a pickle and say so
      raise UserError(f"{what} {path} is not an .npz: an .npz is a zip of numpy arrays, and "
                      f"this file does not start as a zip does")
  try:
    with np.load(path, allow_pickle=False) as npz:
      return {k: npz[k] for k in npz.files}
  except (zipfile.BadZipFile, EOFError, zlib.error, ValueError, OSError) as e:
    raise UserError(f"{what} {path} is not a readable .npz (truncated or corrupt?): "
                    f"{clean_message(e)}") from e


def read_state_dict(path) -> dict[str, np.ndarray]:
  """{torch name: array} from an .npz or a torch.save file (neither runs pickled code)."""
  path = pathlib.Path(path)
  if path.suffix == ".npz":
    state_dict = load_npz(path, "FID weights file")
  else:
    from cifarjax.fid.torch_file import load_torch_state_dict
    try:
      state_dict = load_torch_state_dict(path)
    except (ValueError, pickle.UnpicklingError, EOFError, struct.error, zipfile.BadZipFile,
            KeyError) as e:
      raise UserError(f"FID weights file {path} is not a readable torch.save file "
                      f"(truncated, corrupt or another format): {clean_message(e)}") from e
  if not state_dict:
    raise UserError(f"FID weights file {path} holds no arrays; expected pytorch-fid's "
                    f"{WEIGHTS_FILENAME} or an .npz of its state dict")
  return state_dict


@functools.lru_cache(maxsize=1)
def variable_shapes():
  """The FIDInception variables' shapes: {'params': ..., 'batch_stats': ...}."""
  from cifarjax.fid.inception import FIDInception
  x = jax.ShapeDtypeStruct((1, 299, 299, 3), jnp.float32)
  shapes = jax.eval_shape(
      lambda x: FIDInception().init(jax.random.key(0), x, preprocessed=True), x)
  return jax.tree.map(lambda s: s.shape, shapes)


def _flax_to_torch_shape(leaf, shape):
  return (shape[3], shape[2], shape[0], shape[1]) if leaf == "kernel" else shape


def expected_torch_shapes() -> dict[str, tuple]:
  """{torch state-dict name: shape} that FIDInception needs."""
  out = {}
  for collection, tree in variable_shapes().items():
    for path, shape in jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: isinstance(x, tuple))[0]:
      keys = [p.key for p in path]
      *layer, module, leaf = keys
      torch_module, torch_leaf = _FLAX_TO_TORCH[(collection, leaf)]
      assert module == torch_module, keys
      out[".".join([*layer, module, torch_leaf])] = _flax_to_torch_shape(leaf, tuple(shape))
  return out


def _ignored(name):
  return name.startswith(IGNORED_PREFIXES) or name.endswith(IGNORED_SUFFIXES)


def variables_from_state_dict(state_dict, source="state dict"):
  """pytorch-fid state dict -> FIDInception variables (float32, HWIO kernels).

  Raises a ValueError listing missing, unexpected and misshapen entries.
  """
  expected = expected_torch_shapes()
  missing = sorted(set(expected) - set(state_dict))
  unexpected = sorted(k for k in set(state_dict) - set(expected) if not _ignored(k))
  misshapen = [f"{k}: expected {expected[k]}, got {tuple(np.shape(state_dict[k]))}"
               for k in sorted(set(expected) & set(state_dict))
               if tuple(np.shape(state_dict[k])) != expected[k]]
  problems = []
  for what, items in (("missing", missing), ("unexpected", unexpected), ("misshapen", misshapen)):
    if items:
      more = f" and {len(items) - 5} more" if len(items) > 5 else ""
      problems.append(f"{len(items)} {what} ({'; '.join(items[:5])}{more})")
  if problems:
    raise UserError(f"{source} is not pytorch-fid's FID Inception state dict: "
                     + ", ".join(problems))

  variables = {"params": {}, "batch_stats": {}}
  for name in expected:
    *layer, module, torch_leaf = name.split(".")
    collection, leaf = _TORCH_TO_FLAX[(module, torch_leaf)]
    value = np.asarray(state_dict[name], np.float32)
    if leaf == "kernel":
      value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    node = variables[collection]
    for key in [*layer, module]:
      node = node.setdefault(key, {})
    node[leaf] = value
  return variables


def load_inception_params(path=None, download: bool = True):
  """FIDInception variables from `path` (see `resolve_weights_path` for the default)."""
  path = resolve_weights_path(path, download)
  return variables_from_state_dict(read_state_dict(path), source=str(path))


def random_variables(seed: int = 0):
  """Variables of the right shapes and plausible scales, for benchmarks without weights."""
  rng = np.random.default_rng(seed)
  state_dict = {}
  for name, shape in expected_torch_shapes().items():
    if name.endswith("conv.weight"):
      fan_in = int(np.prod(shape[1:]))
      state_dict[name] = rng.normal(0, np.sqrt(2 / fan_in), shape).astype(np.float32)
    elif name.endswith(("running_var", "bn.weight")):
      state_dict[name] = np.ones(shape, np.float32)
    else:
      state_dict[name] = np.zeros(shape, np.float32)
  return variables_from_state_dict(state_dict, source="random weights")
