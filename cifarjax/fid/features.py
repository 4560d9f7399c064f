"""Pool3 features of many images: one jitted step for one batch size, sharded over devices."""

import functools

import jax
import numpy as np
import tqdm

from cifarjax import compiler, mesh as mesh_lib
from cifarjax.fid.inception import FEATURE_DIM, FIDInception
from cifarjax.fid.preprocessing import check_uint8_images

DEFAULT_BATCH_SIZE = 50  # pytorch-fid's default


def round_up_batch_size(batch_size: int, num_devices: int) -> int:
  """The smallest multiple of num_devices that is >= batch_size."""
  if batch_size < 1:
    raise ValueError(f"batch size must be positive, got {batch_size}")
  return -(-batch_size // num_devices) * num_devices


@functools.lru_cache(maxsize=4)
def feature_step(mesh):
  """jit(variables, uint8 batch) -> float32 (B, 2048): batch split over `mesh`, output replicated.

  jax.jit caches one executable per image shape, so a fixed batch size compiles once.
  """
  model = FIDInception()
  return jax.jit(lambda variables, images: model.apply(variables, images),
                 in_shardings=(mesh_lib.replicated(mesh), mesh_lib.batch_sharded(mesh)),
                 out_shardings=mesh_lib.replicated(mesh), compiler_options=compiler.options())


def _put_batch(batch, sharding):
  # Every process holds the whole batch; each device takes its slice. The same
  # call works for one process and for a multi-host mesh.
  return jax.make_array_from_callback(batch.shape, sharding, lambda index: batch[index])


def extract_features(images, variables, batch_size: int = DEFAULT_BATCH_SIZE, mesh=None,
                     progress: bool = True, desc: str = "FID features") -> np.ndarray:
  """float32 (N, 2048) pool3 features of uint8 NHWC `images` (any size).

  The batch size is rounded up to a multiple of the device count; the last
  batch is zero-padded to it, so the network compiles once.
  """
  check_uint8_images(images)
  images = np.asarray(images)
  mesh = mesh_lib.make_mesh() if mesh is None else mesh
  batch_size = round_up_batch_size(batch_size, mesh.size)
  step = feature_step(mesh)
  variables = jax.device_put(variables, mesh_lib.replicated(mesh))
  sharding = mesh_lib.batch_sharded(mesh)
  n = len(images)
  out = np.empty((n, FEATURE_DIM), np.float32)
  pending = None  # one batch in flight while the next is put on the devices

  def collect(pending):
    start, count, feats = pending
    out[start:start + count] = np.asarray(feats)[:count]
    bar.update(count)

  with tqdm.tqdm(total=n, desc=desc, unit="img", disable=not progress) as bar:
    for start in range(0, n, batch_size):
      batch = images[start:start + batch_size]
      count = len(batch)
      if count < batch_size:
        pad = np.zeros((batch_size - count, *batch.shape[1:]), np.uint8)
        batch = np.concatenate([batch, pad])
      feats = step(variables, _put_batch(batch, sharding))
      if pending is not None:
        collect(pending)
      pending = (start, count, feats)
    if pending is not None:
      collect(pending)
  return out
