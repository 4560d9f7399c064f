"""The classifier recipe beyond the paper (cosine schedule, AdamW, label smoothing, a moving
average of the weights, mirror averaging at test time): each part against its closed form,
then a run of the `improved` preset that resumes exactly and evaluates what it should."""

import dataclasses
import math
import shutil

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cifarjax import checkpoint, mesh as mesh_lib, optim
from cifarjax.config import CLASSIFIER_PRESETS, ClassifierConfig
from cifarjax.errors import UserError
from cifarjax.models import Classifier
from cifarjax.kinds import CLASSIFIER
from cifarjax.train_classifier import (cross_entropy, evaluate_workdir,
                                       load_trained, log_probs, make_optimizer, make_train_step,
                                       train)

SMALL = Classifier(num_classes=10, stem_channels=8, bottleneck_ratio=2,
                   layout=("expand", "residual", "pool", "expand"))


def test_cosine_schedule_warms_up_then_anneals_to_zero_at_the_last_step():
  config = ClassifierConfig(lr_schedule="cosine", warmup_steps=10, steps=110, learning_rate=0.004)
  _, lr = make_optimizer(config, steps_per_epoch=7)  # epochs play no part
  half_cosine = lambda t: 0.004 * 0.5 * (1 + math.cos(math.pi * (t - 10) / 100))
  for step, want in ((0, 0.0), (5, 0.002), (10, 0.004), (35, half_cosine(35)), (60, 0.002),
                     (100, half_cosine(100)), (110, 0.0)):
    # float32: 1 + cos(.) is good to a few ulps of 1 (2.4e-7 relative to the peak rate).
    assert float(lr(step)) == pytest.approx(want, rel=1e-6, abs=0.004 * 4e-7), step


def test_adamw_decays_the_weights_beside_adam_and_adam_inside_it():
  """First step, where Adam's update is g / |g| elementwise: with a zero gradient, L2 inside
  Adam becomes a full step of size lr against the weight's sign; AdamW's decay stays lr * wd * p."""
  params, grads = jnp.array([2.0, -3.0]), jnp.array([0.0, 0.5])
  lr, wd = 0.1, 0.01
  steps = {}
  for name in ("adam", "adamw"):
    tx, _ = make_optimizer(ClassifierConfig(optimizer=name, learning_rate=lr, weight_decay=wd), 1)
    steps[name], _ = tx.update(grads, tx.init(params), params)
  # 1 - 0.999 rounds to float32 1.3e-5 off, so Adam's sqrt(v-hat) is up to 7e-6 off.
  np.testing.assert_allclose(steps["adamw"], -lr * (np.array([0.0, 1.0]) + wd * np.array([2.0, -3.0])),
                             rtol=2e-5)
  np.testing.assert_allclose(steps["adam"], [-lr, -lr], rtol=2e-5)  # sign(g + wd p) = (+, +)


def test_label_smoothing_matches_its_closed_form():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(4, 5)) * 3
  labels = np.array([0, 3, 4, 3])
  a, k = 0.2, 5
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  want = np.mean(-(1 - a) * logp[np.arange(4), labels] - a / k * logp.sum(-1))
  got = cross_entropy(jnp.asarray(logits, jnp.float32), jnp.asarray(labels), a)
  assert float(got) == pytest.approx(want, rel=1e-6)
  plain = np.mean(-logp[np.arange(4), labels])
  assert float(cross_entropy(jnp.asarray(logits, jnp.float32), jnp.asarray(labels))) == \
      pytest.approx(plain, rel=1e-6)


def test_moving_average_ramps_its_decay_up_to_the_configured_one():
  ones, zeros = {"w": jnp.ones(3)}, {"w": jnp.zeros(3)}
  for step, decay in ((0, 0.1), (8, 0.5), (990, 0.991), (100_000, 0.999)):
    averaged = optim.ema_update(ones, zeros, jnp.int32(step), 0.999)
    np.testing.assert_allclose(averaged["w"], decay, rtol=1e-6, err_msg=f"step {step}")


def test_train_step_averages_the_new_weights_and_statistics_and_trains_as_without():
  """Three steps with ema_decay 0.9: the average follows its recursion over the raw
  parameters and BatchNorm statistics after each step, and those raw ones are what the
  same steps give without an average."""
  mesh = mesh_lib.make_mesh()
  config = ClassifierConfig(ema_decay=0.9)
  tx, _ = make_optimizer(config, 10)
  with_ema = make_train_step(SMALL, tx, mesh, config)
  without = make_train_step(SMALL, tx, mesh, ClassifierConfig())
  rng = np.random.default_rng(0)
  batch = (jnp.asarray(rng.normal(size=(8, 32, 32, 3)), jnp.float32),
           jnp.asarray(rng.integers(0, 10, 8), jnp.int32))
  state = CLASSIFIER.init_state(SMALL, tx, 0, ema=True)
  plain = CLASSIFIER.init_state(SMALL, tx, 0)
  # The step donates its state: keep host copies.
  want = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
  for t in range(3):
    state, _ = with_ema(state, batch, jax.random.PRNGKey(t))
    plain, _ = without(plain, batch, jax.random.PRNGKey(t))
    d = min(0.9, (1 + t) / (10 + t))
    new = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
    want = jax.tree.map(lambda e, x: d * e + (1 - d) * x, want, new)
    # The same three float32 operations per step on both sides, ordered differently: a few ulps.
    chex.assert_trees_all_close(state.ema, want, rtol=1e-5, atol=1e-6)
  # The raw weights are the ones trained without an average. The two programs differ (one has
  # more outputs), so XLA may fuse and round them differently, and Adam's g / |g| turns a
  # rounding-size gradient into a step of lr: allow that for a few weights, not for most
  # (training from the average, say, moves nearly every weight by ~lr).
  raw, ref = (np.concatenate([np.ravel(x) for x in jax.tree.leaves(jax.device_get(p))])
              for p in (state.params, plain.params))
  assert np.mean(np.abs(raw - ref) > 1e-5) < 0.01


