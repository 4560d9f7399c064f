"""`cifarjax bench`: the table it prints, what a row times (on a fake clock), the FLOPs it
reads from XLA's cost analysis, and one real benchmark row (whose timings are
machine-dependent and so not asserted)."""

import json

import pytest

from cifarjax import bench, cli
from cifarjax.commands import info


def test_cli_names_every_benchmark():
  assert info.BENCHMARK_NAMES == tuple(bench.BENCHMARKS)


def test_table_has_one_line_per_row_and_dashes_for_unreported_values():
  rows = [
      {"benchmark": "a", "batch_size": 8, "images_per_s": 100.0, "tflops": None, "flops": None,
       "step_ms": 80.0, "compile_s": 1.25, "peak_device_mib": None, "devices": "1 x cpu (cpu)"},
      {"benchmark": "b", "batch_size": 256, "images_per_s": 5e4, "tflops": 0.1953125,
       "flops": 1e9, "step_ms": 5.12, "compile_s": 30.0, "peak_device_mib": 1234.4,
       "devices": "8 x H100 (gpu)"},
  ]
  lines = list(bench.table_lines(rows))
  assert lines[0] == ("| benchmark | batch | images/s | TFLOP/s | GFLOP/step | step ms "
                      "| compile s | peak MiB | devices |")
  assert lines[2] == "| a | 8 | 100.0 | - | - | 80.0 | 1.2 | - | 1 x cpu (cpu) |"
  assert lines[3] == "| b | 256 | 50000.0 | 0.195 | 1 | 5.1 | 30.0 | 1234 | 8 x H100 (gpu) |"


def _classifier_flops_bracket(batch_size: int) -> tuple[float, float]:
  """Bounds on the FLOPs of one paper-classifier train step, from its parameter shapes.

  Each convolution (stride 1, SAME) and the dense layer does kernel.size multiply-adds per
  output position: k*k*c_in*c_out for a full conv, c_in*c_out for a 1x1 conv or the dense
  layer, 9*C for the depthwise 3x3. An image has side**2 positions in a block's maps: 32
  until the first pool, then 16, then 8; the dense layer has one. M is the sum over layers,
  per image. The forward pass costs 2*M FLOPs (a multiply-add is 2), the weight gradients
  as much again, and the input gradients as much less the stem's (nothing needs the
  images' gradient): at least 2*B*(3*M - M_stem) in all. The rest (BatchNorm, ReLU, the
  adds, pooling and the loss, both ways) is elementwise on the feature maps, a few tens of
  FLOPs per map element, and Adam a few tens per parameter: at most 100 per element of A
  (the conv and dense outputs of an image, c_out*side**2, times B) and 100 per parameter.
  """
  import jax
  import jax.numpy as jnp
  from cifarjax.models import paper_classifier
  from cifarjax.models.classifier import PAPER_LAYOUT
  model = paper_classifier()
  params = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))["params"]
  side_of, side, seen = {"Conv_0": 32, "Dense_0": 1}, 32, {"expand": 0, "residual": 0}
  for token in PAPER_LAYOUT:
    if token == "pool":
      side //= 2
      continue
    side_of[f"{token.capitalize()}Block_{seen[token]}"] = side
    seen[token] += 1
  macs = outputs = stem_macs = num_params = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    num_params += leaf.size
    top, name = path[0].key, path[-1].key
    if name != "kernel":
      continue
    positions = side_of[top] ** 2
    macs += leaf.size * positions
    outputs += leaf.shape[-1] * positions
    if top == "Conv_0":
      stem_macs = leaf.size * positions
  low = 2 * batch_size * (3 * macs - stem_macs)
  return low, low + 100 * batch_size * outputs + 100 * num_params


