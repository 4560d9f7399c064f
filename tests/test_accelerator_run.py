"""experiments/accelerator_run.sh end to end on the CPU, with tiny settings and a short budget:
a first call, then a second on a fresh machine's workdir resumed from the first call's outputs."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration


def accelerator_run(tmp_path, out, work, **env):
  env = dict(os.environ, WORK=str(work), CLASSIFIER_STEPS="8", STEPS_PER_CALL="4", UNET="tiny",
             GENERATOR_SECONDS="5", PYTHONPATH=str(ROOT),
             PATH=f"{pathlib.Path(sys.executable).parent}:{os.environ['PATH']}",
             XLA_FLAGS="--xla_backend_optimization_level=0", **env)
  env.pop("FID_WEIGHTS", None)
  done = subprocess.run(["bash", str(ROOT / "experiments/accelerator_run.sh"), "synthetic",
                         str(out), "600"], cwd=tmp_path, env=env, capture_output=True, text=True,
                        timeout=1800)
  assert done.returncode == 0, done.stderr[-3000:]
  files = sorted(p.name for p in out.iterdir())
  assert len(files) <= 8 and all(p.stat().st_size <= 15 * 2**20 for p in out.iterdir()), files
  assert sum(p.stat().st_size for p in out.iterdir()) <= 64 * 2**20
  return files


def latest_step(workdir) -> int:
  return max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def test_accelerator_run_trains_every_model_and_a_later_call_resumes_from_its_outputs(tmp_path):
  out, work = tmp_path / "out", tmp_path / "work"
  files = accelerator_run(tmp_path, out, work)
  assert {"report.md", "classifier-summary.json", "state.tar.part-00"} <= set(files), files
  assert not any(f.startswith("samples") for f in files)  # no weights: the state is scored later
  assert json.loads((out / "classifier-summary.json").read_text())["steps"] == 8
  # The paper generator's time runs out while it trains: it stops with a checkpoint, and the
  # improved one trains to the same step.
  first = {run: latest_step(work / "generators" / run) for run in ("paper", "improved")}
  assert 1 <= first["paper"] < 50_000 and first["improved"] == first["paper"], first
  assert f"Generator beyond the paper: {first['paper']:,} steps" in (out / "report.md").read_text()

  # A fresh machine: only the first call's outputs travel back.
  out2, work2 = tmp_path / "out2", tmp_path / "work2"
  accelerator_run(tmp_path, out2, work2, RESUME=str(out))
  for run in ("paper", "improved"):  # only the latest checkpoint travelled
    assert [p.name for p in (work2 / "generators" / run / "checkpoints").iterdir()
            if p.name.isdigit() and int(p.name) < first[run]] == []
  second = {run: latest_step(work2 / "generators" / run) for run in ("paper", "improved")}
  assert second["paper"] > first["paper"] and second["improved"] == second["paper"], second
  metrics = [json.loads(l) for l in
             (work2 / "classifier" / "metrics.jsonl").read_text().splitlines()]
  assert json.loads((out2 / "classifier-summary.json").read_text())["steps"] == 8
  assert max(m.get("step", 0) for m in metrics) == 8  # the classifier was done: not trained again
