"""Speed of the compiled steps: printed by `cifarjax bench` as one table, never asserted.

Each benchmark lowers and compiles its step ahead of time, runs it once
(compile_s counts both), then times `steps` more runs and returns one row:
images/s, ms per step, the step's FLOPs and the TFLOP/s they make, compile
seconds, peak device memory (None where the backend does not report it, as on
CPU) and the devices used (count, kind, backend), so that a speed can be held
against the device's peak. Inputs are random: speed does not depend on values.

FLOPs are XLA's cost analysis of the compiled program, which is what one device
runs; all devices run the same program, so a step's FLOPs (and its TFLOP/s) are
that times the device count. XLA counts the body of a loop once, whatever the
trip count, so a program with a loop of matrix work in it (the sampler's
`lax.scan` over timesteps) gets None rather than a count that is too small;
loops without dots or convolutions (random-number generation's rounds) leave
the count as good as exact.
"""

import re
import time

import jax
import numpy as np

from cifarjax import mesh as mesh_lib
from cifarjax.errors import note

# (header, row key, format of a value that is not None)
COLUMNS = (("benchmark", "benchmark", "{}"), ("batch", "batch_size", "{}"),
           ("images/s", "images_per_s", "{:.1f}"), ("TFLOP/s", "tflops", "{:.3g}"),
           ("GFLOP/step", "flops", lambda v: f"{v / 1e9:.3g}"), ("step ms", "step_ms", "{:.1f}"),
           ("compile s", "compile_s", "{:.1f}"), ("peak MiB", "peak_device_mib", "{:.0f}"),
           ("devices", "devices", "{}"))
_LOOP_BODY = re.compile(r"\bwhile\(.*?\bbody=%?([\w.-]+)")
_CALLED = re.compile(r"\b(?:calls|body|condition|to_apply|branch_computations)=\{?%?([\w.-]+)")
_MATRIX_WORK = re.compile(r"\b(?:convolution|dot)\(")


def _device_memory_peak():
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else peak / 2**20


def cost_flops(cost) -> float | None:
  """The 'flops' entry of a `Compiled.cost_analysis()` result: a dict in current JAX, a list
  holding one dict per program in older ones; None where the backend gives no count."""
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if len(cost) == 1 else None  # several programs: no single step to cost
  if not hasattr(cost, "get"):
    return None
  flops = cost.get("flops")
  return float(flops) if flops is not None and flops >= 0 else None


def loops_over_matrix_work(hlo_text: str) -> bool:
  """Whether an HLO module has a while loop whose body (or anything it calls) holds a dot
  or a convolution: work that XLA's cost analysis counts once instead of per trip."""
  computations = {}
  for block in re.split(r"\n\s*\n", hlo_text):
    header = re.match(r"\s*(?:ENTRY\s+)?%?([\w.-]+)\s", block)
    if header:
      computations[header.group(1)] = block
  seen, todo = set(), [m.group(1) for m in _LOOP_BODY.finditer(hlo_text)]
  while todo:
    name = todo.pop()
    if name in seen or name not in computations:
      continue
    seen.add(name)
    if _MATRIX_WORK.search(computations[name]):
      return True
    todo += [m.group(1) for m in _CALLED.finditer(computations[name])]
  return False


def compiled_flops(compiled, num_devices: int) -> float | None:
  """FLOPs of one call of `compiled` on all `num_devices` devices (see the module docstring)."""
  try:
    if loops_over_matrix_work(compiled.as_text() or ""):
      return None
    flops = cost_flops(compiled.cost_analysis())
  except (NotImplementedError, RuntimeError, AttributeError):  # a backend without cost analysis
    return None
  return None if flops is None else flops * num_devices


def _row(name, mesh, batch_size, compile_s, step_s, flops=None, **extra) -> dict:
  device = jax.devices()[0]
  return {"benchmark": name, "batch_size": batch_size, "images_per_s": batch_size / step_s,
          "tflops": None if flops is None else flops / step_s / 1e12, "flops": flops,
          "step_ms": 1e3 * step_s, "compile_s": compile_s,
          "peak_device_mib": _device_memory_peak(),
          "devices": f"{mesh.size} x {device.device_kind} ({jax.default_backend()})",
          "device_count": mesh.size, "device_kind": device.device_kind,
          "backend": jax.default_backend(), **extra}


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


def time_compiled(jitted, args, steps: int, mesh, carries_state: bool = False,
                  what: str = "the step"):
  """(compile seconds, seconds per step, FLOPs per step) of `jitted(*args)`: compiled ahead
  of time, so that the executable timed is the one whose cost is read. carries_state: the
  step donates args[0] and returns the next one first, so each call gets the last one's.
  Says what it does (`what` names the step): compiling takes seconds to minutes."""
  note(f"compiling {what} (seconds to minutes)")
  t0 = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  compile_s = time.perf_counter() - t0
  note(f"compiled in {compile_s:.1f} s; timing {steps + 1} calls of {what}")
  carry = {"state": args[0]}

  def call():
    if not carries_state:
      return compiled(*args)
    carry["state"], out = compiled(carry["state"], *args[1:])
    return out

  first_s, step_s = time_calls(call, steps)
  return compile_s + first_s, step_s, compiled_flops(compiled, mesh.size)


