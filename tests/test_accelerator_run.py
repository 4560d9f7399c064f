"""experiments/accelerator_run.sh end to end on the CPU, with tiny settings and a short budget."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.integration

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_accelerator_run_trains_every_model_and_keeps_the_samples(tmp_path):
  out, work = tmp_path / "out", tmp_path / "work"
  env = dict(os.environ, WORK=str(work), CLASSIFIER_STEPS="8", STEPS_PER_CALL="4", UNET="tiny",
             NUM_SAMPLES="6", SAMPLER="ddim", SAMPLE_STEPS="2", GENERATOR_SECONDS="5",
             PYTHONPATH=str(ROOT), PATH=f"{pathlib.Path(sys.executable).parent}:{os.environ['PATH']}",
             XLA_FLAGS="--xla_backend_optimization_level=0")
  env.pop("FID_WEIGHTS", None)
  # The paper generator's time runs out while it trains: it must stop with a checkpoint, and
  # the improved one train to the same step. (Where the first steps outlast the 5 s, the
  # run stops right after the first.)
  done = subprocess.run(["bash", str(ROOT / "experiments/accelerator_run.sh"), "synthetic",
                         str(out), "600"], cwd=tmp_path, env=env, capture_output=True, text=True,
                        timeout=900)
  assert done.returncode == 0, done.stderr[-3000:]
  files = sorted(p.name for p in out.iterdir())
  assert len(files) <= 8 and all(p.stat().st_size <= 16 * 2**20 for p in out.iterdir()), files
  classifier = json.loads((out / "classifier-summary.json").read_text())
  assert classifier["steps"] == 8 and classifier["final_test_accuracy"] is not None
  last = {}
  for run in ("paper", "improved"):
    logged = (out / f"generator-{run}-metrics.jsonl").read_text().splitlines()
    last[run] = json.loads(logged[-1])["step"]
    assert list((work / "generators" / run / "checkpoints").iterdir())
  assert 1 <= last["paper"] < 50_000 and last["improved"] == last["paper"], last  # equal steps
  table = (out / "generators.md").read_text()
  assert f"Generator beyond the paper: {last['paper']:,} steps" in table and "| improved |" in table
  halves = [np.load(out / f"samples-{i}-of-2.npz") for i in (1, 2)]
  images = np.concatenate([h["images"] for h in halves])
  assert images.shape == (6, 32, 32, 3) and images.dtype == np.uint8
  assert "generator-fids.jsonl" not in files  # no weights given: the samples are kept for later
