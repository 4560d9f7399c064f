"""experiments/generator_improved.py: runs trained to equal steps within a time limit, and its
grid of FIDs (samplers, raw and averaged weights, guidance) measured, kept, reused and cut
by a budget. Training and sampling are real (tiny U-Nets, --quick); the Inception network
is replaced by a fingerprint of the samples, so every cell's value tells which images it
was computed from. The FID itself is tested in test_fid_*.py."""

import importlib
import json
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


def experiment_with_fingerprints(monkeypatch, name):
  """The experiment script `name`, imported with the fingerprint standing in for Inception."""
  monkeypatch.syspath_prepend(str(EXPERIMENTS))
  monkeypatch.setattr(fid, "training_reference_stats", lambda *a, **k: (np.zeros(1), np.eye(1)))
  monkeypatch.setattr(fid, "load_inception_params", lambda weights: {})
  monkeypatch.setattr(fid, "stats_from_images", fingerprint_stats)
  return importlib.import_module(name)


@pytest.fixture
def script(monkeypatch):
  return experiment_with_fingerprints(monkeypatch, "generator_improved")


@pytest.mark.integration
def test_equal_steps_and_the_fid_grid(script, tmp_path, monkeypatch):
  weights = tmp_path / "weights.npz"  # stands in for the Inception weights: only its sha256 counts
  weights.write_bytes(b"weights")
  section = script.run(tmp_path, quick=True, steps=10_000, only=["paper", "improved"],
                       fid_weights=weights, num=4, train_seconds=15)
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

  # A second call samples nothing: every cell is kept in fid.jsonl, and a record of another
  # training step, sample count or weights file is not taken for it.
  with (tmp_path / "fid.jsonl").open("a") as f:
    for change in ({"train_step": steps["paper"] + 1}, {"num": 5}, {"fid_weights_sha256": "0"}):
      f.write(json.dumps({**records[0], "fid": 1e6, **change}) + "\n")
  def no_sampling(*args, **kwargs):
    raise AssertionError("sampled again")
  from cifarjax import generate
  monkeypatch.setattr(generate, "generate", no_sampling)
  again = script.run(tmp_path, quick=True, steps=steps["paper"], only=["paper", "improved"],
                     fid_weights=weights, num=4)
  assert again.table == section.table

  # Past its budget, a call measures nothing new and says so in every cell it lacks.
  runs = {n: (script.run_config(n, steps["paper"], None, True), tmp_path / n)
          for n in ("paper", "improved")}
  grid = script.cells(list(runs), {n: c for n, (c, _) in runs.items()})
  late = script.measure_fids(runs, grid, tmp_path, 8, weights, budget_s=1.0,
                             start=time.monotonic() - 10)
  assert late == []
  table = script.fid_table(runs, grid, late)
  assert table.count("not measured") == len(grid)


def test_estimated_seconds_scale_the_largest_measured_fid(script):
  assert script.estimated_seconds([], 10_000, 1000) == 0.0  # nothing measured: no estimate
  records = [dict(num=100, sampler_steps=20, guidance=0.0, sample_s=40.0, feature_s=5.0),
             dict(num=1000, sampler_steps=20, guidance=1.0, sample_s=200.0, feature_s=20.0)]
  # by the larger, guided (2 passes a step): 200 s / (1000 * 20 * 2) per image and pass,
  # 20 s / 1000 per image's features
  assert script.estimated_seconds(records, 500, 1000) == pytest.approx(
      500 * (1000 * 200.0 / 40_000 + 20.0 / 1000))
  assert script.estimated_seconds(records, 500, 1000, guidance=2.0) == pytest.approx(
      500 * (2 * 1000 * 200.0 / 40_000 + 20.0 / 1000))


def test_train_for_returns_the_timed_stop_and_passes_a_ctrl_c_on(script, monkeypatch):
  from cifarjax import train_diffusion
  from cifarjax.errors import Interrupted

  def stopped_at_7(config, workdir, time_limit_s=None):
    raise Interrupted(7, 100)
  monkeypatch.setattr(train_diffusion, "train", stopped_at_7)
  assert script.train_for(None, None, seconds=0) == 7  # the time limit stopped it
  with pytest.raises(Interrupted):  # stopped before its time: a person's Ctrl-C, not swallowed
    script.train_for(None, None, seconds=3600)
  with pytest.raises(Interrupted):
    script.train_for(None, None)
