"""Run as a script with N fake CPU devices: prints, as JSON, a model's loss and parameters
after one draw+train step on a mesh of the first `--devices` devices.

--model classifier: the paper classifier. --model diffusion: a tiny U-Net generator
(the same code path as the paper's, with label dropout on so that it is exercised)."""

import argparse
import json

import jax
import numpy as np

from cifarjax import mesh as mesh_lib
from cifarjax.data.synthetic import load_synthetic

parser = argparse.ArgumentParser()
parser.add_argument("--devices", type=int, required=True)
parser.add_argument("--model", choices=("classifier", "diffusion"), default="classifier")
parser.add_argument("--out", required=True)
args = parser.parse_args()
STEPS = 1


def classifier(mesh, data):
  from cifarjax.config import ClassifierConfig
  from cifarjax.models import paper_classifier
  from cifarjax.train_classifier import (init_state, make_draw, make_optimizer, make_train_step,
                                         put_split)
  config = ClassifierConfig(batch_size=16, dropout=0.4)
  model = paper_classifier(data.num_classes, dropout_rate=config.dropout)
  tx, _ = make_optimizer(config, len(data) // config.batch_size)
  state = jax.device_put(init_state(model, tx, seed=0), mesh_lib.replicated(mesh))
  draw = make_draw(*put_split(data, mesh), config, mesh)
  step = make_train_step(model, tx, mesh)
  return state, draw, step, ("params", "batch_stats")


def diffusion(mesh, data):
  from cifarjax.config import DiffusionConfig
  from cifarjax import train_diffusion as td
  config = DiffusionConfig(batch_size=16, unet="tiny", num_timesteps=100, label_dropout=0.2)
  model, schedule = td.make_unet(config, data.num_classes), td.make_schedule(config)
  tx, _ = td.make_optimizer(config, len(data) // config.batch_size)
  state = jax.device_put(td.init_state(model, tx, seed=0), mesh_lib.replicated(mesh))
  draw = td.make_draw(*td.put_split(data, mesh), config, mesh)
  step = td.make_train_step(model, schedule, tx, mesh, config)
  return state, draw, step, ("params", "ema_params")


mesh = mesh_lib.make_mesh(jax.devices()[:args.devices])
data = load_synthetic("test")
state, draw, step, saved = {"classifier": classifier, "diffusion": diffusion}[args.model](mesh, data)
losses = []
for _ in range(STEPS):
  batch, rng = draw(state)
  state, metrics = step(state, batch, rng)
  losses.append(float(metrics["loss"]))
np.savez(args.out, batch=np.asarray(batch[0]), losses=np.array(losses),
         **{"/".join(str(k.key) for k in path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(
                {name: getattr(state, name) for name in saved})})
print(json.dumps({"devices": mesh.size, "losses": losses}))
