"""Run as a script with 8 fake CPU devices: one draw + train step of each model on a mesh of
the first device and on a mesh of all 8, from the same initial state, in one process.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
    python _sharded_step.py --out DIR [--models classifier diffusion]

Writes DIR/<model>-<devices>.npz with
  batch, labels   the drawn (augmented) batch, gathered;
  loss            the step's loss, float64 (1,);
  grad/<path>     the gradient the step took, read back from Adam's first moment: after one
                  step mu = (1 - b1) g exactly up to one rounding, so grad = mu / (1 - b1)
                  (for the classifier g includes the L2 term wd * params, the same on both
                  meshes);
  params/<path>   the parameters after the step;
  batch_stats/<path> (classifier) the BatchNorm running statistics after the step;
  ema_params/<path>  (diffusion) the EMA parameters after the step.

classifier: the paper classifier with dropout on; on 8 devices it also runs the batch as two
chunks of 8 (`layer_sets.xla_cpu_layers`; by default training on CPUs runs 4 chunks of 64 at batch
256), which again only reorders sums, so one comparison covers both. diffusion: a tiny U-Net
generator (the same code path as the paper's, with label dropout on so that it is exercised).
"""

import argparse
import json
import pathlib

import jax
import numpy as np
import optax

from cifarjax import mesh as mesh_lib
from cifarjax.data.synthetic import load_synthetic

ADAM_B1 = 0.9  # optax.scale_by_adam's default, which both trainers use


def _key_name(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def flat(prefix, tree) -> dict:
  return {"/".join([prefix, *map(_key_name, path)]): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def adam_gradient(opt_state):
  """The gradient of a first step, from the ScaleByAdamState inside an optax chain."""
  adam = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
          if isinstance(s, optax.ScaleByAdamState)]
  assert len(adam) == 1, opt_state
  return jax.tree.map(lambda mu: np.asarray(mu, np.float64) / (1 - ADAM_B1), adam[0].mu)


def classifier(data):
  from cifarjax.config import ClassifierConfig
  from cifarjax.models import paper_classifier
  from cifarjax.models.layer_sets import xla_cpu_layers
  from cifarjax.kinds import CLASSIFIER
  from cifarjax.train_classifier import (make_draw, make_optimizer, make_train_step,
                                         put_split)
  config = ClassifierConfig(batch_size=16, dropout=0.4)
  model = paper_classifier(data.num_classes, dropout_rate=config.dropout)
  tx, _ = make_optimizer(config, len(data) // config.batch_size)
  host_state = jax.device_get(CLASSIFIER.init_state(model, tx, 0))

  def run(mesh):
    state = jax.device_put(host_state, mesh_lib.replicated(mesh))
    layers = xla_cpu_layers(8 if mesh.size > 1 else 0)
    split = layers.split_batch(np.zeros((config.batch_size, 1)), True)
    assert len(getattr(split, "chunks", (split,))) == (2 if mesh.size > 1 else 1)
    chunked = model.clone(layers=layers)
    return state, make_draw(*put_split(data, mesh), config, mesh), make_train_step(chunked, tx, mesh)

  return run, lambda s: {**flat("params", s.params), **flat("batch_stats", s.batch_stats)}


def diffusion(data):
  from cifarjax.config import DiffusionConfig
  from cifarjax import train_diffusion as td
  from cifarjax.kinds import GENERATOR
  config = DiffusionConfig(batch_size=16, unet="tiny", num_timesteps=100, label_dropout=0.2)
  model, schedule = td.make_unet(config, data.num_classes), td.make_schedule(config)
  tx, _ = td.make_optimizer(config, len(data) // config.batch_size)
  host_state = jax.device_get(GENERATOR.init_state(model, tx, 0, ema=True))

  def run(mesh):
    state = jax.device_put(host_state, mesh_lib.replicated(mesh))
    return (state, td.make_draw(*td.put_split(data, mesh), config, mesh),
            td.make_train_step(model, schedule, tx, mesh, config))

  return run, lambda s: {**flat("params", s.params), **flat("ema_params", s.ema["params"])}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", required=True)
  parser.add_argument("--models", nargs="+", choices=("classifier", "diffusion"),
                      default=("classifier", "diffusion"))
  args = parser.parse_args()
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  assert jax.device_count() == 8, "run with --xla_force_host_platform_device_count=8"
  data = load_synthetic("test")
  report = {}
  for name in args.models:
    run, saved = {"classifier": classifier, "diffusion": diffusion}[name](data)
    for devices in (1, 8):
      mesh = mesh_lib.make_mesh(jax.devices()[:devices])
      state, draw, step = run(mesh)
      batch, rng = draw(state)
      images, labels = jax.device_get(batch)
      new_state, metrics = step(state, batch, rng)  # donates state
      loss = float(metrics["loss"])
      np.savez(out / f"{name}-{devices}.npz", batch=np.asarray(images), labels=np.asarray(labels),
               loss=np.array([loss]), **saved(jax.device_get(new_state)),
               **flat("grad", adam_gradient(jax.device_get(new_state.opt_state))))
      report[f"{name}-{devices}"] = loss
  print(json.dumps(report))


if __name__ == "__main__":
  main()
