"""The train state and the jitted train step that both models share.

A model comes in as its loss, `loss_fn(params, batch_stats, batch, rng) -> (loss,
(batch_stats, metrics))`: the classifier's updates its BatchNorm statistics, the
U-Net's has none (None) and returns them as they came. `make_train_step` wraps it
into `train_step(state, batch, rng) -> (state, metrics)`: gradients, the optimizer's
update, and the moving average of the weights where the state keeps one. It is
compiled once with `jax.jit` over a 1-D data mesh: the state replicated and donated,
the batch split over devices (XLA inserts the cross-device reductions, so BatchNorm
statistics are those of the whole global batch and 1 device and 8 give the same step).
"""

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cifarjax import compiler, mesh as mesh_lib, optim
from cifarjax.data import Split


@flax.struct.dataclass
class TrainState:
  """What a checkpoint holds. The field names are the checkpoint's layout: renaming one
  makes the runs already written unreadable (see `checkpoint.restore_latest`)."""
  step: jax.Array  # int32 scalar
  params: Any
  batch_stats: Any  # BatchNorm running statistics; None for a model without them
  opt_state: Any
  rng: jax.Array  # uint32 (2,) base key: data order, augmentation and step keys derive from it
  # The moving average of `variables` (optim.ema_update), or None where the run keeps none.
  ema: Any = None

  @property
  def variables(self) -> dict:
    """{"params"[, "batch_stats"]}: what the model's apply takes; `ema` is laid out alike."""
    return variables_of(self.params, self.batch_stats)


def variables_of(params, batch_stats) -> dict:
  return {"params": params} if batch_stats is None else {"params": params,
                                                          "batch_stats": batch_stats}


def init_state(init_fn: Callable[[jax.Array], dict], tx, seed: int,
               ema: bool = False) -> TrainState:
  """The state before the first step: the variables `init_fn(key)` gives (flax's init,
  with a key derived from the seed), tx's initial optimizer state, and the seed's base key.
  ema: also keep a moving average of the variables, starting at the initial ones."""
  rng = jax.random.PRNGKey(seed)
  variables = init_fn(jax.random.fold_in(rng, 2))
  params, batch_stats = variables["params"], variables.get("batch_stats")
  averaged = variables_of(params, batch_stats)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                    opt_state=tx.init(params), rng=rng,
                    ema=jax.tree.map(jnp.copy, averaged) if ema else None)


def make_train_step(loss_fn, tx, mesh, ema_decay: float = 0.0):
  """The jitted `train_step(state, batch, rng) -> (state, {"loss", **loss_fn's metrics})`.
  ema_decay: the decay (`optim.ema_decay_at`) of the average, for states that keep one."""
  replicated, sharded = mesh_lib.replicated(mesh), mesh_lib.batch_sharded(mesh)

  def train_step(state: TrainState, batch, rng):
    (loss, (batch_stats, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state.batch_stats, batch, rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema
    if ema is not None:
      ema = optim.ema_update(ema, variables_of(params, batch_stats), state.step, ema_decay)
    state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                          opt_state=opt_state, ema=ema)
    return state, {"loss": loss, **metrics}

  return jax.jit(train_step, in_shardings=(replicated, sharded, replicated),
                 out_shardings=(replicated, replicated), donate_argnums=0,
                 compiler_options=compiler.options())


def put_split(data: Split, mesh, pad_to: int = 1):
  """The split's images (uint8) and labels (int32) on every device, padded with zeros to a
  multiple of pad_to (whole evaluation batches)."""
  pad = -len(data) % pad_to
  images = np.concatenate([data.images, np.zeros((pad, *data.images.shape[1:]), np.uint8)])
  labels = np.concatenate([data.labels, np.zeros((pad,), data.labels.dtype)]).astype(np.int32)
  return jax.device_put((images, labels), mesh_lib.replicated(mesh))
