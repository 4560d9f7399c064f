"""Throughput of FID feature extraction on the current devices."""

import time

import jax
import numpy as np

from cifarjax import mesh as mesh_lib
from cifarjax.fid import features as features_lib
from cifarjax.fid import weights as weights_lib


def benchmark(batch_size: int = 50, steps: int = 5, weights=None, image_size: int = 32,
              mesh=None) -> dict:
  """Images/s of pool3 feature extraction (uint8 image_size^2 inputs), after a warm-up step.

  With weights=None the usual weights are looked up without downloading; where
  there are none, random weights of the same shapes stand in (throughput does
  not depend on the values) and the result says so.

  On a CPU-only host, XLA:CPU keeps about 1.5 of 2 cores busy with one device;
  splitting the host into one device per core (XLA_FLAGS=
  --xla_force_host_platform_device_count=2, set before JAX starts) shares each
  batch between them and measured ~25% faster on a 2-core machine.
  """
  try:
    path = weights_lib.resolve_weights_path(weights, download=False)
    variables, weights_used = weights_lib.load_inception_params(path), str(path)
  except FileNotFoundError:
    if weights is not None:
      raise
    variables, weights_used = weights_lib.random_variables(), "random (no weights file found)"

  mesh = mesh_lib.make_mesh() if mesh is None else mesh
  batch_size = features_lib.round_up_batch_size(batch_size, mesh.size)
  step = features_lib.feature_step(mesh)
  variables = jax.device_put(variables, mesh_lib.replicated(mesh))
  images = np.random.default_rng(0).integers(
      0, 256, (batch_size, image_size, image_size, 3), dtype=np.uint8)
  batch = jax.device_put(images, mesh_lib.batch_sharded(mesh))

  start = time.perf_counter()
  step(variables, batch).block_until_ready()  # compiles, then runs once
  compile_s = time.perf_counter() - start

  start, start_cpu = time.perf_counter(), time.process_time()
  for _ in range(steps):
    out = step(variables, batch)
  out.block_until_ready()
  elapsed, cpu = time.perf_counter() - start, time.process_time() - start_cpu
  n = steps * batch_size
  return {
      "images_per_s": n / elapsed,
      "ms_per_image": 1e3 * elapsed / n,
      # This process's CPU time (all threads): steadier than wall time on a shared machine.
      "host_cpu_ms_per_image": 1e3 * cpu / n,
      "compile_and_first_step_s": compile_s,
      "batch_size": batch_size,
      "steps": steps,
      "image_size": image_size,
      "device": f"{jax.devices()[0].device_kind} x{mesh.size} ({jax.default_backend()})",
      "weights": weights_used,
  }
