"""Run as a script with N fake CPU devices: prints, as JSON, the classifier's loss and
parameters after one draw+train step on a mesh of the first `--devices` devices."""

import argparse
import json

import jax
import numpy as np

from cifarjax import mesh as mesh_lib
from cifarjax.config import ClassifierConfig
from cifarjax.data.synthetic import load_synthetic
from cifarjax.models import paper_classifier
from cifarjax.train_classifier import init_state, make_draw, make_optimizer, make_train_step, put_split

parser = argparse.ArgumentParser()
parser.add_argument("--devices", type=int, required=True)
parser.add_argument("--out", required=True)
args = parser.parse_args()
STEPS = 1

mesh = mesh_lib.make_mesh(jax.devices()[:args.devices])
config = ClassifierConfig(batch_size=16, dropout=0.4)
data = load_synthetic("test")
model = paper_classifier(data.num_classes, dropout_rate=config.dropout)
tx, _ = make_optimizer(config, len(data) // config.batch_size)
state = jax.device_put(init_state(model, tx, seed=0), mesh_lib.replicated(mesh))
draw = make_draw(*put_split(data, mesh), config, mesh)
step = make_train_step(model, tx, mesh)
losses = []
for _ in range(STEPS):
  batch, rng = draw(state)
  state, metrics = step(state, batch, rng)
  losses.append(float(metrics["loss"]))
np.savez(args.out, batch=np.asarray(batch[0]), losses=np.array(losses),
         **{"/".join(str(k.key) for k in path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(
                {"params": state.params, "batch_stats": state.batch_stats})})
print(json.dumps({"devices": mesh.size, "losses": losses}))
