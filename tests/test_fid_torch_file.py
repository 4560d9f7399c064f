"""The torch-free .pth reader and the weights loader's errors, on files the tests build."""

import collections
import contextlib
import io
import os
import pickle
import struct
import sys
import types
import zipfile

import numpy as np
import pytest

from cifarjax.fid import torch_file
from cifarjax.fid import weights as weights_lib


class _Storage:
  def __init__(self, key, array):
    self.key, self.array = key, np.ascontiguousarray(array).ravel()


class _Tensor:
  def __init__(self, storage, offset, size, stride):
    self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

  def __reduce__(self):
    rebuild = sys.modules["torch._utils"]._rebuild_tensor_v2
    return rebuild, (self.storage, self.offset, self.size, self.stride, False,
                     collections.OrderedDict())


@contextlib.contextmanager
def _fake_torch():
  """Stand-in `torch` modules, so pickle writes torch's own global references."""
  torch = types.ModuleType("torch")
  utils = types.ModuleType("torch._utils")
  for name in ("FloatStorage", "LongStorage"):
    setattr(torch, name, type(name, (), {"__module__": "torch"}))
  def _rebuild_tensor_v2(*args):
    raise AssertionError("never called while pickling")
  _rebuild_tensor_v2.__module__ = "torch._utils"
  _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
  utils._rebuild_tensor_v2 = _rebuild_tensor_v2
  torch._utils = utils
  saved = {k: sys.modules.get(k) for k in ("torch", "torch._utils")}
  sys.modules.update({"torch": torch, "torch._utils": utils})
  try:
    yield torch
  finally:
    for k, v in saved.items():
      if v is None:
        sys.modules.pop(k, None)
      else:
        sys.modules[k] = v


def _storage_class(torch, array):
  return torch.LongStorage if array.dtype == np.int64 else torch.FloatStorage


def _pickle_state_dict(state, legacy):
  """data.pkl bytes of `state` ({name: _Tensor}) with torch's persistent ids."""
  with _fake_torch() as torch:
    class Pickler(pickle.Pickler):
      def persistent_id(self, obj):
        if isinstance(obj, _Storage):
          pid = ("storage", _storage_class(torch, obj.array), obj.key, "cpu", obj.array.size)
          return pid + (None,) if legacy else pid
        return None
    state_dict = collections.OrderedDict(state)
    # Module.state_dict() carries per-module versions in an attribute.
    state_dict._metadata = collections.OrderedDict({"": {"version": 1}, "a": {"version": 2}})
    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump(state_dict)
    return buf.getvalue()


def write_torch_zip(path, state, storages, prefix="archive"):
  """torch >= 1.6's zip layout: <prefix>/data.pkl, <prefix>/data/<key>, <prefix>/version."""
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
    zf.writestr(f"{prefix}/data.pkl", _pickle_state_dict(state, legacy=False))
    zf.writestr(f"{prefix}/byteorder", "little")
    for s in storages:
      little_endian = s.array.astype(s.array.dtype.newbyteorder("<"))
      zf.writestr(f"{prefix}/data/{s.key}", little_endian.tobytes())
    zf.writestr(f"{prefix}/version", "3\n")


def write_torch_legacy(path, state, storages):
  """torch < 1.6's stream: magic, protocol, sys info, data pickle, keys, raw storages."""
  with open(path, "wb") as f:
    for obj in (torch_file.LEGACY_MAGIC, torch_file.LEGACY_PROTOCOL,
                {"protocol_version": 1001, "little_endian": True}):
      pickle.dump(obj, f, protocol=2)
    f.write(_pickle_state_dict(state, legacy=True))
    pickle.dump([s.key for s in storages], f, protocol=2)
    for s in storages:
      f.write(struct.pack("<q", s.array.size))
      f.write(s.array.astype(s.array.dtype.newbyteorder("<")).tobytes())


