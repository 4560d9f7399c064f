"""Images decoded once per machine: a zip or folder of images is decoded on first use and
read back from the cache after that.

Decoding CIFAR-10's 50,000 JPEGs takes half a minute; reading them back from an
uncompressed .npz takes a fraction of a second. Cache files live in
`cache.cache_dir()/decoded`, keyed by what the source holds: a zip by its sha256, a
folder by each file's path, size and mtime. An edited source is decoded afresh; a copy
of the same zip, or a zip whose mtime alone changed, is not.
"""

import hashlib
import json
import os
import pathlib
import tempfile
import zipfile

import numpy as np

from cifarjax import cache
from cifarjax.errors import note

# Part of every key: a change to what decoding returns must not meet older cache files.
FORMAT = 1


def source_key(path) -> str:
  """What identifies the decoded contents of a zip (its bytes) or a folder (its listing)."""
  path = pathlib.Path(path)
  if not path.is_dir():
    return cache.file_digest(path, "sha256")[:16]
  listing = sorted((p.relative_to(path).as_posix(), st.st_size, st.st_mtime_ns)
                   for p in path.rglob("*") if p.is_file() for st in (p.stat(),))
  return hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]


def cache_file(path, part: str) -> pathlib.Path:
  """Where `part` (e.g. a split's name) of the source at `path` is cached."""
  safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in part)
  return cache.cache_dir() / "decoded" / f"{source_key(path)}-{safe}-v{FORMAT}.npz"


def _read(file: pathlib.Path) -> dict[str, np.ndarray] | None:
  try:
    with np.load(file, allow_pickle=False) as npz:
      return {k: npz[k] for k in npz.files}
  except (OSError, ValueError, EOFError, zipfile.BadZipFile):
    return None  # absent, or left broken by something outside cifarjax: decoded again


def _write(file: pathlib.Path, arrays: dict[str, np.ndarray]):
  """Atomically (processes on one machine may write the same file at once); where the
  cache cannot take it (a full disk), says so and goes on: the cache only saves time."""
  try:
    file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=f".{file.name}.", suffix=".part")
    try:
      with os.fdopen(fd, "wb") as f:
        np.savez(f, **arrays)
      os.replace(tmp, file)
    finally:
      if os.path.exists(tmp):
        os.unlink(tmp)
  except OSError as e:
    note(f"the decoded images could not be cached in {file.parent} "
         f"({os.strerror(e.errno) if e.errno else e}); the next command decodes them again")
    return
  note(f"decoded images cached in {file}")


def cached(path, part: str, decode) -> dict[str, np.ndarray]:
  """`decode()`'s arrays for `part` of the zip or folder at `path`, read back from the cache
  where an earlier call stored them (decode() raising stores nothing)."""
  file = cache_file(path, part)
  arrays = _read(file)
  if arrays is None:
    arrays = decode()
    _write(file, arrays)
  return arrays
