"""Training and evaluating the paper's classifier: its loss, its evaluation and its run.

The state, the jitted step and reading a run back are shared with the generator
(`trainer`, `run.Workdir`); the step is `trainer.make_train_step` over `train_loss`.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cifarjax import augment, compiler, kinds, loop, mesh as mesh_lib, run as run_lib, runlog
from cifarjax import trainer
from cifarjax.optim import make_optimizer
from cifarjax.config import ClassifierConfig
from cifarjax.data import load_split, with_class_order
from cifarjax.models import count_params
from cifarjax.trainer import TrainState, put_split


def cross_entropy(logits, labels, label_smoothing: float = 0.0):
  """Mean cross-entropy against integer labels, optionally smoothed: the target puts
  1 - label_smoothing + label_smoothing / K on the label and label_smoothing / K elsewhere."""
  if not label_smoothing:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
  return optax.softmax_cross_entropy(logits, targets).mean()


def train_loss(model: nn.Module, config: ClassifierConfig = ClassifierConfig()):
  """loss_fn(params, batch_stats, batch, rng) -> (loss, (batch_stats, {"accuracy"})), as
  `trainer.make_train_step` takes it: cross-entropy (with the config's label_smoothing) of
  the model in training mode, rng its dropout key, the batch's BatchNorm statistics
  updated."""

  def loss_fn(params, batch_stats, batch, rng):
    images, labels = batch
    logits, updates = model.apply(
        {"params": params, "batch_stats": batch_stats}, images, train=True,
        rngs={"dropout": rng}, mutable=["batch_stats"])
    loss = cross_entropy(logits, labels, config.label_smoothing)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
    return loss, (updates["batch_stats"], {"accuracy": accuracy})

  return loss_fn


def make_train_step(model: nn.Module, tx, mesh, config: ClassifierConfig = ClassifierConfig()):
  """`trainer.make_train_step` over `train_loss`, averaging with the config's ema_decay."""
  return trainer.make_train_step(train_loss(model, config), tx, mesh, config.ema_decay)


def make_draw(images, labels, config: ClassifierConfig, mesh):
  """`loop.make_draw` with the config's augmentations, normalised for the classifier."""
  return loop.make_draw(images, labels, config.batch_size, config.augment, augment.normalize, mesh)


def log_probs(model: nn.Module, variables, images, flip: bool = False):
  """Class log-probabilities in inference mode; flip: of the mean of the probabilities of
  each image and its mirror image (test-time augmentation)."""
  logp = jax.nn.log_softmax(model.apply(variables, images, train=False))
  if not flip:
    return logp
  mirrored = jax.nn.log_softmax(model.apply(variables, jax.vmap(augment.flip_horizontal)(images),
                                            train=False))
  return jnp.logaddexp(logp, mirrored) - jnp.log(2.0)


def make_evaluate_split(model: nn.Module, mesh, batch_size: int, flip: bool = False):
  """evaluate(params, batch_stats, images, labels, n) -> {accuracy, top5, loss, num_examples},
  in inference mode (BatchNorm running statistics, no dropout), with `log_probs`. top5
  is None for models of fewer than 5 classes, where it would be trivially 1."""
  mesh_lib.check_batch_size(batch_size, mesh)
  sharded = mesh_lib.batch_sharded(mesh)
  num_classes = {}  # read off the logits when eval_batch is traced

  @functools.partial(jax.jit, compiler_options=compiler.options())
  def eval_batch(params, batch_stats, images, labels, start, n):
    x = jax.lax.dynamic_slice_in_dim(images, start, batch_size)
    y = jax.lax.dynamic_slice_in_dim(labels, start, batch_size)
    x = jax.lax.with_sharding_constraint(augment.normalize(augment.to_float(x)), sharded)
    logp = log_probs(model, {"params": params, "batch_stats": batch_stats}, x, flip)
    mask = (start + jnp.arange(batch_size)) < n
    num_classes["logits"] = logp.shape[-1]
    top5 = jnp.any(jax.lax.top_k(logp, min(5, logp.shape[-1]))[1] == y[:, None], axis=-1)
    loss = -jnp.take_along_axis(logp, y[:, None], axis=-1)[:, 0]
    return (jnp.sum(mask * (jnp.argmax(logp, -1) == y)), jnp.sum(mask * top5),
            jnp.sum(mask * loss))

  def evaluate(params, batch_stats, images, labels, n):
    totals = [eval_batch(params, batch_stats, images, labels, start, n)
              for start in range(0, n, batch_size)]
    correct, correct5, loss = (float(sum(t)) for t in zip(*jax.device_get(totals)))
    top5 = correct5 / n if num_classes["logits"] >= 5 else None
    return {"accuracy": correct / n, "top5": top5, "loss": loss / n, "num_examples": n}

  return evaluate


WEIGHTS = ("raw", "ema")


def evaluated_weights(config: ClassifierConfig) -> str:
  """What a run evaluates: its moving average where it keeps one, else its raw weights."""
  return "ema" if config.ema_decay else "raw"


def weights_of(state: TrainState, weights: str):
  """(params, batch_stats) to evaluate: the trained ones ("raw") or their average ("ema")."""
  if weights == "raw":
    return state.params, state.batch_stats
  return state.ema["params"], state.ema["batch_stats"]


def train_eval_indices(n: int, size: int) -> np.ndarray:
  """The fixed subset of train scored for train accuracy (the same in every run)."""
  return np.sort(np.random.default_rng(0).permutation(n)[:min(size, n)])


def train(config: ClassifierConfig, workdir, mesh=None, model: nn.Module | None = None,
          time_limit_s: float | None = None) -> dict:
  """Trains (or resumes) the classifier in `workdir`; returns the summary.

  The network is the one `config.model` names (default the paper's). model: any other
  flax module to train with the same recipe, data and loop (called
  `model.apply(variables, images, train=...)` with "params" and "batch_stats"
  collections and a "dropout" rng, as `Classifier`); pass the same one to
  `load_trained` to read its checkpoints back. A module you will use again is better
  registered in `models.CLASSIFIERS` and named by `config.model`: then config.json
  alone rebuilds it, and `cifarjax eval-classifier` scores it.
  time_limit_s: stop as Ctrl-C does (a checkpoint, then `errors.Interrupted` naming the step)
  at the first step boundary after that many seconds of training (`loop.run`).
  """
  from cifarjax.data import check_training_data
  from cifarjax.errors import note
  config, workdir, mesh = run_lib.open_workdir(config, workdir, mesh,
                                               ("batch_size", "eval_batch_size"))
  note(f"loading {config.data} (train and test splits)")
  train_data = load_split(config.data, "train", holdout=config.holdout)
  test_data = load_split(config.data, "test", holdout=config.holdout)
  test_data = with_class_order(test_data, train_data.class_names)
  check_training_data(train_data, config.data, config.batch_size, min_classes=2)
  note(f"{len(train_data):,} training and {len(test_data):,} test images of "
       f"{train_data.num_classes} classes; initialising the model (seconds to a minute)")
  model_name = config.model if model is None else type(model).__name__
  model = model or kinds.make_classifier(config, train_data.num_classes)
  run_lib.write_start(workdir, config, train_data.class_names)

  steps_per_epoch = len(train_data) // config.batch_size
  tx, lr_fn = make_optimizer(config, steps_per_epoch)
  state = kinds.CLASSIFIER.init_state(model, tx, config.seed,
                                      ema=kinds.CLASSIFIER.keeps_average(config))
  state = jax.device_put(state, mesh_lib.replicated(mesh))
  train_images, train_labels = put_split(train_data, mesh)
  subset = train_data.take(train_eval_indices(len(train_data), config.train_eval_size))
  eval_sets = {name: (put_split(d, mesh, config.eval_batch_size), len(d))
               for name, d in (("test", test_data), ("train", subset))}
  evaluate_split = make_evaluate_split(model, mesh, config.eval_batch_size, config.eval_flip)

  def evaluate(state):
    out = {}
    for name, ((images, labels), n) in eval_sets.items():
      result = evaluate_split(*weights_of(state, evaluated_weights(config)),
                              images, labels, n)
      out.update({f"{name}_accuracy": result["accuracy"], f"{name}_top5": result["top5"],
                  f"{name}_loss": result["loss"]})
    return out

  state, final_eval, seconds = loop.run(
      workdir, state, draw=make_draw(train_images, train_labels, config, mesh),
      train_step=make_train_step(model, tx, mesh, config), evaluate=evaluate, lr_fn=lr_fn,
      settings=run_lib.loop_settings(config), desc="classifier", time_limit_s=time_limit_s)

  evals = [r for r in runlog.read_metrics(workdir) if "test_accuracy" in r]
  best = max(evals, key=lambda r: r["test_accuracy"]) if evals else {}
  from cifarjax import plots
  return run_lib.write_summary(workdir, {
      "model": model_name, "data": config.data, "steps": int(jax.device_get(state.step)),
      "num_params": count_params(state.params),
      **{f"final_{k}": v for k, v in final_eval.items()},
      "best_test_accuracy": best.get("test_accuracy"), "best_step": best.get("step"),
      "train_test_gap": (final_eval["train_accuracy"] - final_eval["test_accuracy"]
                         if final_eval else None),
      "evaluated": {"weights": evaluated_weights(config), "flip": config.eval_flip},
      "num_train": len(train_data), "num_test": len(test_data),
      "wall_seconds_this_call": seconds,
  }, mesh, plots.training_graph)


def load_trained(workdir, mesh=None, model: nn.Module | None = None):
  """(model, state, config, class_names) of the latest checkpoint in a classifier workdir:
  the network its config names, or `model` where it was trained with a custom one
  (`run.load_trained`)."""
  return run_lib.load_trained(workdir, kinds.CLASSIFIER, mesh, model)


def evaluate_workdir(workdir, data: str | None = None, split: str = "test",
                     batch_size: int = 1000, mesh=None, weights: str | None = None,
                     flip: bool | None = None, model: nn.Module | None = None) -> dict:
  """Top-1/top-5 accuracy of a trained classifier on any source whose classes it knows.

  weights: "raw" or "ema" (the average, where the run kept one); flip: test-time mirror
  averaging. Both default to what the run's config evaluates. model: the network where
  the run trained a custom one (as `load_trained`)."""
  from cifarjax.errors import UserError, note
  if batch_size < 1:
    raise UserError(f"--batch-size must be positive, got {batch_size}")
  if weights not in (None, *WEIGHTS):
    raise UserError(f"--weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
  mesh = mesh or mesh_lib.make_mesh()
  note(f"loading the classifier in {workdir}")
  model, state, config, class_names = load_trained(workdir, mesh, model)
  weights = weights or evaluated_weights(config)
  flip = config.eval_flip if flip is None else flip
  if weights == "ema" and state.ema is None:
    raise UserError(f"the run in {workdir} kept no weight average (its ema_decay is 0); "
                    f"evaluate its raw weights")
  batch_size = -(-batch_size // mesh.size) * mesh.size
  note(f"loading {data or config.data} ({split} split)")
  data_split = with_class_order(load_split(data or config.data, split, holdout=config.holdout),
                                class_names)
  note(f"evaluating on {len(data_split):,} images (the first batch compiles)")
  images, labels = put_split(data_split, mesh, batch_size)
  result = make_evaluate_split(model, mesh, batch_size, flip)(
      *weights_of(state, weights), images, labels, len(data_split))
  return {**result, "step": int(jax.device_get(state.step)), "data": data or config.data,
          "split": split, "weights": weights, "flip": flip}
