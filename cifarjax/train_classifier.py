"""Training and evaluating the paper's classifier: state, jitted steps, and the run.

`train_step(state, batch, rng) -> (state, metrics)` is compiled once with
`jax.jit` over a 1-D data mesh: the state replicated and donated, the batch
split over devices. BatchNorm statistics are taken over the whole global batch
(XLA inserts the cross-device reductions), so 1 device and 8 give the same step.
"""

import functools
import pathlib
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cifarjax import augment, compiler, loop, mesh as mesh_lib, registry, run as run_lib, runlog
from cifarjax import optim
from cifarjax.optim import make_optimizer
from cifarjax.config import ClassifierConfig
from cifarjax.data import Split, load_split, with_class_order
from cifarjax import models
from cifarjax.models import count_params


@flax.struct.dataclass
class ClassifierState:
  step: jax.Array  # int32 scalar
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array  # uint32 (2,) base key: data order, augmentation and dropout derive from it
  # {"params", "batch_stats"} averaged over steps (ClassifierConfig.ema_decay), or None
  ema: Any = None


def init_state(model: nn.Module, tx, seed: int, image_shape=(32, 32, 3),
               ema: bool = False) -> ClassifierState:
  """ema: also keep a moving average of the weights (starting at the initial ones)."""
  rng = jax.random.PRNGKey(seed)
  variables = model.init(jax.random.fold_in(rng, 2), jnp.zeros((1, *image_shape)), train=False)
  params = variables["params"]
  averaged = {"params": params, "batch_stats": variables["batch_stats"]}
  return ClassifierState(step=jnp.zeros((), jnp.int32), params=params,
                         batch_stats=variables["batch_stats"], opt_state=tx.init(params), rng=rng,
                         ema=jax.tree.map(jnp.copy, averaged) if ema else None)


def cross_entropy(logits, labels, label_smoothing: float = 0.0):
  """Mean cross-entropy against integer labels, optionally smoothed: the target puts
  1 - label_smoothing + label_smoothing / K on the label and label_smoothing / K elsewhere."""
  if not label_smoothing:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
  return optax.softmax_cross_entropy(logits, targets).mean()


def make_train_step(model: nn.Module, tx, mesh, config: ClassifierConfig = ClassifierConfig()):
  """The jitted step; from config it reads label_smoothing and ema_decay (the rest of the
  recipe is in tx and in the batches)."""
  replicated, sharded = mesh_lib.replicated(mesh), mesh_lib.batch_sharded(mesh)

  def train_step(state: ClassifierState, batch, rng):
    images, labels = batch

    def loss_fn(params):
      logits, updates = model.apply(
          {"params": params, "batch_stats": state.batch_stats}, images, train=True,
          rngs={"dropout": rng}, mutable=["batch_stats"])
      loss = cross_entropy(logits, labels, config.label_smoothing)
      return loss, (logits, updates["batch_stats"])

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema
    if config.ema_decay:
      ema = optim.ema_update(ema, {"params": params, "batch_stats": batch_stats}, state.step,
                              config.ema_decay)
    state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                          opt_state=opt_state, ema=ema)
    metrics = {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels)}
    return state, metrics

  return jax.jit(train_step, in_shardings=(replicated, sharded, replicated),
                 out_shardings=(replicated, replicated), donate_argnums=0,
                 compiler_options=compiler.options())


def make_draw(images, labels, config: ClassifierConfig, mesh):
  """`loop.make_draw` with the config's augmentations, normalised for the classifier."""
  return loop.make_draw(images, labels, config.batch_size, config.augment, augment.normalize, mesh)


def put_split(data: Split, mesh, pad_to: int = 1):
  """The split's images and labels on every device, padded to a multiple of pad_to."""
  n = len(data)
  pad = -n % pad_to
  images = np.concatenate([data.images, np.zeros((pad, *data.images.shape[1:]), np.uint8)])
  labels = np.concatenate([data.labels, np.zeros((pad,), data.labels.dtype)]).astype(np.int32)
  return jax.device_put((images, labels), mesh_lib.replicated(mesh))


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


def weights_of(state: ClassifierState, weights: str):
  """(params, batch_stats) to evaluate: the trained ones ("raw") or their average ("ema")."""
  if weights == "raw":
    return state.params, state.batch_stats
  return state.ema["params"], state.ema["batch_stats"]


def train_eval_indices(n: int, size: int) -> np.ndarray:
  """The fixed subset of train scored for train accuracy (the same in every run)."""
  return np.sort(np.random.default_rng(0).permutation(n)[:min(size, n)])


def make_model(config: ClassifierConfig, num_classes: int) -> nn.Module:
  """The network `config.model` names in `models.CLASSIFIERS`, built with the config's layer
  set and the entry's settings (model_kwargs); what the factory raises is a UserError naming it."""
  with registry.entry_errors(f"classifier {config.model!r}"):
    return models.CLASSIFIERS[config.model](num_classes, config.dropout,
                                            models.layer_set(config.layers), **config.model_kwargs)


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
  model = model or make_model(config, train_data.num_classes)
  run_lib.write_start(workdir, config, train_data.class_names)

  steps_per_epoch = len(train_data) // config.batch_size
  tx, lr_fn = make_optimizer(config, steps_per_epoch)
  state = jax.device_put(init_state(model, tx, config.seed, ema=config.ema_decay > 0),
                         mesh_lib.replicated(mesh))
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
  the network its config names, or `model` where it was trained with a custom one."""
  workdir = pathlib.Path(workdir)
  config, class_names = run_lib.read_run(workdir, ClassifierConfig, "train-classifier")
  mesh = mesh or mesh_lib.make_mesh()
  custom = model is not None
  model = model or make_model(config, len(class_names))
  tx, _ = make_optimizer(config, 1)
  like = jax.device_put(init_state(model, tx, config.seed, ema=config.ema_decay > 0),
                        mesh_lib.replicated(mesh))
  summary = workdir / "summary.json"
  trained = runlog.read_json(summary).get("model") if summary.is_file() else None
  what = (f"the model passed ({type(model).__name__})" if custom else
          f"the {config.model!r} classifier for {len(class_names)} classes")
  hint = (f"the run trained a custom model ({trained}); " if trained not in
          (None, config.model, "paper_classifier") else "was it trained with a custom model? ")
  state = run_lib.restore_latest(
      workdir, like, f"the checkpoint in {workdir}/checkpoints does not fit {what}: {hint}load "
      f"it from Python with cifarjax.train_classifier.load_trained(workdir, model=<that model>)")
  return model, state, config, class_names


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