@pytest.mark.integration
def test_bench_classifier_row(capsys, monkeypatch):
  """The row times the paper classifier's real train step, compiled once ahead of time: one
  call, then --steps timed calls on a batch of --batch-size, each given the state the last
  returned. Its FLOPs are XLA's cost of that same executable, and its TFLOP/s theirs."""
  import jax
  from cifarjax import train_classifier
  calls, executables = [], []
  real_make = train_classifier.make_train_step

  class Counted:
    """The compiled step, recording each call's state.step and batch shape."""

    def __init__(self, compiled):
      self.compiled = compiled
      executables.append(compiled)

    def __call__(self, state, batch, rng):
      calls.append((int(state.step), batch[0].shape))
      return self.compiled(state, batch, rng)

    def __getattr__(self, name):
      return getattr(self.compiled, name)

  class CountedJit:
    def __init__(self, jitted):
      self.jitted = jitted

    def lower(self, *args):
      lowered = self.jitted.lower(*args)
      return type("Lowered", (), {"compile": lambda _: Counted(lowered.compile())})()

  monkeypatch.setattr(train_classifier, "make_train_step",
                      lambda *a, **k: CountedJit(real_make(*a, **k)))
  assert cli.main(["bench", "classifier", "--batch-size", "8", "--steps", "2", "--json"]) == 0
  printed = capsys.readouterr()
  row = json.loads(printed.out.splitlines()[-1])
  # What it does is said as it starts: compiling takes the longest.
  notes = [line for line in printed.err.splitlines() if line.startswith("cifarjax bench: ")]
  assert notes[0] == "cifarjax bench: compiling the classifier's train step (seconds to minutes)"
  assert notes[1].startswith("cifarjax bench: compiled in ")
  assert notes[1].endswith(" s; timing 3 calls of the classifier's train step")
  assert {key for _, key, _ in bench.COLUMNS} <= set(row)  # a value for every column
  assert row["benchmark"] == "classifier train step"
  assert row["batch_size"] == 8
  assert len(executables) == 1
  assert calls == [(0, (8, 32, 32, 3)), (1, (8, 32, 32, 3)), (2, (8, 32, 32, 3))]
  assert row["step_ms"] > 0 and row["compile_s"] > 0
  assert "cpu" in row["devices"] and row["backend"] == "cpu" and row["device_count"] == 1
  assert row["device_kind"] == jax.devices()[0].device_kind
  # One device: the cost of the program it runs is the step's.
  assert row["flops"] == bench.cost_flops(executables[0].cost_analysis())
  low, high = _classifier_flops_bracket(8)
  assert low <= row["flops"] <= high, (low, row["flops"], high)
  assert row["tflops"] == pytest.approx(row["flops"] / (row["step_ms"] / 1e3) / 1e12, rel=1e-9)


class _FakeCompiled:
  def __init__(self, cost, text="ENTRY %main { ROOT %dot = f32[4,16] dot(%x, %w) }"):
    self.cost, self.text = cost, text

  def cost_analysis(self):
    if isinstance(self.cost, Exception):
      raise self.cost
    return self.cost

  def as_text(self):
    return self.text


@pytest.mark.parametrize("cost, flops", [
    ({"flops": 12.0, "bytes accessed": 3.0}, 12.0),
    ([{"flops": 12.0}], 12.0),  # older JAX: a list of one dict per program
    ({"bytes accessed": 3.0}, None),  # a backend that counts no FLOPs
    ({"flops": -1.0}, None),
    (None, None),
    ([], None),
    (NotImplementedError("no cost analysis"), None),
])
def test_compiled_flops_reads_every_shape_of_cost_analysis(cost, flops):
  assert bench.compiled_flops(_FakeCompiled(cost), num_devices=1) == flops


LOOP_OF_DOTS = """HloModule m

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %f = f32[8] fusion(%x), kind=kOutput, calls=%fused_dot
}

%fused_dot (a: f32[8]) -> f32[8] {
  ROOT %d = f32[8] dot(%a, %a)
}

ENTRY %main (t: (s32[], f32[8])) -> (s32[], f32[8]) {
  ROOT %w = (s32[], f32[8]) while(%t), condition=%c, body=%body
}"""


def test_compiled_flops_counts_all_devices_and_refuses_loops_of_matrix_work():
  """A loop whose body calls a dot (through a fusion) is costed once per program, not per
  trip: None. A loop of elementwise work (random numbers' rounds) leaves the count."""
  assert bench.compiled_flops(_FakeCompiled({"flops": 12.0}), num_devices=8) == 96.0
  assert bench.compiled_flops(_FakeCompiled({"flops": 12.0}, LOOP_OF_DOTS), num_devices=1) is None
  elementwise = LOOP_OF_DOTS.replace("dot(%a, %a)", "add(%a, %a)")
  assert bench.compiled_flops(_FakeCompiled({"flops": 12.0}, elementwise), num_devices=1) == 12.0


