"""Speed of the compiled train steps: printed by `cifarjax bench`, never asserted."""

import time

import jax
import jax.numpy as jnp
import numpy as np

from cifarjax import mesh as mesh_lib


def _device_memory_peak():
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else peak / 2**20


def time_steps(step_fn, state, batch, steps: int):
  """(compile seconds, seconds per step) of `state, _ = step_fn(state, batch, rng)`."""
  rng = jax.random.PRNGKey(0)
  t0 = time.perf_counter()
  state, metrics = step_fn(state, batch, rng)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(steps):
    state, metrics = step_fn(state, batch, rng)
  jax.block_until_ready((state, metrics))
  return compile_s, (time.perf_counter() - t0) / steps


def benchmark_classifier(batch_size: int = 256, steps: int = 20) -> dict:
  from cifarjax.config import ClassifierConfig
  from cifarjax.models import paper_classifier
  from cifarjax.train_classifier import init_state, make_optimizer, make_train_step
  mesh = mesh_lib.make_mesh()
  mesh_lib.check_batch_size(batch_size, mesh)
  model = paper_classifier()
  tx, _ = make_optimizer(ClassifierConfig(), 195)
  state = jax.device_put(init_state(model, tx, 0), mesh_lib.replicated(mesh))
  rng = np.random.default_rng(0)
  batch = jax.device_put((rng.normal(size=(batch_size, 32, 32, 3)).astype(np.float32),
                          rng.integers(0, 100, batch_size).astype(np.int32)),
                         mesh_lib.batch_sharded(mesh))
  compile_s, step_s = time_steps(make_train_step(model, tx, mesh), state, batch, steps)
  return {"model": "classifier", "batch_size": batch_size, "compile_s": compile_s,
          "step_ms": 1e3 * step_s, "images_per_s": batch_size / step_s,
          "peak_device_mib": _device_memory_peak(), "devices": f"{mesh.size} x {jax.devices()[0].device_kind}"}
