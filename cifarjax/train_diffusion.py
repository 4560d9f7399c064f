"""Training the paper's generator: state, jitted step, and the run (Part 2, section 4).

The same pattern as the classifier's: `train_step(state, batch, rng)` is
compiled once over the 1-D data mesh, the state replicated and donated, the
batch split over devices; `draw` picks and flips the batch on the device.
A step noises each image to a uniformly drawn timestep, regresses the noise
(DDPM's simplified loss; or v, or min-SNR weighted, as DiffusionConfig says),
applies Adam, and moves the EMA weights.
"""

import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cifarjax import (augment, compiler, config as config_lib, diffusion, loop, mesh as mesh_lib,
                      optim, registry, run as run_lib, runlog)
from cifarjax.config import DiffusionConfig
from cifarjax.data import Split, load_split, with_class_order
from cifarjax import models
from cifarjax.models import count_params
from cifarjax.models.unet import UNet

@flax.struct.dataclass
class DiffusionState:
  step: jax.Array  # int32 scalar
  params: Any
  ema_params: Any  # what sampling uses; see DiffusionConfig.ema_decay
  opt_state: Any
  rng: jax.Array  # uint32 (2,) base key: data order, flips, timesteps and noise derive from it


def make_unet(config: DiffusionConfig, num_classes: int) -> UNet:
  """The network `config.unet` names in `models.UNETS`, built with the config's layer set and
  the entry's settings (unet_kwargs)."""
  with registry.entry_errors(f"U-Net {config.unet!r}"):
    return models.UNETS[config.unet](num_classes, config.num_timesteps,
                                     models.layer_set(config.layers), **config.unet_kwargs)


def make_schedule(config: DiffusionConfig) -> diffusion.Schedule:
  """The config's noise schedule (a name in `diffusion.SCHEDULES`), with its settings
  (schedule_kwargs); what the schedule raises is a UserError naming it."""
  with registry.entry_errors(f"schedule {config.schedule!r}"):
    return diffusion.make_schedule(config.schedule, config.num_timesteps,
                                   config.schedule_kwargs)


def make_optimizer(config: DiffusionConfig, steps_per_epoch: int):
  """Adam, its learning rate decayed by lr_decay once per epoch."""
  lr = optax.exponential_decay(config.learning_rate, transition_steps=steps_per_epoch,
                               decay_rate=config.lr_decay, staircase=True)
  return optax.adam(lr), lr


def init_state(model: UNet, tx, seed: int, image_shape=(32, 32, 3)) -> DiffusionState:
  rng = jax.random.PRNGKey(seed)
  params = model.init(jax.random.fold_in(rng, 2), jnp.zeros((1, *image_shape)),
                      jnp.zeros((1,), jnp.int32), jnp.zeros((1,), jnp.int32))["params"]
  return DiffusionState(step=jnp.zeros((), jnp.int32), params=params,
                        ema_params=jax.tree.map(jnp.copy, params), opt_state=tx.init(params),
                        rng=rng)


def make_loss(model: UNet, schedule, config: DiffusionConfig):
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


def make_train_step(model: UNet, schedule, tx, mesh, config: DiffusionConfig):
  replicated, sharded = mesh_lib.replicated(mesh), mesh_lib.batch_sharded(mesh)
  null_label = model.num_classes
  loss_fn = make_loss(model, schedule, config)

  def train_step(state: DiffusionState, batch, rng):
    images, labels = batch
    drop_key, loss_key = jax.random.split(rng)
    if config.label_dropout:
      labels = diffusion.drop_labels(drop_key, labels, null_label, config.label_dropout)
    loss, grads = jax.value_and_grad(loss_fn)(state.params, images, labels, loss_key)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                          ema_params=optim.ema_update(state.ema_params, params, state.step,
                                                          config.ema_decay))
    return state, {"loss": loss}

  return jax.jit(train_step, in_shardings=(replicated, sharded, replicated),
                 out_shardings=(replicated, replicated), donate_argnums=0,
                 compiler_options=compiler.options())


def make_draw(images, labels, config: DiffusionConfig, mesh):
  """`loop.make_draw` with the config's flips, in the model's range [-1, 1]."""
  return loop.make_draw(images, labels, config.batch_size,
                        augment.AugmentConfig(hflip_prob=config.hflip_prob),
                        lambda x: x * 2.0 - 1.0, mesh)


def make_evaluate(model: UNet, schedule, images, labels, config: DiffusionConfig, mesh):
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
    loss, ema_loss = jax.device_get(losses(state.params, state.ema_params, *batch))
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


def put_split(data, mesh):
  return jax.device_put((data.images, data.labels.astype(np.int32)), mesh_lib.replicated(mesh))


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

  state = jax.device_put(init_state(model, tx, config.seed), mesh_lib.replicated(mesh))
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
  """(model, state, config, class_names) of the latest checkpoint in a generator workdir:
  the network its config names, or `model` where it was trained with a custom one.

  From an exported folder (`run.export_weights`), both params and ema_params hold the
  exported weights and step the exported step; the optimizer state is a fresh one.
  """
  config, class_names = run_lib.read_run(workdir, DiffusionConfig, "train-diffusion")
  mesh = mesh or mesh_lib.make_mesh()
  what = (f"the model passed ({type(model).__name__})" if model is not None else
          f"the {config.unet!r} U-Net for {len(class_names)} classes that its config.json "
          f"describes (written by another version of cifarjax, or trained with a custom model?)")
  model = model or make_unet(config, len(class_names))
  tx, _ = make_optimizer(config, 1)
  like = jax.device_put(init_state(model, tx, config.seed), mesh_lib.replicated(mesh))
  mismatch = f"the weights in {workdir} do not fit {what}"
  if run_lib.is_export(workdir):
    params, step, _ = run_lib.load_exported(workdir, like.params, mismatch)
    return model, like.replace(params=params, ema_params=params,
                               step=jax.device_put(jnp.int32(step), like.step.sharding)), \
        config, class_names
  state = run_lib.restore_latest(workdir, like,
                                 f"the checkpoint in {workdir}/checkpoints does not fit {what}")
  return model, state, config, class_names


def export(workdir, out, weights_from: str = "ema"):
  """Writes the latest checkpoint's averaged ("ema") or raw weights to the folder `out`
  (`run.export_weights`), which `load_trained`, `generate`, `interpolate` and
  `evaluate_fid` read like a workdir. Returns the step exported."""
  from cifarjax.errors import UserError
  if weights_from not in ("ema", "raw"):
    raise UserError(f"weights must be ema or raw, got {weights_from!r}")
  _, state, _, _ = load_trained(workdir)
  step = int(jax.device_get(state.step))
  run_lib.export_weights(workdir, out, state.ema_params if weights_from == "ema" else state.params,
                         step, weights_from)
  return step
