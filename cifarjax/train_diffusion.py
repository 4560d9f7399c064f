"""Training the paper's generator: its loss, its evaluation and its run (Part 2, section 4).

The state, the jitted step and reading a run back are shared with the classifier
(`trainer`, `run.Workdir`); the step is `trainer.make_train_step` over `train_loss`,
and `draw` picks and flips the batch on the device. A step noises each image to a
uniformly drawn timestep, regresses the noise (DDPM's simplified loss; or v, or
min-SNR weighted, as DiffusionConfig says), applies Adam, and moves the EMA weights.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cifarjax import (augment, compiler, config as config_lib, diffusion, kinds, loop,
                      mesh as mesh_lib, registry, run as run_lib, runlog, trainer)
from cifarjax.config import DiffusionConfig
from cifarjax.data import Split, load_split, with_class_order
from cifarjax.kinds import make_schedule, make_unet
from cifarjax.models import count_params
from cifarjax.optim import make_optimizer
from cifarjax.trainer import put_split


def make_loss(model: nn.Module, schedule, config: DiffusionConfig):
  """loss(params, images, labels, rng): `diffusion.training_loss` with the config's
  prediction and loss weighting (by default the paper's: eps, unweighted). The weighting
  is traced once here (`jax.eval_shape`), so that what it raises comes as a UserError
  before training starts."""
  recipe = dict(prediction=config.prediction, loss_weighting=config.loss_weighting,
                loss_weighting_kwargs=config.loss_weighting_kwargs)
  with registry.entry_errors(f"loss weighting {config.loss_weighting!r}"):
    jax.eval_shape(lambda t: diffusion.loss_weights(schedule, t, **recipe),
                   jax.ShapeDtypeStruct((config.batch_size,), jnp.int32))

  def loss(params, images, labels, rng):
    return diffusion.training_loss(
        lambda x, t, y: model.apply({"params": params}, x, t, y), schedule, images, labels, rng,
        **recipe)
  return loss


def train_loss(model: nn.Module, schedule, config: DiffusionConfig):
  """loss_fn(params, batch_stats, batch, rng) -> (loss, (batch_stats, {})), as
  `trainer.make_train_step` takes it: `make_loss` of the batch, its labels first replaced
  by the null label (model.num_classes) with probability config.label_dropout."""
  null_label = model.num_classes
  loss = make_loss(model, schedule, config)

  def loss_fn(params, batch_stats, batch, rng):
    images, labels = batch
    drop_key, loss_key = jax.random.split(rng)
    if config.label_dropout:
      labels = diffusion.drop_labels(drop_key, labels, null_label, config.label_dropout)
    return loss(params, images, labels, loss_key), (batch_stats, {})

  return loss_fn


def make_train_step(model: nn.Module, schedule, tx, mesh, config: DiffusionConfig):
  """`trainer.make_train_step` over `train_loss`, averaging with the config's ema_decay."""
  return trainer.make_train_step(train_loss(model, schedule, config), tx, mesh, config.ema_decay)


def make_draw(images, labels, config: DiffusionConfig, mesh):
  """`loop.make_draw` with the config's flips, in the model's range [-1, 1]."""
  return loop.make_draw(images, labels, config.batch_size,
                        augment.AugmentConfig(hflip_prob=config.hflip_prob),
                        lambda x: x * 2.0 - 1.0, mesh)


def make_evaluate(model: nn.Module, schedule, images, labels, config: DiffusionConfig, mesh):
  """evaluate(state) -> {eval_loss, ema_loss}: the training loss (`make_loss`) of the raw
  and the EMA weights on a fixed batch of training images at fixed timesteps and noise, so
  the numbers of different steps compare without sampling noise (sampling quality needs
  FID)."""
  n = min(config.eval_batch_size, len(images))
  n -= n % mesh.size
  mesh_lib.check_batch_size(max(n, 1), mesh)
  idx = np.sort(np.random.default_rng(0).permutation(len(images))[:n])
  batch = jax.device_put((np.asarray(augment.to_model_range(images[idx])), np.asarray(labels[idx])),
                         mesh_lib.batch_sharded(mesh))
  key, loss_fn = jax.random.PRNGKey(1), make_loss(model, schedule, config)

  @functools.partial(jax.jit, compiler_options=compiler.options())
  def losses(params, ema_params, x, y):
    return loss_fn(params, x, y, key), loss_fn(ema_params, x, y, key)

  def evaluate(state):
    loss, ema_loss = jax.device_get(losses(state.params, state.ema["params"], *batch))
    return {"eval_loss": float(loss), "ema_loss": float(ema_loss)}

  return evaluate


def load_training_data(config: DiffusionConfig) -> Split:
  """The images the generator trains on: the splits `config.train_on` names
  (config.TRAINING_SPLITS), concatenated in that order. "test" is the source's test
  split, or its held-out slice of train where it has none, so "train+test" is all of
  the data either way (the paper's final model trained on the entire dataset)."""
  names = config_lib.TRAINING_SPLITS[config.train_on]
  splits = [load_split(config.data, name, holdout=config.holdout) for name in names]
  if len(splits) == 1:
    return splits[0]
  class_names = splits[0].class_names
  splits = [with_class_order(s, class_names) for s in splits]
  return Split(images=np.concatenate([s.images for s in splits]),
               labels=np.concatenate([s.labels for s in splits]), class_names=class_names)


def train(config: DiffusionConfig, workdir, mesh=None, model: nn.Module | None = None,
          time_limit_s: float | None = None) -> dict:
  """Trains (or resumes) the generator in `workdir`; returns the summary.

  The network is the one `config.unet` names (default the paper's). model: any other
  flax module to train with the same recipe (called `model.apply({"params": p}, x, t,
  labels)` as `UNet`, with a `num_classes` attribute: its null label for guidance);
  pass the same one to `load_trained`. Registered in `models.UNETS` and named by
  `config.unet`, config.json alone rebuilds it.
  time_limit_s: stop as Ctrl-C does (a checkpoint, then `errors.Interrupted` naming the step)
  at the first step boundary after that many seconds of training (`loop.run`).
  """
  from cifarjax.data import check_training_data
  from cifarjax.errors import note
  config, workdir, mesh = run_lib.open_workdir(config, workdir, mesh)
  schedule = make_schedule(config)  # the schedule's own checks, before any file is written
  note(f"loading {config.data} ({' + '.join(config_lib.TRAINING_SPLITS[config.train_on])})")
  train_data = load_training_data(config)
  check_training_data(train_data, config.data, config.batch_size, min_classes=1)
  note(f"{len(train_data):,} training images of {train_data.num_classes} classes; "
       f"initialising the model (seconds to a minute)")
  model_name = f"unet:{config.unet}" if model is None else type(model).__name__
  model = model or make_unet(config, train_data.num_classes)
  steps_per_epoch = len(train_data) // config.batch_size
  tx, lr_fn = make_optimizer(config, steps_per_epoch)
  train_step = make_train_step(model, schedule, tx, mesh, config)  # traces the loss weighting
  run_lib.write_start(workdir, config, train_data.class_names)

  state = kinds.GENERATOR.init_state(model, tx, config.seed,
                                     ema=kinds.GENERATOR.keeps_average(config))
  state = jax.device_put(state, mesh_lib.replicated(mesh))
  images, labels = put_split(train_data, mesh)
  state, final_eval, seconds = loop.run(
      workdir, state, draw=make_draw(images, labels, config, mesh),
      train_step=train_step,
      evaluate=make_evaluate(model, schedule, train_data.images, train_data.labels, config, mesh),
      lr_fn=lr_fn, settings=run_lib.loop_settings(config), desc="diffusion",
      time_limit_s=time_limit_s)

  losses = [r["loss"] for r in runlog.read_metrics(workdir) if "loss" in r]
  summary_path = workdir / "summary.json"
  previous = runlog.read_json(summary_path) if summary_path.exists() else {}
  from cifarjax import plots
  return run_lib.write_summary(workdir, {
      **previous,  # keeps what eval-diffusion wrote (FID) across resumes
      "model": model_name, "data": config.data, "schedule": config.schedule,
      "steps": int(jax.device_get(state.step)), "num_params": count_params(state.params),
      "first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None,
      **{f"final_{k}": v for k, v in final_eval.items()},
      "num_train": len(train_data), "wall_seconds_this_call": seconds,
  }, mesh, plots.generator_graph)


def load_trained(workdir, mesh=None, model: nn.Module | None = None):
  """(model, state, config, class_names) of the latest checkpoint in a generator workdir,
  or of an exported folder (`run.export_weights`): the network its config names, or
  `model` where it was trained with a custom one (`run.load_trained`)."""
  return run_lib.load_trained(workdir, kinds.GENERATOR, mesh, model)
