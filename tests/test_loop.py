"""The shared loop's guarantees, on a toy state (no network to compile)."""

import signal
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cifarjax import checkpoint, loop, runlog
from cifarjax.errors import Interrupted


@flax.struct.dataclass
class ToyState:
  step: jax.Array
  w: jax.Array


SETTINGS = loop.LoopSettings(steps=6, batch_size=4, log_every=1, eval_every=100,
                             checkpoint_every=2, keep_checkpoints=5)


def _run(workdir, poison_at=None, steps=6, time_limit_s=None, lr_fn=lambda step: 0.0,
         train_step=None):
  @jax.jit
  def poisoned_step(state, batch, rng):
    w = state.w + batch
    loss = jnp.where(state.step == (poison_at if poison_at is not None else -1), jnp.nan, w.sum())
    return state.replace(step=state.step + 1, w=w), {"loss": loss}

  state = ToyState(step=jnp.zeros((), jnp.int32), w=jnp.zeros(3))
  return loop.run(workdir, state, draw=jax.jit(lambda s: (jnp.ones(3), None)),
                  train_step=train_step or poisoned_step, evaluate=lambda s: {}, lr_fn=lr_fn,
                  settings=loop.LoopSettings(**{**SETTINGS.__dict__, "steps": steps}),
                  time_limit_s=time_limit_s)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  with pytest.raises(FloatingPointError, match=r"non-finite loss at step 4.*checkpoint \(step 4\) is intact"):
    _run(tmp_path, poison_at=4)
  mngr = checkpoint.manager(tmp_path, 5)
  assert mngr.latest_step() == 4
  like = ToyState(step=jnp.zeros((), jnp.int32), w=jnp.zeros(3))
  restored = checkpoint.restore_latest(mngr, like)
  np.testing.assert_array_equal(restored.w, np.full(3, 4.0))
  assert int(restored.step) == 4


def test_time_limit_stops_with_a_checkpoint_and_resumes(tmp_path):
  # A limit of 0 s has passed at the first boundary: one step is taken (so every call
  # makes progress), checkpointed although the cadence saves every 2, and the run resumes.
  with pytest.raises(Interrupted) as stopped:
    _run(tmp_path, time_limit_s=0)
  assert (stopped.value.step, stopped.value.steps) == (1, 6)
  assert checkpoint.manager(tmp_path, 5).latest_step() == 1
  with pytest.raises(Interrupted, match="step 2 of 6"):
    _run(tmp_path, time_limit_s=0)
  state, _, _ = _run(tmp_path, time_limit_s=3600)  # a limit not reached changes nothing
  np.testing.assert_array_equal(state.w, np.full(3, 6.0))
  assert [r["step"] for r in runlog.read_metrics(tmp_path)] == [1, 2, 3, 4, 5, 6]


def test_resume_drops_metrics_past_the_checkpoint(tmp_path):
  _run(tmp_path, steps=6)
  # Pretend the run died at step 6 before a checkpoint at 6 was written.
  mngr = checkpoint.manager(tmp_path, 5)
  mngr.delete(6)
  mngr.close()
  state, _, _ = _run(tmp_path, steps=6)
  steps = [r["step"] for r in runlog.read_metrics(tmp_path)]
  assert steps == [1, 2, 3, 4, 5, 6]
  np.testing.assert_array_equal(state.w, np.full(3, 6.0))


def test_epoch_batch_indices_cover_each_epoch_once():
  key = jax.random.PRNGKey(0)
  epoch0 = np.concatenate([loop.epoch_batch_indices(key, s, 10, 3) for s in range(3)])
  assert len(set(epoch0.tolist())) == 9  # 3 batches of 3, one example dropped
  epoch1 = np.concatenate([loop.epoch_batch_indices(key, s, 10, 3) for s in range(3, 6)])
  assert not np.array_equal(epoch0, epoch1)  # reshuffled
  np.testing.assert_array_equal(loop.epoch_batch_indices(key, 4, 10, 3),
                                loop.epoch_batch_indices(key, 4, 10, 3))


@pytest.fixture
def sigterm_default():
  """SIGTERM with the system's handler, as in a process of its own (the loop takes it over)."""
  previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
  yield
  signal.signal(signal.SIGTERM, previous)


def _sigterm_after_step(n: int, times: int = 1):
  """An lr_fn that sends this process SIGTERM `times` times when step n's metrics are logged."""
  def lr_fn(step):
    if step + 1 == n:
      for _ in range(times):
        signal.raise_signal(signal.SIGTERM)
    return 0.0
  return lr_fn


def test_sigterm_stops_at_the_next_step_with_a_checkpoint_and_resumes(tmp_path, sigterm_default):
  with pytest.raises(Interrupted) as stopped:
    _run(tmp_path, lr_fn=_sigterm_after_step(3))
  assert (stopped.value.step, stopped.value.signum, stopped.value.exit_code) == (3, 15, 143)
  assert "stopped by SIGTERM at step 3 of 6; checkpoint saved" in str(stopped.value)
  assert checkpoint.manager(tmp_path, 5).all_steps() == [2, 3]  # 3: saved for the stop
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the loop's handler is gone
  state, _, _ = _run(tmp_path)
  np.testing.assert_array_equal(state.w, np.full(3, 6.0))


def test_a_second_sigterm_stops_at_once(tmp_path, sigterm_default):
  with pytest.raises(Interrupted) as stopped:
    _run(tmp_path, lr_fn=_sigterm_after_step(3, times=2))
  assert (stopped.value.step, stopped.value.signum) == (None, signal.SIGTERM)
  assert checkpoint.manager(tmp_path, 5).all_steps() == [2]


def test_images_per_sec_leaves_compiling_out(tmp_path):
  """Tracing the step sleeps 2 s: counted in the first logged rate, it would make that rate
  at most 4 images / 2 s; a step of the toy takes milliseconds."""
  def slow_to_compile(state, batch, rng):
    time.sleep(2)
    return state.replace(step=state.step + 1, w=state.w + batch), {"loss": state.w.sum()}
  _run(tmp_path, train_step=jax.jit(slow_to_compile))
  rates = [r["images_per_sec"] for r in runlog.read_metrics(tmp_path)]
  assert len(rates) == 6 and min(rates) > 10