def test_compiled_flops_of_real_programs():
  """A matmul costs its 2*m*k*n; a loop of matmuls gets None (XLA would cost one trip); a
  matmul beside a loop of additions is counted."""
  import jax
  import jax.numpy as jnp
  x, w = jnp.ones((4, 16)), jnp.ones((16, 16))
  matmul = jax.jit(jnp.matmul).lower(x, w).compile()
  assert bench.compiled_flops(matmul, 1) == 2 * 4 * 16 * 16
  loop = jax.jit(lambda x: jax.lax.fori_loop(0, 3, lambda _, y: y @ w, x)).lower(x).compile()
  assert bench.compiled_flops(loop, 1) is None
  beside = jax.jit(lambda x, n: jax.lax.fori_loop(0, n, lambda _, y: y + 1.0, x @ w))
  flops = bench.compiled_flops(beside.lower(x, 3).compile(), 1)
  assert flops is not None and flops >= 2 * 4 * 16 * 16


@pytest.mark.integration
def test_the_generators_train_step_has_a_flop_count():
  """Its random numbers loop (threefry's rounds) but its matrix work does not: counted, at
  2.5-4x the forward pass's (backward ~2x forward, plus the optimizer)."""
  import jax
  from cifarjax import mesh as mesh_lib, train_diffusion as td
  from cifarjax.kinds import GENERATOR
  from cifarjax.config import DiffusionConfig
  mesh = mesh_lib.make_mesh()
  config = DiffusionConfig(batch_size=8, unet="tiny")
  model, schedule = td.make_unet(config, 10), td.make_schedule(config)
  tx, _ = td.make_optimizer(config, 195)
  state = jax.device_put(GENERATOR.init_state(model, tx, 0, ema=True), mesh_lib.replicated(mesh))
  batch = bench._random_batch(mesh, 8, -1, 1)
  step = td.make_train_step(model, schedule, tx, mesh, config)
  train_flops = bench.compiled_flops(step.lower(state, batch, jax.random.PRNGKey(0)).compile(), 1)
  forward = jax.jit(lambda p, x, t, y: model.apply({"params": p}, x, t, y))
  t = jax.numpy.zeros((8,), jax.numpy.int32)
  forward_flops = bench.compiled_flops(forward.lower(state.params, batch[0], t, batch[1]).compile(), 1)
  assert forward_flops and train_flops
  assert 2.5 <= train_flops / forward_flops <= 4, (train_flops, forward_flops)


class _FakeClock:
  """time.perf_counter for bench: each call of the timed function advances it."""

  def __init__(self):
    self.now = 0.0

  def perf_counter(self):
    return self.now


def test_time_calls_leaves_the_first_call_out_of_the_per_step_time(monkeypatch):
  import jax.numpy as jnp
  clock = _FakeClock()
  monkeypatch.setattr(bench, "time", clock)
  durations = iter([7.0, 0.2, 0.4, 0.6])  # compile + run, then three steps

  def fn():
    clock.now += next(durations)
    return jnp.zeros(())
  first_s, step_s = bench.time_calls(fn, steps=3)
  assert first_s == pytest.approx(7.0)
  assert step_s == pytest.approx(0.4)  # (0.2 + 0.4 + 0.6) / 3
  row = bench._row("x", type("Mesh", (), {"size": 1})(), 8, first_s, step_s, flops=2e12)
  assert (row["compile_s"], row["step_ms"]) == (pytest.approx(7.0), pytest.approx(400.0))
  assert row["images_per_s"] == pytest.approx(20.0)  # 8 images every 0.4 s
  assert row["tflops"] == pytest.approx(5.0)  # 2e12 FLOPs every 0.4 s


def test_unknown_benchmark_is_refused(capsys):
  with pytest.raises(SystemExit):
    cli.main(["bench", "resnet"])
  assert "unknown benchmark 'resnet'" in capsys.readouterr().err