def test_mirror_averaging_averages_the_probabilities_of_image_and_mirror_image():
  variables = SMALL.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)
  images = jax.random.normal(jax.random.PRNGKey(1), (3, 32, 32, 3))
  probs = lambda x: jax.nn.softmax(SMALL.apply(variables, x, train=False))
  got = jnp.exp(log_probs(SMALL, variables, images, flip=True))
  np.testing.assert_allclose(got, (probs(images) + probs(images[:, :, ::-1])) / 2, atol=1e-6)
  assert not np.allclose(got, probs(images), atol=1e-4)  # the mirror image does differ
  symmetric = images + images[:, :, ::-1]
  np.testing.assert_allclose(jnp.exp(log_probs(SMALL, variables, symmetric, flip=True)),
                             probs(symmetric), atol=1e-6)


def test_improved_preset_changes_only_what_it_says():
  paper, improved = CLASSIFIER_PRESETS["paper"], CLASSIFIER_PRESETS["improved"]
  changed = {f.name for f in dataclasses.fields(paper)
             if getattr(paper, f.name) != getattr(improved, f.name)}
  assert changed == {"augment", "optimizer", "weight_decay", "lr_schedule", "warmup_steps",
                     "label_smoothing", "ema_decay", "eval_flip"}
  assert (improved.optimizer, improved.weight_decay) == ("adamw", 0.05)
  assert (improved.model, improved.steps, improved.batch_size) == ("paper", 10_000, 256)
  assert improved.augment.crop_prob == 1.0 and improved.augment.crop_padding == 4
  assert paper == ClassifierConfig()


TINY_IMPROVED = dataclasses.replace(
    CLASSIFIER_PRESETS["improved"], data="synthetic", steps=6, batch_size=16, warmup_steps=1,
    log_every=3, eval_every=3, eval_batch_size=64, train_eval_size=64, checkpoint_every=3)


@pytest.mark.integration
def test_improved_run_resumes_exactly_and_evaluates_its_average_mirrored(tmp_path):
  summary = train(TINY_IMPROVED, tmp_path / "a", model=SMALL)
  _, whole, _, _ = load_trained(tmp_path / "a", model=SMALL)
  assert whole.ema is not None
  assert summary["evaluated"] == {"weights": "ema", "flip": True}
  # Interrupted after its checkpoint at step 3: the same command resumes it there.
  shutil.copytree(tmp_path / "a", tmp_path / "b")
  shutil.rmtree(tmp_path / "b" / "checkpoints" / "6")
  train(TINY_IMPROVED, tmp_path / "b", model=SMALL)
  _, resumed, _, _ = load_trained(tmp_path / "b", model=SMALL)
  chex.assert_trees_all_equal(jax.device_get(whole), jax.device_get(resumed))
  # Its learning rate reaches 0 at step 6: a longer run would restart the decay half-way.
  with pytest.raises(UserError, match="anneals to 0 at config field steps 6"):
    train(dataclasses.replace(TINY_IMPROVED, steps=12), tmp_path / "b", model=SMALL)

  default = evaluate_workdir(tmp_path / "a", batch_size=64, model=SMALL)
  assert (default["weights"], default["flip"]) == ("ema", True)
  assert default["accuracy"] == pytest.approx(summary["final_test_accuracy"], abs=1e-6)
  losses = {(w, f): evaluate_workdir(tmp_path / "a", batch_size=64, model=SMALL, weights=w,
                                     flip=f)["loss"]
            for w in ("raw", "ema") for f in (False, True)}
  assert len(set(losses.values())) == 4  # each choice evaluates something else


@flax.struct.dataclass
class _StateBeforeTheAverage:  # the classifier's state as checkpoints were written before `ema`
  step: jax.Array
  params: dict
  batch_stats: dict
  opt_state: tuple
  rng: jax.Array


def test_a_checkpoint_from_before_the_weight_average_still_restores(tmp_path):
  tx, _ = make_optimizer(ClassifierConfig(), 1)
  state = CLASSIFIER.init_state(SMALL, tx, 0)
  old = _StateBeforeTheAverage(**{f.name: getattr(state, f.name)
                                  for f in dataclasses.fields(_StateBeforeTheAverage)})
  mngr = checkpoint.manager(tmp_path, keep=None)
  checkpoint.save(mngr, 5, old)
  mngr.close()
  restored = checkpoint.load_latest(tmp_path, state)
  assert restored.ema is None
  chex.assert_trees_all_equal(jax.device_get(restored), jax.device_get(state))
  with pytest.raises(ValueError, match="does not match"):  # an average it lacks is not made up
    checkpoint.load_latest(tmp_path, CLASSIFIER.init_state(SMALL, tx, 0, ema=True))
