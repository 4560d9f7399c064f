"""`cifarjax bench`: the table it prints and one real benchmark row (timings are not asserted)."""

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


def test_bench_classifier_row(capsys):
  assert cli.main(["bench", "classifier", "--batch-size", "8", "--steps", "1", "--json"]) == 0
  row = json.loads(capsys.readouterr().out.splitlines()[-1])
  assert row["benchmark"] == "classifier train step"
  assert row["batch_size"] == 8
  assert row["images_per_s"] == pytest.approx(8 / (row["step_ms"] / 1e3))
  assert row["compile_s"] > 0
  assert "cpu" in row["devices"]


def test_unknown_benchmark_is_refused(capsys):
  with pytest.raises(SystemExit):
    cli.main(["bench", "resnet"])
  assert "unknown benchmark 'resnet'" in capsys.readouterr().err
