"""`cifarjax bench`: the table it prints, what a row times (on a fake clock), and one real
benchmark row (whose timings are machine-dependent and so not asserted)."""

import json

import pytest

from cifarjax import bench, cli
from cifarjax.commands import info


def test_cli_names_every_benchmark():
  assert info.BENCHMARK_NAMES == tuple(bench.BENCHMARKS)


def test_table_has_one_line_per_row_and_dashes_for_unreported_memory():
  rows = [
      {"benchmark": "a", "batch_size": 8, "images_per_s": 100.0, "step_ms": 80.0,
       "compile_s": 1.25, "peak_device_mib": None, "devices": "1 x cpu (cpu)"},
      {"benchmark": "b", "batch_size": 256, "images_per_s": 5e4, "step_ms": 5.12,
       "compile_s": 30.0, "peak_device_mib": 1234.4, "devices": "8 x H100 (gpu)"},
  ]
  lines = list(bench.table_lines(rows))
  assert lines[0] == ("| benchmark | batch | images/s | step ms | compile s | peak MiB "
                      "| devices |")
  assert lines[2] == "| a | 8 | 100.0 | 80.0 | 1.2 | - | 1 x cpu (cpu) |"
  assert lines[3] == "| b | 256 | 50000.0 | 5.1 | 30.0 | 1234 | 8 x H100 (gpu) |"


def test_bench_classifier_row(capsys, monkeypatch):
  """The row times the paper classifier's real train step: one call to compile, then
  --steps timed calls on a batch of --batch-size, each given the state the last returned."""
  from cifarjax import train_classifier
  calls = []
  real_make = train_classifier.make_train_step

  def make_train_step(*args, **kwargs):
    step = real_make(*args, **kwargs)

    def counted(state, batch, rng):
      calls.append((int(state.step), batch[0].shape))
      return step(state, batch, rng)
    return counted
  monkeypatch.setattr(train_classifier, "make_train_step", make_train_step)
  assert cli.main(["bench", "classifier", "--batch-size", "8", "--steps", "2", "--json"]) == 0
  row = json.loads(capsys.readouterr().out.splitlines()[-1])
  assert row["benchmark"] == "classifier train step"
  assert row["batch_size"] == 8
  assert calls == [(0, (8, 32, 32, 3)), (1, (8, 32, 32, 3)), (2, (8, 32, 32, 3))]
  assert row["step_ms"] > 0 and row["compile_s"] > 0
  assert "cpu" in row["devices"]


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
  row = bench._row("x", type("Mesh", (), {"size": 1})(), 8, first_s, step_s)
  assert (row["compile_s"], row["step_ms"]) == (pytest.approx(7.0), pytest.approx(400.0))
  assert row["images_per_s"] == pytest.approx(20.0)  # 8 images every 0.4 s


def test_unknown_benchmark_is_refused(capsys):
  with pytest.raises(SystemExit):
    cli.main(["bench", "resnet"])
  assert "unknown benchmark 'resnet'" in capsys.readouterr().err
