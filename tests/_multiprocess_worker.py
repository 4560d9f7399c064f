"""One process of a multi-process CPU run (tests/test_multiprocess.py starts them).

  JAX_COORDINATOR_ADDRESS=127.0.0.1:P JAX_NUM_PROCESSES=N JAX_PROCESS_ID=I \
    python _multiprocess_worker.py --out DIR MODE...

Each process brings its own fake CPU devices (XLA_FLAGS sets how many) and joins
the others through `cifarjax.mesh.initialize_distributed` (jax.distributed on
localhost, gloo for the cross-process collectives), as the commands do; without
the variables it runs alone, as the reference. MODEs, run in order:
  step   one classifier draw + train step on a mesh over every process's devices;
         process 0 writes DIR/step.npz as tests/_sharded_step.py does (batch, labels,
         loss, params, batch_stats and the gradient, read back from Adam's first moment).
  diffusion  the same with the tiny U-Net generator (as tests/_sharded_step.py's);
         process 0 writes DIR/diffusion.npz.
  train  a 2-step `train_classifier.train` with a checkpoint at each step into
         DIR/workdir, then `load_trained` from it; each process writes
         DIR/train-<I>.json.
  preempt  `train_classifier.train` for 100,000 steps into DIR/preempted, until SIGTERM
         to any process stops them all (tests/test_multiprocess.py sends it to one);
         each process writes DIR/preempt-<I>.json: the step and signal it stopped with.
"""

import argparse
import json
import pathlib

import jax

parser = argparse.ArgumentParser()
parser.add_argument("modes", nargs="+", choices=("step", "diffusion", "train", "preempt"))
parser.add_argument("--out", required=True)
args = parser.parse_args()

import numpy as np  # noqa: E402

from cifarjax import mesh as mesh_lib  # noqa: E402

mesh_lib.initialize_distributed()
from cifarjax.config import ClassifierConfig  # noqa: E402
from cifarjax.models import Classifier  # noqa: E402

# A small classifier (BatchNorm over the global batch, dropout, both block kinds) compiles in
# seconds; tests/test_parallel.py covers the paper's full model on one process.
MODEL = Classifier(num_classes=10, stem_channels=8, layout=("expand", "residual", "pool", "expand"),
                   bottleneck_ratio=2, dropout_rate=0.4)

out = pathlib.Path(args.out)


