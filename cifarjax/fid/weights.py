"""Finding, checking and loading the FID Inception weights.

Accepted files hold pytorch-fid's state dict (`Mixed_5b.branch1x1.conv.weight`,
...): an `.npz` of those arrays, or pytorch-fid's release file
`pt_inception-2015-12-05-6726825d.pth` (read without torch, see torch_file.py).
Where no file is named, `CIFARJAX_FID_WEIGHTS` names one; failing that, the
release file is downloaded once into the cache directory.
"""

import functools
import os
import pathlib
import pickle
import struct
import zipfile
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from cifarjax import cache
from cifarjax.errors import UserError, UserFileNotFoundError, clean_message

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
  return (f"pass --weights PATH (weights=PATH in Python) or set {WEIGHTS_ENV} to a local copy of "
          f"{WEIGHTS_FILENAME} or of an .npz with pytorch-fid's state-dict keys")


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


def resolve_weights_path(path=None, download: bool = True) -> pathlib.Path:
  """The weights file to use: `path`, else $CIFARJAX_FID_WEIGHTS, else the cached download."""
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
