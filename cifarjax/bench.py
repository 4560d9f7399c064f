"""Speed of the compiled steps: printed by `cifarjax bench` as one table, never asserted.

Each benchmark compiles its step, runs it once (compile_s counts both), then
times `steps` more runs and returns one row: images/s, ms per step, compile
seconds, peak device memory (None where the backend does not report it, as
on CPU) and the devices used. Inputs are random: speed does not depend on values.
"""

import time

import jax
import numpy as np

from cifarjax import mesh as mesh_lib

COLUMNS = (("benchmark", "{}"), ("batch", "{}"), ("images/s", "{:.1f}"), ("step ms", "{:.1f}"),
           ("compile s", "{:.1f}"), ("peak MiB", "{:.0f}"), ("devices", "{}"))
KEYS = ("benchmark", "batch_size", "images_per_s", "step_ms", "compile_s", "peak_device_mib",
        "devices")


def _device_memory_peak():
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else peak / 2**20


def _row(name, mesh, batch_size, compile_s, step_s, **extra) -> dict:
  return {"benchmark": name, "batch_size": batch_size, "images_per_s": batch_size / step_s,
          "step_ms": 1e3 * step_s, "compile_s": compile_s,
          "peak_device_mib": _device_memory_peak(),
          "devices": f"{mesh.size} x {jax.devices()[0].device_kind} ({jax.default_backend()})",
          **extra}


def time_calls(fn, steps: int):
  """(seconds of the first call, seconds per later call) of fn(), which returns jax arrays."""
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  first_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(steps):
    out = fn()
  jax.block_until_ready(out)
  return first_s, (time.perf_counter() - t0) / steps


def _time_train_step(step_fn, state, batch, steps):
  # The step donates its state, so each call must get the state the last one returned.
  carry = {"state": state}
  rng = jax.random.PRNGKey(0)

  def call():
    carry["state"], metrics = step_fn(carry["state"], batch, rng)
    return metrics

  return time_calls(call, steps)


def _random_batch(mesh, batch_size, low, high):
  rng = np.random.default_rng(0)
  return jax.device_put((rng.uniform(low, high, (batch_size, 32, 32, 3)).astype(np.float32),
                         rng.integers(0, 100, batch_size).astype(np.int32)),
                        mesh_lib.batch_sharded(mesh))


def classifier(batch_size: int = 256, steps: int = 20, mesh=None) -> dict:
  """The paper classifier's train step (forward, backward, Adam)."""
  from cifarjax.config import ClassifierConfig
  from cifarjax.models import paper_classifier
  from cifarjax.train_classifier import init_state, make_optimizer, make_train_step
  mesh = mesh or mesh_lib.make_mesh()
  mesh_lib.check_batch_size(batch_size, mesh)
  model = paper_classifier()
  tx, _ = make_optimizer(ClassifierConfig(), 195)
  state = jax.device_put(init_state(model, tx, 0), mesh_lib.replicated(mesh))
  batch = _random_batch(mesh, batch_size, -2, 2)
  times = _time_train_step(make_train_step(model, tx, mesh), state, batch, steps)
  return _row("classifier train step", mesh, batch_size, *times)


def diffusion(batch_size: int = 256, steps: int = 20, mesh=None) -> dict:
  """The paper generator's train step (noising, U-Net forward and backward, Adam, EMA)."""
  from cifarjax import train_diffusion as td
  from cifarjax.config import DiffusionConfig
  mesh = mesh or mesh_lib.make_mesh()
  mesh_lib.check_batch_size(batch_size, mesh)
  config = DiffusionConfig(batch_size=batch_size)
  model, schedule = td.make_unet(config, 100), td.make_schedule(config)
  tx, _ = td.make_optimizer(config, 195)
  state = jax.device_put(td.init_state(model, tx, 0), mesh_lib.replicated(mesh))
  batch = _random_batch(mesh, batch_size, -1, 1)
  times = _time_train_step(td.make_train_step(model, schedule, tx, mesh, config), state, batch,
                           steps)
  return _row("diffusion train step", mesh, batch_size, *times)


def sampler(batch_size: int = 256, steps: int = 2, sample_steps: int = 50, mesh=None) -> dict:
  """One call of the paper generator's `sample_steps`-step DDIM sampler: a batch of images."""
  from cifarjax import train_diffusion as td
  from cifarjax.config import DiffusionConfig
  from cifarjax.generate import make_sampler
  mesh = mesh or mesh_lib.make_mesh()
  config = DiffusionConfig()
  model, schedule = td.make_unet(config, 100), td.make_schedule(config)
  tx, _ = td.make_optimizer(config, 195)
  params = jax.device_put(td.init_state(model, tx, 0).ema_params, mesh_lib.replicated(mesh))
  sample = make_sampler(model, schedule, mesh, batch_size, sampler="ddim", steps=sample_steps,
                        guidance=0.0)
  labels = np.arange(batch_size, dtype=np.int32) % 100
  times = time_calls(lambda: sample(params, jax.random.PRNGKey(0), labels), steps)
  return _row(f"DDIM-{sample_steps} sampling", mesh, batch_size, *times)


def fid(batch_size: int = 50, steps: int = 5, weights=None, mesh=None) -> dict:
  """Pool3 features of 32x32 uint8 images (resized to 299 inside), as FID extracts them.

  With weights=None the usual weights are looked up without downloading; where
  there are none, random weights of the same shapes stand in (speed does not
  depend on the values) and the row's `weights` says so.
  """
  from cifarjax.fid import features, weights as weights_lib
  try:
    path = weights_lib.resolve_weights_path(weights, download=False)
    variables, weights_used = weights_lib.load_inception_params(path), str(path)
  except FileNotFoundError:
    if weights is not None:
      raise
    variables, weights_used = weights_lib.random_variables(), "random (no weights file found)"
  mesh = mesh or mesh_lib.make_mesh()
  batch_size = features.round_up_batch_size(batch_size, mesh.size)
  step = features.feature_step(mesh)
  variables = jax.device_put(variables, mesh_lib.replicated(mesh))
  images = np.random.default_rng(0).integers(0, 256, (batch_size, 32, 32, 3), dtype=np.uint8)
  batch = jax.device_put(images, mesh_lib.batch_sharded(mesh))
  times = time_calls(lambda: step(variables, batch), steps)
  return _row("FID features", mesh, batch_size, *times, weights=weights_used)


BENCHMARKS = {"classifier": classifier, "diffusion": diffusion, "sampler": sampler, "fid": fid}


def table_lines(rows):
  """Yields a markdown table of the rows, header first, a line per row as it arrives
  (KEYS' columns; '-' where a value is None)."""
  header = [name for name, _ in COLUMNS]
  yield "| " + " | ".join(header) + " |"
  yield "|" + "---|" * len(header)
  for row in rows:
    yield "| " + " | ".join("-" if row[key] is None else fmt.format(row[key])
                            for key, (_, fmt) in zip(KEYS, COLUMNS)) + " |"
