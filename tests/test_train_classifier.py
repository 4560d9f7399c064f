import dataclasses
import json
import zipfile
import io

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from cifarjax import cli, config as config_lib, mesh as mesh_lib, runlog
from cifarjax.config import ClassifierConfig
from cifarjax.data.synthetic import load_synthetic
from cifarjax.models import paper_classifier
from cifarjax.train_classifier import (evaluate_workdir, init_state, load_trained, make_optimizer,
                                       make_train_step, train)

TINY = ClassifierConfig(data="synthetic", steps=6, batch_size=16, log_every=3, eval_every=3,
                        eval_batch_size=64, train_eval_size=64, checkpoint_every=3)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run")
  summary = train(TINY, workdir)
  return workdir, summary


def test_run_outputs(run_dir):
  workdir, summary = run_dir
  for name in ("config.json", "classes.json", "metrics.jsonl", "summary.json", "training_graph.png"):
    assert (workdir / name).is_file(), name
  saved = runlog.read_json(workdir / "config.json")
  assert saved.pop("type") == "ClassifierConfig"
  assert config_lib.from_dict(ClassifierConfig, saved) == TINY
  assert summary["steps"] == 6 and summary["num_params"] == 88_106  # 10 synthetic classes
  records = runlog.read_metrics(workdir)
  train_steps = [r["step"] for r in records if "loss" in r]
  assert train_steps == [3, 6]
  assert {"loss", "accuracy", "lr", "images_per_sec"} <= set(records[0])
  evals = [r for r in records if "test_accuracy" in r]
  assert [r["step"] for r in evals] == [3, 6]
  assert summary["final_test_accuracy"] == evals[-1]["test_accuracy"]
  assert summary["best_test_accuracy"] == max(r["test_accuracy"] for r in evals)


def test_exact_resume(run_dir, tmp_path):
  workdir, _ = run_dir
  train(dataclasses.replace(TINY, steps=3), tmp_path)  # "interrupted" after its checkpoint at 3
  train(TINY, tmp_path)  # resumes from step 3 to 6
  _, uninterrupted, _, _ = load_trained(workdir)
  _, resumed, _, _ = load_trained(tmp_path)
  chex.assert_trees_all_equal(jax.device_get(uninterrupted), jax.device_get(resumed))
  assert [r["step"] for r in runlog.read_metrics(tmp_path) if "loss" in r] == [3, 6]


def test_resume_with_another_config_is_refused(run_dir):
  workdir, _ = run_dir
  with pytest.raises(ValueError, match="learning_rate differ"):
    train(dataclasses.replace(TINY, learning_rate=0.1), workdir)


def test_eval_cli_json_matches_summary(run_dir, capsys):
  workdir, summary = run_dir
  assert cli.main(["eval-classifier", "--workdir", str(workdir), "--json", "--batch-size", "64"]) == 0
  result = json.loads(capsys.readouterr().out)
  assert result["num_examples"] == 512
  assert result["accuracy"] == pytest.approx(summary["final_test_accuracy"], abs=1e-6)
  assert {"accuracy", "top5", "num_examples"} <= set(result)


def test_eval_on_image_zip_matches_classes_by_name(run_dir, tmp_path):
  workdir, _ = run_dir
  test = load_synthetic("test")
  keep = np.isin(test.labels, [3, 7])
  path = tmp_path / "two_classes.zip"
  with zipfile.ZipFile(path, "w") as zf:
    for i in np.flatnonzero(keep):
      buf = io.BytesIO()
      Image.fromarray(test.images[i]).save(buf, format="PNG")
      zf.writestr(f"test/class_{test.labels[i]}/{i:04d}.png", buf.getvalue())
  result = evaluate_workdir(workdir, str(path), "test", batch_size=64)
  model, state, _, _ = load_trained(workdir)
  from cifarjax import augment
  x = augment.normalize(augment.to_float(jnp.asarray(test.images[keep])))
  logits = model.apply({"params": state.params, "batch_stats": state.batch_stats}, x)
  expected = float(np.mean(np.argmax(logits, -1) == test.labels[keep]))
  assert result["num_examples"] == keep.sum()
  assert result["accuracy"] == pytest.approx(expected, abs=1e-6)


def test_eval_of_an_empty_workdir(tmp_path):
  with pytest.raises(FileNotFoundError, match="no config.json"):
    evaluate_workdir(tmp_path)
  assert cli.main(["eval-classifier", "--workdir", str(tmp_path)]) == 2


def test_overfits_a_small_batch():
  mesh = mesh_lib.make_mesh()
  model = paper_classifier(num_classes=10)
  config = ClassifierConfig(learning_rate=0.01)
  tx, _ = make_optimizer(config, steps_per_epoch=1000)
  state = jax.device_put(init_state(model, tx, seed=0), mesh_lib.replicated(mesh))
  rng = np.random.default_rng(0)
  batch = (jnp.asarray(rng.normal(size=(16, 32, 32, 3)), jnp.float32),
           jnp.asarray(rng.integers(0, 10, 16), jnp.int32))  # random labels: only memorising fits
  step = make_train_step(model, tx, mesh)
  for _ in range(60):
    state, metrics = step(state, batch, jax.random.PRNGKey(0))
  assert float(metrics["accuracy"]) == 1.0
  assert float(metrics["loss"]) < 0.1


def test_info_json_reports_paper_classifier_size(capsys):
  assert cli.main(["info", "--json"]) == 0
  info = json.loads(capsys.readouterr().out)
  assert info["classifier_params"] == 99_716
  assert info["device_count"] >= 1
