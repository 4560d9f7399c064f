"""Reads a PyTorch `torch.save` state dict into numpy arrays without torch.

Two layouts exist: the zip format (torch >= 1.6: `<name>/data.pkl` plus one raw
little-endian storage per `<name>/data/<key>`) and the legacy stream (torch <
1.6: pickled magic number, protocol, sys info, the object pickle, the storage
key list, then each storage as an int64 element count and its raw bytes).

Both hold pickles, and unpickling runs whatever globals a pickle names, so a
downloaded file is never given to `pickle.load`. `_RestrictedUnpickler` resolves
only the handful of globals a state dict needs, each to a local stand-in that
builds numpy arrays, and refuses everything else.
"""

import collections
import io
import pickle
import struct
import zipfile

import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

# torch storage class name -> numpy dtype (little-endian, as torch writes them).
STORAGE_DTYPES = {
    "FloatStorage": "<f4", "DoubleStorage": "<f8", "HalfStorage": "<f2",
    "BFloat16Storage": "<u2",  # raw bits; not used by the FID weights
    "LongStorage": "<i8", "IntStorage": "<i4", "ShortStorage": "<i2",
    "CharStorage": "i1", "ByteStorage": "u1", "BoolStorage": "?",
}


class UnsafePickleError(pickle.UnpicklingError):
  """A pickle asked for a global outside the state-dict allow-list."""


class _StorageType:
  """Stands in for torch.<X>Storage: only carries the dtype."""

  def __init__(self, name):
    self.name = name
    self.dtype = np.dtype(STORAGE_DTYPES[name])


class _Storage:
  """A flat typed buffer, filled when its bytes are read."""

  def __init__(self, dtype, numel):
    self.dtype, self.numel, self.array = dtype, numel, None


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
  """Stand-in for torch._utils._rebuild_tensor_v2: a lazy strided view of a storage."""
  del requires_grad, backward_hooks, metadata
  return _TensorRef(storage, storage_offset, tuple(size), tuple(stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
  del requires_grad, backward_hooks
  return data


class _TensorRef:
  """A tensor whose storage bytes may not be read yet (legacy files store them last)."""

  def __init__(self, storage, offset, size, stride):
    self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

  def to_numpy(self) -> np.ndarray:
    flat = self.storage.array
    if flat is None:
      raise ValueError("tensor storage was never read: truncated or corrupt torch file")
    if not self.size:
      return flat[self.offset].copy()
    need = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride)) + 1
    if any(n == 0 for n in self.size):
      return np.zeros(self.size, flat.dtype)
    if need > flat.size or self.offset < 0 or min(self.stride) < 0:
      raise ValueError(f"tensor of size {self.size} stride {self.stride} offset {self.offset} "
                       f"overruns its storage of {flat.size} elements: corrupt torch file")
    item = flat.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        flat[self.offset:], self.size, tuple(s * item for s in self.stride), writeable=False)
    return np.array(view)  # own, contiguous copy


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
}


class _RestrictedUnpickler(pickle.Unpickler):
  """Resolves only the allow-listed globals; `persistent_load` builds storages."""

  def __init__(self, file, storage_loader):
    super().__init__(file, encoding="utf-8")
    self._storage_loader = storage_loader

  def find_class(self, module, name):
    if module == "torch" and name in STORAGE_DTYPES:
      return _StorageType(name)
    if (module, name) in _ALLOWED:
      return _ALLOWED[(module, name)]
    raise UnsafePickleError(
        f"refusing to load global {module}.{name}: not part of a plain PyTorch state dict "
        f"(the file may be malicious or not a weights file)")

  def persistent_load(self, pid):
    if not isinstance(pid, tuple) or not pid:
      raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
    kind = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
    if kind != "storage":
      raise UnsafePickleError(f"refusing persistent id of kind {kind!r}")
    return self._storage_loader(pid[1:])


def _unpickle(data_or_file, storage_loader):
  f = io.BytesIO(data_or_file) if isinstance(data_or_file, bytes) else data_or_file
  return _RestrictedUnpickler(f, storage_loader).load()


def _check_storage_type(storage_type):
  if not isinstance(storage_type, _StorageType):
    raise pickle.UnpicklingError(
        f"storage type must be a torch storage class, got {storage_type!r}")
  return storage_type


def _load_zip(path):
  with zipfile.ZipFile(path) as zf:
    pkls = [n for n in zf.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
    if len(pkls) != 1:
      raise ValueError(f"{path} is a zip but not a torch.save file (no single <name>/data.pkl)")
    prefix = pkls[0][:-len("data.pkl")]
    byteorder = prefix + "byteorder"
    if byteorder in zf.namelist() and zf.read(byteorder).strip() != b"little":
      raise ValueError(f"{path}: big-endian torch files are not supported")
    storages = {}

    def load_storage(args):
      storage_type, key, _location, numel = args[:4]
      dtype = _check_storage_type(storage_type).dtype
      if key not in storages:
        raw = zf.read(f"{prefix}data/{key}")
        storage = _Storage(dtype, numel)
        storage.array = np.frombuffer(raw, dtype, count=len(raw) // dtype.itemsize)
        storages[key] = storage
      return storages[key]

    return _unpickle(zf.read(pkls[0]), load_storage)


def _load_legacy(path):
  with open(path, "rb") as f:
    def no_storage(args):
      raise pickle.UnpicklingError("storage reference outside the state dict pickle")

    def meta():
      return _unpickle(f, no_storage)
    try:
      magic, protocol = meta(), meta()
    except Exception as e:
      raise ValueError(f"{path} is neither a torch.save zip nor a legacy torch file: {e}") from e
    if magic != LEGACY_MAGIC or protocol != LEGACY_PROTOCOL:
      raise ValueError(f"{path} is not a torch.save file (bad magic number or protocol)")
    meta()  # sys info: byte order and type sizes of the saving machine
    storages = {}

    def load_storage(args):
      storage_type, key, _location, numel, view = args
      if view is not None:
        raise ValueError(f"{path}: storage views are not supported")
      dtype = _check_storage_type(storage_type).dtype
      return storages.setdefault(key, _Storage(dtype, numel))

    result = _unpickle(f, load_storage)
    for key in meta():
      storage = storages[key]
      (count,) = struct.unpack("<q", f.read(8))
      raw = f.read(count * storage.dtype.itemsize)
      if count != storage.numel or len(raw) != count * storage.dtype.itemsize:
        raise ValueError(f"{path}: storage {key} is truncated or of the wrong size")
      storage.array = np.frombuffer(raw, storage.dtype)
  return result


def load_torch_state_dict(path) -> dict[str, np.ndarray]:
  """{name: numpy array} from a PyTorch state-dict file, without torch or plain pickle."""
  obj = _load_zip(path) if zipfile.is_zipfile(path) else _load_legacy(path)
  if not isinstance(obj, dict):
    raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
  out = {}
  for name, value in obj.items():
    if not isinstance(value, _TensorRef):
      raise ValueError(f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor")
    out[str(name)] = value.to_numpy().astype(value.storage.dtype.newbyteorder("="), copy=False)
  return out