def _small_state():
  base = np.arange(24, dtype=np.float32)
  shared = _Storage("0", base)
  longs = _Storage("1", np.array([7, 8, 9], np.int64))
  state = {
      "a.weight": _Tensor(shared, 0, (2, 3, 4), (12, 4, 1)),
      "a.weight_t": _Tensor(shared, 0, (4, 6), (1, 4)),  # a transposed (strided) view
      "b.bias": _Tensor(shared, 20, (4,), (1,)),  # an offset into the same storage
      "b.count": _Tensor(longs, 1, (), ()),
  }
  expected = {
      "a.weight": base.reshape(2, 3, 4),
      "a.weight_t": base.reshape(6, 4).T,
      "b.bias": base[20:24],
      "b.count": np.array(8, np.int64),
  }
  return state, [shared, longs], expected


@pytest.mark.parametrize("layout", ["zip", "legacy"])
def test_reads_state_dict_without_torch(tmp_path, layout):
  state, storages, expected = _small_state()
  path = tmp_path / "w.pth"
  (write_torch_zip if layout == "zip" else write_torch_legacy)(path, state, storages)
  assert "torch" not in sys.modules
  got = torch_file.load_torch_state_dict(path)
  assert sorted(got) == sorted(expected)
  for k, v in expected.items():
    assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
    np.testing.assert_array_equal(got[k], v)


class _Evil:
  def __init__(self, command):
    self.command = command

  def __reduce__(self):
    return os.system, (self.command,)


@pytest.mark.parametrize("layout", ["zip", "legacy"])
def test_refuses_malicious_pickle(tmp_path, layout):
  marker = tmp_path / "owned"
  payload = pickle.dumps({"x": _Evil(f"touch {marker}")}, protocol=2)
  assert b"system" in payload
  path = tmp_path / "evil.pth"
  if layout == "zip":
    with zipfile.ZipFile(path, "w") as zf:
      zf.writestr("archive/data.pkl", payload)
  else:
    with open(path, "wb") as f:
      pickle.dump(torch_file.LEGACY_MAGIC, f, protocol=2)
      pickle.dump(torch_file.LEGACY_PROTOCOL, f, protocol=2)
      pickle.dump({}, f, protocol=2)
      f.write(payload)
  with pytest.raises(pickle.UnpicklingError, match="refusing to load global"):
    torch_file.load_torch_state_dict(path)
  assert not marker.exists()


def test_refuses_non_torch_file(tmp_path):
  path = tmp_path / "junk.pth"
  path.write_bytes(b"not a torch file at all")
  with pytest.raises(ValueError, match="torch"):
    torch_file.load_torch_state_dict(path)


def test_pth_of_real_weights_matches_npz(tmp_path, fid_weights_path):
  """The release-file route gives the same variables as the .npz route."""
  with np.load(fid_weights_path) as npz:
    arrays = {k: npz[k] for k in npz.files}
  storages = [_Storage(str(i), a) for i, a in enumerate(arrays.values())]
  def contiguous_strides(shape):
    return tuple(int(x) for x in np.cumprod((1,) + shape[:0:-1])[::-1])
  state = {k: _Tensor(s, 0, a.shape, contiguous_strides(a.shape))
           for (k, a), s in zip(arrays.items(), storages)}
  path = tmp_path / "pt_inception.pth"
  write_torch_zip(path, state, storages, prefix="pt_inception-2015-12-05")
  from_pth = weights_lib.load_inception_params(path)
  from_npz = weights_lib.load_inception_params(fid_weights_path)
  import jax
  jax.tree.map(np.testing.assert_array_equal, from_pth, from_npz)


# --- the weights loader's errors ------------------------------------------------------------

def _zero_state_dict():
  return {k: np.zeros(s, np.float32) for k, s in weights_lib.expected_torch_shapes().items()}


