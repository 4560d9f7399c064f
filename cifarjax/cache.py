"""The per-machine cache (downloads, FID statistics) and checked downloads into it."""

import contextlib
import functools
import hashlib
import http.client
import os
import pathlib
import tempfile
import urllib.request

from tqdm import tqdm

CACHE_ENV = "CIFARJAX_CACHE"
_CHUNK_BYTES = 1 << 20


class ChecksumError(ValueError):
  """A file's hash is not the one it must have."""


class DownloadError(FileNotFoundError):
  """A file is not in the cache and could not be downloaded."""


def cache_dir(override=None) -> pathlib.Path:
  """`override`, else $CIFARJAX_CACHE, else ~/.cache/cifarjax."""
  return pathlib.Path(override or os.environ.get(CACHE_ENV) or "~/.cache/cifarjax").expanduser()


@functools.lru_cache(maxsize=16)
def _digest_cached(path: str, algorithm: str, size: int, mtime_ns: int) -> str:
  del size, mtime_ns  # cache keys only: a rewritten file is hashed again
  h = hashlib.new(algorithm, usedforsecurity=False)
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(_CHUNK_BYTES), b""):
      h.update(block)
  return h.hexdigest()


def file_digest(path, algorithm: str = "sha256") -> str:
  """Hex digest of a file, read in chunks, remembered while the file is unchanged."""
  path = pathlib.Path(path).resolve()
  st = path.stat()
  return _digest_cached(str(path), algorithm, st.st_size, st.st_mtime_ns)


def _chunks(url: str):
  """Yields the bytes at `url` in chunks, with a progress bar on terminals."""
  with urllib.request.urlopen(url, timeout=60) as response:
    total = int(response.headers.get("Content-Length") or 0) or None
    with tqdm(total=total, unit="B", unit_scale=True, desc=url.rsplit("/", 1)[-1],
              disable=None) as bar:  # disable=None: no bar when not on a terminal
      for chunk in iter(lambda: response.read(_CHUNK_BYTES), b""):
        bar.update(len(chunk))
        yield chunk


def download(url: str, target, *, algorithm: str, expected: str, offline_hint: str) -> pathlib.Path:
  """Downloads `url` to `target`, keeping it only if its digest starts with `expected`.

  The bytes go to a temporary file beside the target, renamed only once checked,
  so a partial or corrupt download never sits at the path that is trusted.
  """
  target = pathlib.Path(target)
  target.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
  h = hashlib.new(algorithm, usedforsecurity=False)
  try:
    with os.fdopen(fd, "wb") as out, contextlib.closing(_chunks(url)) as chunks:
      while True:
        # Only reading is wrapped: a failed write (disk full) is no network error.
        try:
          chunk = next(chunks, b"")
        except (OSError, http.client.HTTPException) as e:  # URLError, timeouts, resets
          raise DownloadError(f"could not download {url} ({e}). {offline_hint}") from e
        if not chunk:
          break
        out.write(chunk)
        h.update(chunk)
    actual = h.hexdigest()
    if not actual.startswith(expected):
      raise ChecksumError(
          f"the download of {url} has {algorithm} {actual}, expected {expected}; nothing was "
          f"saved. {offline_hint}")
    os.replace(tmp, target)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
  return target
