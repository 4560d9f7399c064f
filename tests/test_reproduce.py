"""`experiments/reproduce.py --quick` runs every experiment end to end and writes the report."""

import os
import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "reproduce.py"


def quick_env(tmp_path_factory):
  cache = os.environ.get("CIFARJAX_TEST_JAX_CACHE") or tmp_path_factory.getbasetemp().parent / "jax-cache"
  # The tiny runs spend more time compiling than running: without LLVM's optimisations
  # (what is checked here is that every experiment runs and reports) a script takes ~70%.
  flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()
  return {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(cache),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "XLA_FLAGS": flags}


def test_quick_reproduction_writes_the_report(tmp_path, tmp_path_factory):
  out = tmp_path / "reproduce"
  stderr = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out)],
                          env=quick_env(tmp_path_factory), check=True, timeout=600,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True).stderr
  # What it does is said as it goes (compiling and training take minutes).
  for text in ("reproduce.py: loading synthetic", "reproduce.py: starting at step 0 of 4",
               "reproduce.py: compiling the train step", "reproduce.py: sampling 20 images"):
    assert text in stderr, text
  report = (out / "REPORT.md").read_text()
  for text in ("--quick", "## Classifier baseline (2 seeds)", "58.2% +- 2.7%",  # paper's numbers
               "## Regularisation ablations", "43.26%", "| aug-jitter |",
               "## Noise schedules", "90.52", "75.19", "## Final generator", "58.00",
               "skipped: no FID weights", "## Runs", "1 process(es)", "### Configs"):
    assert text in report, text
  for figure in ("training_graph.png", "final/samples.png", "final/interpolation.png"):
    assert (out / figure).is_file() and f"]({figure})" in report, figure
  runs = [line for line in report.splitlines() if line.endswith(" s |")]
  assert len(runs) == 2 + 4 + 2 + 1  # baseline seeds, ablations, schedules, final


def test_quick_improved_classifier_table(tmp_path, tmp_path_factory):
  """experiments/classifier_improved.py: the runs it names train, and the table holds a row
  per evaluation of them (the paper run's raw, averaged and mirrored weights; the improved
  run's raw and its own), a column per seed, and the change against the paper row."""
  script = SCRIPT.parent / "classifier_improved.py"
  table = subprocess.run(
      [sys.executable, str(script), "--quick", "--out", str(tmp_path), "--seeds", "3",
       "--only", "paper", "improved"], env=quick_env(tmp_path_factory), check=True,
      timeout=600, capture_output=True, text=True).stdout
  rows = [line.split(" | ")[0].strip("| ") for line in table.splitlines() if line.startswith("| ")]
  assert rows == ["variant", "paper", "+ moving average of the weights",
                  "+ mirror averaging at test time", "improved, raw weights, no mirror",
                  "**improved**"]
  assert "| seed 3 | mean | vs paper (points) |" in table
  assert sorted(p.name for p in tmp_path.iterdir()) == ["improved-seed3", "paper-seed3"]
