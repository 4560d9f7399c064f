"""experiments/generator_improved.py: runs trained to equal steps within a time limit, and its
grid of FIDs (samplers, raw and averaged weights, guidance) measured, kept, reused and cut
by a budget. Training and sampling are real (tiny U-Nets, --quick); the Inception network
is replaced by a fingerprint of the samples, so every cell's value tells which images it
was computed from. The FID itself is tested in test_fid_*.py."""

import importlib
import pathlib
import time

import numpy as np
import pytest

from cifarjax import fid
from cifarjax.train_diffusion import load_trained

EXPERIMENTS = pathlib.Path(__file__).resolve().parents[1] / "experiments"
PROJECTION = np.random.default_rng(0).normal(size=4 * 32 * 32 * 3)


def fingerprint_stats(images, variables, **kwargs):
  """Stands in for the Inception statistics: a random projection of the samples as the mean,
  so the Frechet distance to the stand-in reference, its square, tells the images apart."""
  return np.array([images.astype(np.float64).reshape(-1) @ PROJECTION]), np.eye(1)


@pytest.fixture
def script(monkeypatch):
  monkeypatch.syspath_prepend(str(EXPERIMENTS))
  monkeypatch.setattr(fid, "training_reference_stats", lambda *a, **k: (np.zeros(1), np.eye(1)))
  monkeypatch.setattr(fid, "load_inception_params", lambda weights: {})
  monkeypatch.setattr(fid, "stats_from_images", fingerprint_stats)
  return importlib.import_module("generator_improved")


@pytest.mark.slow
def test_equal_steps_and_the_fid_grid(script, tmp_path, monkeypatch):
  section = script.run(tmp_path, quick=True, steps=10_000, only=["paper", "improved"],
                       fid_weights="weights.npz", num=4, train_seconds=15)
  steps = {name: int(load_trained(tmp_path / name)[1].step) for name in ("paper", "improved")}
  # The paper run stopped on time (a checkpoint there), the improved run trained as far.
  assert 1 <= steps["paper"] < 10_000 and steps["improved"] == steps["paper"], steps
  assert f"{steps['paper']:,} steps" in section.title

  records = script.read_records(tmp_path / "fid.jsonl")
  grid = script.cells(["paper", "improved"], {
      "paper": script.PAPER, "improved": script.IMPROVED})
  keys = [script.fid_key(r) for r in records]
  assert keys == grid and grid[-1] == ("improved", "ema", 0.0, "ddpm", 1000)
  value = {key: r["fid"] for key, r in zip(keys, records)}
  for run in ("paper", "improved"):  # raw and averaged weights sample different images
    assert value[run, "raw", 0.0, "dpm++2m", 20] != value[run, "ema", 0.0, "dpm++2m", 20]
  guided = [value["improved", "ema", g, "dpm++2m", 20] for g in (0.0, *script.GUIDANCE)]
  assert len(set(guided)) == len(guided)  # each guidance scale changes the samples
  assert not any(k[0] == "paper" and k[2] for k in keys)  # no null label learned: no guidance
  assert all(r["train_step"] == steps["paper"] and r["num"] == 4 for r in records)
  rows = {tuple(c.strip() for c in line.split("|")[1:4]): line for line in
          section.table.splitlines() if line.startswith("| paper") or line.startswith("| improved")}
  assert f"{value['paper', 'ema', 0.0, 'ddpm', 1000]:.2f}" in rows["paper", "ema", "0"]
  assert "not measured" not in section.table

  # A second call samples nothing: every cell is kept in fid.jsonl.
  def no_sampling(*args, **kwargs):
    raise AssertionError("sampled again")
  from cifarjax import generate
  monkeypatch.setattr(generate, "generate", no_sampling)
  again = script.run(tmp_path, quick=True, steps=steps["paper"], only=["paper", "improved"],
                     fid_weights="weights.npz", num=4)
  assert again.table == section.table

  # Past its budget, a call measures nothing new and says so in every cell it lacks.
  runs = {n: (script.run_config(n, steps["paper"], None, True), tmp_path / n)
          for n in ("paper", "improved")}
  grid = script.cells(list(runs), {n: c for n, (c, _) in runs.items()})
  late = script.measure_fids(runs, grid, tmp_path, 8, "weights.npz", budget_s=1.0,
                             start=time.monotonic() - 10)
  assert late == []
  table = script.fid_table(runs, grid, late)
  assert table.count("not measured") == len(grid)


def test_estimated_seconds_scale_the_largest_measured_fid():
  import sys
  sys.path.insert(0, str(EXPERIMENTS))
  try:
    script = importlib.import_module("generator_improved")
  finally:
    sys.path.remove(str(EXPERIMENTS))
  assert script.estimated_seconds([], 10_000, 1000) == 0.0  # nothing measured: no estimate
  records = [dict(num=100, sampler_steps=20, sample_s=40.0, feature_s=5.0),  # compile-heavy
             dict(num=1000, sampler_steps=20, sample_s=100.0, feature_s=20.0)]
  # by the larger: 100 s / (1000 * 20) per image-step, 20 s / 1000 per image's features
  assert script.estimated_seconds(records, 500, 1000) == pytest.approx(
      500 * (1000 * 100.0 / 20_000 + 20.0 / 1000))
