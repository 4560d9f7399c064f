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


def benchmark_diffusion(batch_size: int = 256, steps: int = 20, sample_steps: int = 50,
                        sample_batch_size: int | None = None) -> dict:
  """The paper generator's train step, and a `sample_steps`-step DDIM sampler on a batch."""
  from cifarjax.config import DiffusionConfig
  from cifarjax.generate import make_sampler
  from cifarjax import train_diffusion as td
  mesh = mesh_lib.make_mesh()
  mesh_lib.check_batch_size(batch_size, mesh)
  config = DiffusionConfig(batch_size=batch_size)
  model, schedule = td.make_unet(config, 100), td.make_schedule(config)
  tx, _ = td.make_optimizer(config, 195)
  state = jax.device_put(td.init_state(model, tx, 0), mesh_lib.replicated(mesh))
  rng = np.random.default_rng(0)
  batch = jax.device_put((rng.uniform(-1, 1, (batch_size, 32, 32, 3)).astype(np.float32),
                          rng.integers(0, 100, batch_size).astype(np.int32)),
                         mesh_lib.batch_sharded(mesh))
  compile_s, step_s = time_steps(td.make_train_step(model, schedule, tx, mesh, config), state,
                                 batch, steps)
  # The train step donated `state`; sample with fresh weights (speed does not depend on them).
  params = jax.device_put(td.init_state(model, tx, 0).ema_params, mesh_lib.replicated(mesh))
  n = sample_batch_size or batch_size
  sample = make_sampler(model, schedule, mesh, n, sampler="ddim", steps=sample_steps, guidance=0.0)
  labels = np.arange(n, dtype=np.int32) % 100
  jax.block_until_ready(sample(params, jax.random.PRNGKey(0), labels))  # compile, warm up
  t0 = time.perf_counter()
  jax.block_until_ready(sample(params, jax.random.PRNGKey(1), labels))
  sample_s = time.perf_counter() - t0
  return {"model": "diffusion", "batch_size": batch_size, "compile_s": compile_s,
          "step_ms": 1e3 * step_s, "images_per_s": batch_size / step_s,
          "sampler": f"ddim-{sample_steps}", "sample_batch_size": n,
          "sample_s": sample_s, "sample_images_per_s": n / sample_s,
          "peak_device_mib": _device_memory_peak(),
          "devices": f"{mesh.size} x {jax.devices()[0].device_kind}"}