def _random_batch(mesh, batch_size, low, high):
  rng = np.random.default_rng(0)
  return jax.device_put((rng.uniform(low, high, (batch_size, 32, 32, 3)).astype(np.float32),
                         rng.integers(0, 100, batch_size).astype(np.int32)),
                        mesh_lib.batch_sharded(mesh))


def classifier(batch_size: int = 256, steps: int = 20, mesh=None) -> dict:
  """The paper classifier's train step (forward, backward, Adam)."""
  from cifarjax.config import ClassifierConfig
  from cifarjax.models import paper_classifier
  from cifarjax.kinds import CLASSIFIER
  from cifarjax.optim import make_optimizer
  from cifarjax.train_classifier import make_train_step  # the step it times
  mesh = mesh or mesh_lib.make_mesh()
  mesh_lib.check_batch_size(batch_size, mesh)
  model = paper_classifier()
  tx, _ = make_optimizer(ClassifierConfig(), 195)
  state = jax.device_put(CLASSIFIER.init_state(model, tx, 0), mesh_lib.replicated(mesh))
  batch = _random_batch(mesh, batch_size, -2, 2)
  rng = jax.random.PRNGKey(0)
  times = time_compiled(make_train_step(model, tx, mesh), (state, batch, rng), steps, mesh,
                        carries_state=True, what="the classifier's train step")
  return _row("classifier train step", mesh, batch_size, *times)


def diffusion(batch_size: int = 256, steps: int = 20, mesh=None) -> dict:
  """The paper generator's train step (noising, U-Net forward and backward, Adam, EMA)."""
  from cifarjax import train_diffusion as td  # the step it times
  from cifarjax.kinds import GENERATOR, make_schedule, make_unet
  from cifarjax.config import DiffusionConfig
  from cifarjax.optim import make_optimizer
  mesh = mesh or mesh_lib.make_mesh()
  mesh_lib.check_batch_size(batch_size, mesh)
  config = DiffusionConfig(batch_size=batch_size)
  model, schedule = make_unet(config, 100), make_schedule(config)
  tx, _ = make_optimizer(config, 195)
  state = jax.device_put(GENERATOR.init_state(model, tx, 0, ema=True),
                         mesh_lib.replicated(mesh))
  batch = _random_batch(mesh, batch_size, -1, 1)
  step = td.make_train_step(model, schedule, tx, mesh, config)
  times = time_compiled(step, (state, batch, jax.random.PRNGKey(0)), steps, mesh,
                        carries_state=True, what="the generator's train step")
  return _row("diffusion train step", mesh, batch_size, *times)


def sampler(batch_size: int = 256, steps: int = 2, sample_steps: int = 50, mesh=None) -> dict:
  """One call of the paper generator's `sample_steps`-step DDIM sampler: a batch of images."""
  from cifarjax.kinds import GENERATOR, make_schedule, make_unet
  from cifarjax.config import DiffusionConfig
  from cifarjax.generate import make_sampler
  from cifarjax.optim import make_optimizer
  mesh = mesh or mesh_lib.make_mesh()
  config = DiffusionConfig()
  model, schedule = make_unet(config, 100), make_schedule(config)
  tx, _ = make_optimizer(config, 195)
  params = jax.device_put(GENERATOR.init_state(model, tx, 0).params, mesh_lib.replicated(mesh))
  sample = make_sampler(model, mesh, batch_size, sampler="ddim", steps=sample_steps, guidance=0.0)
  labels = np.arange(batch_size, dtype=np.int32) % 100
  schedule = jax.device_put(schedule, mesh_lib.replicated(mesh))
  times = time_compiled(sample, (params, schedule, jax.random.PRNGKey(0), labels), steps, mesh,
                        what=f"the {sample_steps}-step DDIM sampler")
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
  times = time_compiled(step, (variables, batch), steps, mesh, what="the FID feature step")
  return _row("FID features", mesh, batch_size, *times, weights=weights_used)


BENCHMARKS = {"classifier": classifier, "diffusion": diffusion, "sampler": sampler, "fid": fid}


def table_lines(rows):
  """Yields a markdown table of the rows, header first, a line per row as it arrives
  (COLUMNS' columns; '-' where a value is None or missing)."""
  yield "| " + " | ".join(header for header, _, _ in COLUMNS) + " |"
  yield "|" + "---|" * len(COLUMNS)
  for row in rows:
    yield "| " + " | ".join(_cell(row.get(key), fmt) for _, key, fmt in COLUMNS) + " |"


def _cell(value, fmt) -> str:
  if value is None:
    return "-"
  return fmt(value) if callable(fmt) else fmt.format(value)