def test_state_dict_maps_to_variables():
  sd = _zero_state_dict()
  sd["Conv2d_1a_3x3.conv.weight"] = np.arange(32 * 3 * 3 * 3, dtype=np.float32).reshape(32, 3, 3, 3)
  sd["fc.weight"] = np.zeros((1008, 2048), np.float32)  # logits layer: ignored
  sd["Mixed_5b.branch1x1.bn.num_batches_tracked"] = np.zeros((), np.int64)  # ignored
  v = weights_lib.variables_from_state_dict(sd)
  kernel = v["params"]["Conv2d_1a_3x3"]["conv"]["kernel"]
  assert kernel.shape == (3, 3, 3, 32)  # HWIO
  np.testing.assert_array_equal(kernel, sd["Conv2d_1a_3x3.conv.weight"].transpose(2, 3, 1, 0))
  assert v["batch_stats"]["Mixed_7c"]["branch_pool"]["bn"]["var"].shape == (192,)
  assert len(sd) == 472


def test_missing_key_is_named():
  sd = _zero_state_dict()
  del sd["Mixed_6e.branch7x7dbl_3.bn.running_var"]
  with pytest.raises(ValueError, match=r"1 missing \(Mixed_6e\.branch7x7dbl_3\.bn\.running_var\)"):
    weights_lib.variables_from_state_dict(sd)


def test_misshapen_key_is_named():
  sd = _zero_state_dict()
  sd["Mixed_7c.branch3x3_2a.conv.weight"] = np.zeros((384, 384, 3, 1), np.float32)
  with pytest.raises(ValueError, match=r"misshapen \(Mixed_7c\.branch3x3_2a\.conv\.weight: "
                                       r"expected \(384, 384, 1, 3\), got \(384, 384, 3, 1\)\)"):
    weights_lib.variables_from_state_dict(sd)


def test_unexpected_key_is_named():
  sd = _zero_state_dict()
  sd["Mixed_8a.conv.weight"] = np.zeros((1,), np.float32)
  with pytest.raises(ValueError, match=r"unexpected \(Mixed_8a\.conv\.weight\)"):
    weights_lib.variables_from_state_dict(sd)


def test_missing_weights_file_names_the_env_var(tmp_path, monkeypatch):
  monkeypatch.setenv("CIFARJAX_FID_WEIGHTS", str(tmp_path / "nope.pth"))
  with pytest.raises(FileNotFoundError, match="CIFARJAX_FID_WEIGHTS"):
    weights_lib.load_inception_params()
  with pytest.raises(FileNotFoundError, match="CIFARJAX_FID_WEIGHTS"):
    weights_lib.load_inception_params(tmp_path / "also-nope.npz")


def test_failed_download_says_how_to_work_offline(tmp_path, monkeypatch):
  monkeypatch.delenv("CIFARJAX_FID_WEIGHTS", raising=False)
  monkeypatch.setenv("CIFARJAX_CACHE", str(tmp_path / "cache"))
  monkeypatch.setattr(weights_lib, "WEIGHTS_URL", (tmp_path / "missing.pth").as_uri())
  with pytest.raises(FileNotFoundError, match="offline.*CIFARJAX_FID_WEIGHTS"):
    weights_lib.resolve_weights_path()  # no file anywhere: tries the (unreachable) download
  with pytest.raises(FileNotFoundError, match="CIFARJAX_FID_WEIGHTS"):
    weights_lib.resolve_weights_path(download=False)
  assert not list((tmp_path / "cache").glob("*"))  # no partial file left behind


def test_download_checks_sha256_prefix(tmp_path, monkeypatch):
  monkeypatch.setenv("CIFARJAX_CACHE", str(tmp_path / "cache"))
  fake = tmp_path / "fake.pth"
  fake.write_bytes(b"not the weights")
  with pytest.raises(ValueError, match="6726825d"):
    weights_lib.download_weights(url=fake.as_uri())
  assert not (tmp_path / "cache" / weights_lib.WEIGHTS_FILENAME).exists()
