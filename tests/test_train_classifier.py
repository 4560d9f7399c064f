import dataclasses
import json
import zipfile
import io

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

from cifarjax import cli, config as config_lib, loop, mesh as mesh_lib, registry, runlog
from cifarjax.config import ClassifierConfig
from cifarjax.data.synthetic import load_synthetic
from cifarjax.models import paper_classifier
from cifarjax.kinds import CLASSIFIER
from cifarjax.train_classifier import (evaluate_workdir, load_trained, make_draw, make_optimizer,
                                       make_train_step, train)

from _traces import loop_traces

TINY = ClassifierConfig(data="synthetic", steps=6, batch_size=16, log_every=3, eval_every=3,
                        eval_batch_size=64, train_eval_size=64, checkpoint_every=3)

RUN_TRACES = {}  # run_dir's train step: its name, calls and jax traces


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run")
  with loop_traces() as traces:
    summary = train(TINY, workdir)
  RUN_TRACES.update(traces)
  return workdir, summary


def test_run_outputs(run_dir):
  workdir, summary = run_dir
  for name in ("config.json", "classes.json", "metrics.jsonl", "summary.json", "training_graph.png"):
    assert (workdir / name).is_file(), name
  saved = runlog.read_json(workdir / "config.json")
  assert saved.pop("type") == "ClassifierConfig"
  # The code of the model it names: no module to import again (cifarjax's own), and its hash.
  assert saved.pop("imports") == []
  assert saved.pop("registry") == {"model": {
      "name": "paper", "module": "cifarjax.models.classifier",
      "source_sha256": registry.fingerprint(paper_classifier)}}
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
  state = jax.device_put(CLASSIFIER.init_state(model, tx, 0), mesh_lib.replicated(mesh))
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


def _torch_adam_l2(params, grad_fn, steps, lr_at, weight_decay, b1=0.9, b2=0.999, eps=1e-8):
  """torch.optim.Adam(weight_decay=wd) written out in float64: the L2 term is added to the
  gradient before the moments (not AdamW's decay of the weights beside them)."""
  p = np.asarray(params, np.float64)
  m, v = np.zeros_like(p), np.zeros_like(p)
  for t in range(1, steps + 1):
    g = grad_fn(p) + weight_decay * p
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    denom = np.sqrt(v) / np.sqrt(1 - b2**t) + eps
    p = p - lr_at(t - 1) / (1 - b1**t) * m / denom
  return p


def test_optimizer_is_pytorch_adam_with_l2_and_per_epoch_decay():
  """Five steps on 0.5 |A p - b|^2 against PyTorch's Adam(weight_decay) with ExponentialLR
  stepped once per epoch (2 steps per epoch). A strong weight decay makes coupled L2 and
  AdamW's decoupled decay differ at once; so does a per-step (not per-epoch) lr decay."""
  config = ClassifierConfig(learning_rate=0.1, lr_decay=0.5, weight_decay=0.3)
  spe = 2
  tx, lr_fn = make_optimizer(config, steps_per_epoch=spe)
  rng = np.random.default_rng(0)
  a = rng.normal(size=(6, 4))
  b = rng.normal(size=6)
  grad = lambda p: a.T @ (a @ p - b)
  p0 = rng.normal(size=4)
  params = jnp.asarray(p0, jnp.float32)
  opt_state = tx.init(params)
  for _ in range(5):
    g = jnp.asarray(grad(np.asarray(params, np.float64)), jnp.float32)
    updates, opt_state = tx.update(g, opt_state, params)
    params = optax.apply_updates(params, updates)
  want = _torch_adam_l2(p0, grad, 5, lambda t: 0.1 * 0.5 ** (t // spe), weight_decay=0.3)
  # float32 against float64: 5 steps of 0.1 * (g / |g|) leave ~1e-6; AdamW moves ~1e-2 apart.
  np.testing.assert_allclose(np.asarray(params), want, rtol=0, atol=2e-5)


def test_learning_rate_decays_once_per_epoch():
  config = ClassifierConfig()  # lr 0.005, decay 0.98
  spe = 195
  _, lr_fn = make_optimizer(config, steps_per_epoch=spe)
  for step, epochs in ((0, 0), (1, 0), (spe - 1, 0), (spe, 1), (2 * spe - 1, 1), (2 * spe, 2)):
    np.testing.assert_allclose(float(lr_fn(step)), 0.005 * 0.98**epochs, rtol=1e-6,
                               err_msg=f"step {step}")


def test_train_step_compiles_once(run_dir):
  """Six steps (with evaluations and checkpoints between) reuse one trace of the train step
  and of the batch draw: nothing in the state changes shape, dtype or sharding."""
  assert RUN_TRACES["calls"] == TINY.steps
  assert RUN_TRACES["traces"] == 1, RUN_TRACES
  assert RUN_TRACES["all"].get("draw") == 1, RUN_TRACES


@pytest.mark.integration
def test_fused_calls_of_any_length_train_the_same_bits(tmp_path):
  """steps_per_call fuses k steps into one jitted call. 8 steps per call and 2 give
  bitwise the same weights after 10 steps: log and eval at 8, a resume there, and
  the last 2 steps, which an 8-step call would pass the end with, run one per call."""
  config = dataclasses.replace(TINY, steps=10, log_every=8, eval_every=8, checkpoint_every=8)
  params = {}
  for k in (2, 8):
    train(dataclasses.replace(config, steps=8, steps_per_call=k), tmp_path / f"k{k}")
    train(dataclasses.replace(config, steps_per_call=k), tmp_path / f"k{k}")  # resumes at 8
    params[k] = jax.device_get(load_trained(tmp_path / f"k{k}")[1].params)
  chex.assert_trees_all_equal(params[2], params[8])
  records = runlog.read_metrics(tmp_path / "k8")
  assert [r["step"] for r in records if "loss" in r] == [8, 10]


@pytest.mark.integration
def test_unrolled_single_step_is_the_rolled_one_up_to_rounding(tmp_path):
  """The default one-step call (no loop around the body, for XLA:CPU's speed) draws the
  same batch and takes the same step as the rolled body of fused calls: the same step
  counter and key, and the first step's loss (same weights, same batch) equal up to
  float32 rounding: a relative 1e-4 is ~100x the rounding of this network's sums, and
  far below what another batch would change. (Later steps drift further: Adam turns
  the rounding of near-zero gradients into full-size updates.)"""
  data = load_synthetic("train")
  mesh = mesh_lib.make_mesh()
  model = paper_classifier(10)
  tx, _ = make_optimizer(TINY, 4)
  images, labels = jax.device_put((data.images, data.labels.astype(np.int32)))
  draw = make_draw(images, labels, dataclasses.replace(TINY, batch_size=64), mesh)
  step = make_train_step(model, tx, mesh)
  out = {}
  for rolled in (True, False):
    state = jax.device_put(CLASSIFIER.init_state(model, tx, 0), mesh_lib.replicated(mesh))
    state, metrics = loop.fuse_steps(draw, step, 1, state, rolled=rolled)(state)
    out[rolled] = jax.device_get((state.step, state.rng, metrics["loss"][0]))
  assert out[True][0] == out[False][0] == 1
  np.testing.assert_array_equal(out[True][1], out[False][1])
  np.testing.assert_allclose(out[True][2], out[False][2], rtol=1e-4)