def flat(tree) -> dict:
  """Leaves of a replicated pytree as numpy, keyed 'a/b/c' (each process holds all of it)."""
  return {"/".join(str(k.key) for k in path): np.asarray(leaf.addressable_data(0))
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def adam_gradient(opt_state) -> dict:
  """The step's gradient as {'grad/a/b': array}, from Adam's first moment after one step:
  mu = (1 - b1) g, b1 = 0.9 (optax's default, which both trainers use)."""
  import optax
  is_adam = lambda s: isinstance(s, optax.ScaleByAdamState)
  (adam,) = [s for s in jax.tree.leaves(opt_state, is_leaf=is_adam) if is_adam(s)]
  return {"grad/" + k.split("/", 1)[1]: v.astype(np.float64) / (1 - 0.9)
          for k, v in flat({"mu": adam.mu}).items()}


def gather(x) -> np.ndarray:
  """A batch-sharded array, whole, on every process."""
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


# step and train use the same config and data, so that train's draw and step come from the
# compilation cache (test_multiprocess.py points every process at one).
CONFIG = ClassifierConfig(data="synthetic", steps=2, batch_size=16, log_every=1, eval_every=2,
                          eval_batch_size=64, train_eval_size=64, checkpoint_every=1)


def step():
  from cifarjax.data import load_split
  from cifarjax.kinds import CLASSIFIER
  from cifarjax.train_classifier import (make_draw, make_optimizer, make_train_step,
                                         put_split)
  mesh = mesh_lib.make_mesh()
  config = CONFIG
  data = load_split(config.data, "train")
  model = MODEL
  tx, _ = make_optimizer(config, len(data) // config.batch_size)
  # Every process holds the same host values; device_put to a replicated sharding over
  # all processes' devices places each process's copy on its own devices.
  state = jax.device_put(CLASSIFIER.init_state(model, tx, 0), mesh_lib.replicated(mesh))
  # The whole split is replicated and `draw` cuts the global batch inside jit: each process's
  # devices compute their own shard of it. This is what `make_array_from_process_local_data`
  # would give from per-process host batches, with no host input pipeline to keep in step.
  draw = make_draw(*put_split(data, mesh), config, mesh)
  batch, rng = draw(state)
  state, metrics = make_train_step(model, tx, mesh)(state, batch, rng)
  images, labels = gather(batch[0]), gather(batch[1])
  loss = float(np.asarray(metrics["loss"].addressable_data(0)))
  grads = adam_gradient(state.opt_state)
  if jax.process_index() == 0:
    np.savez(out / "step.npz", batch=images, labels=labels, loss=np.array([loss]),
             **flat({"params": state.params, "batch_stats": state.batch_stats}),
             **grads)


def diffusion():
  from cifarjax import train_diffusion as td
  from cifarjax.kinds import GENERATOR
  from cifarjax.config import DiffusionConfig
  from cifarjax.data.synthetic import load_synthetic
  mesh = mesh_lib.make_mesh()
  config = DiffusionConfig(batch_size=16, unet="tiny", num_timesteps=100, label_dropout=0.2)
  data = load_synthetic("test")
  model, schedule = td.make_unet(config, data.num_classes), td.make_schedule(config)
  tx, _ = td.make_optimizer(config, len(data) // config.batch_size)
  state = jax.device_put(GENERATOR.init_state(model, tx, 0, ema=True),
                         mesh_lib.replicated(mesh))
  draw = td.make_draw(*td.put_split(data, mesh), config, mesh)
  batch, rng = draw(state)
  state, metrics = td.make_train_step(model, schedule, tx, mesh, config)(state, batch, rng)
  images, labels = gather(batch[0]), gather(batch[1])
  loss = float(np.asarray(metrics["loss"].addressable_data(0)))
  grads = adam_gradient(state.opt_state)
  if jax.process_index() == 0:
    np.savez(out / "diffusion.npz", batch=images, labels=labels, loss=np.array([loss]),
             **flat({"params": state.params, "ema_params": state.ema["params"]}),
             **grads)


def train():
  from cifarjax.train_classifier import load_trained, train as train_classifier
  summary = train_classifier(CONFIG, out / "workdir", model=MODEL)
  _, state, _, _ = load_trained(out / "workdir", model=MODEL)
  restored = flat({"params": state.params})
  record = {"process": jax.process_index(), "devices": jax.device_count(),
            "steps": summary["steps"], "restored_step": int(np.asarray(state.step.addressable_data(0))),
            "final_test_accuracy": summary["final_test_accuracy"],
            "restored_params_sum": float(sum(np.sum(v, dtype=np.float64) for v in restored.values()))}
  (out / f"train-{jax.process_index()}.json").write_text(json.dumps(record))


def preempt():
  import dataclasses
  from cifarjax.errors import Interrupted
  from cifarjax.train_classifier import train as train_classifier
  config = dataclasses.replace(CONFIG, steps=100_000, eval_every=100_000,
                               checkpoint_every=100_000)
  try:
    train_classifier(config, out / "preempted", model=MODEL)
    record = {"step": None}
  except Interrupted as stopped:
    record = {"step": stopped.step, "signum": stopped.signum}
  (out / f"preempt-{jax.process_index()}.json").write_text(json.dumps(record))


for mode in args.modes:
  {"step": step, "diffusion": diffusion, "train": train, "preempt": preempt}[mode]()
if jax.process_count() > 1:
  jax.distributed.shutdown()
