"""The training loop shared by both models: feeds steps, logs, evaluates, checkpoints.

The model-specific parts come in as functions: `draw(state) -> (batch, rng)`
and `train_step(state, batch, rng) -> (state, metrics)`, both already jitted,
and `evaluate(state) -> dict`. The loop never blocks on the device except at
log, eval and checkpoint boundaries.

Each call runs k = `steps_per_call` steps in one jitted function (draw and step
under `lax.scan`, the state donated, the k steps' metrics stacked on the
device): for small models on an accelerator, per-call overhead otherwise
dominates. Stretches that would cross a log, eval or checkpoint step run one
step per call, so every boundary lands where it does with k = 1.
"""

import dataclasses
import itertools
import signal
import threading
import time

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from cifarjax import augment, checkpoint, compiler, mesh as mesh_lib, runlog
from cifarjax.errors import Interrupted, note, raise_interrupted


@dataclasses.dataclass(frozen=True)
class LoopSettings:
  steps: int
  batch_size: int
  log_every: int
  eval_every: int
  checkpoint_every: int
  keep_checkpoints: int
  steps_per_call: int = 1


def epoch_batch_indices(key, step, num_examples: int, batch_size: int):
  """Indices of batch `step`: epoch e = step // steps_per_epoch walks a fresh permutation
  drawn from fold_in(key, e) in order, dropping the remainder. A pure function of
  (key, step), so the data order needs no state beyond the step."""
  steps_per_epoch = num_examples // batch_size
  epoch, position = step // steps_per_epoch, step % steps_per_epoch
  perm = jax.random.permutation(jax.random.fold_in(key, epoch), num_examples)
  return jax.lax.dynamic_slice(perm, (position * batch_size,), (batch_size,))


def make_draw(images, labels, batch_size: int, augment_config: augment.AugmentConfig, to_input,
              mesh):
  """draw(state) -> ((inputs, labels), rng), jitted: batch `state.step` of the epoch order
  (`epoch_batch_indices`), augmented on the device, mapped by `to_input` to the model's
  input range; rng is the step's own key for the train step (dropout, noise).
  images/labels: the whole split, uint8 and int32, on the device. The order, the
  augmentation and the step's key all derive from `state.rng` and `state.step`."""
  num_examples = len(images)
  if num_examples < batch_size:
    raise ValueError(f"batch size {batch_size} exceeds the {num_examples} training examples")

  def draw(state):
    order_key = jax.random.fold_in(state.rng, 0)
    aug_key, step_rng = jax.random.split(jax.random.fold_in(state.rng, state.step + 1))
    idx = epoch_batch_indices(order_key, state.step, num_examples, batch_size)
    x = augment.augment(aug_key, augment.to_float(images[idx]), augment_config)
    return (to_input(x), labels[idx]), step_rng

  sharded, replicated = mesh_lib.batch_sharded(mesh), mesh_lib.replicated(mesh)
  return jax.jit(draw, out_shardings=((sharded, sharded), replicated))


def fuse_steps(draw, train_step, num_steps: int, state, rolled: bool = True):
  """One jitted call of `num_steps` (draw, train_step) pairs: state -> (state, metrics stacked
  along a leading axis of num_steps).

  `draw` and `train_step` are the loop's jitted functions; their Python bodies
  (`__wrapped__`, which `jax.jit` keeps) are inlined, and the shardings they give
  the state and the batch are pinned, read off `state` and one drawn batch.
  rolled: the steps run as a `lax.scan` (one compiled body, whatever num_steps);
  False (num_steps 1 only): the body alone, without a loop around it, which XLA:CPU
  runs several times faster (docs/benchmarks.md); the two differ by float rounding.
  """
  if not rolled and num_steps != 1:
    raise ValueError(f"an unrolled call runs one step, not {num_steps}")
  try:
    draw_body, step_body = draw.__wrapped__, train_step.__wrapped__
  except AttributeError as e:
    raise ValueError("fused steps need draw and train_step made by jax.jit") from e
  state_shardings = jax.tree.map(lambda a: a.sharding, state)
  batch_shardings = jax.tree.map(lambda a: a.sharding, draw(state)[0])

  def body(state, _=None):
    batch, rng = draw_body(state)
    batch = jax.lax.with_sharding_constraint(batch, batch_shardings)
    return step_body(state, batch, rng)

  def multi_step(state):
    if rolled:
      return jax.lax.scan(body, state, length=num_steps)
    state, metrics = body(state)
    return state, jax.tree.map(lambda m: m[None], metrics)

  return jax.jit(multi_step, in_shardings=(state_shardings,),
                 out_shardings=(state_shardings, None), donate_argnums=0,
                 compiler_options=compiler.options())


def step_calls(draw, train_step, steps_per_call: int, state) -> dict:
  """{k: the call that runs k steps} for the loop: k = steps_per_call, and 1 for the steps
  near log, eval and checkpoint boundaries that a k-step call would pass.

  With steps_per_call 1 a step is one unrolled call: XLA:CPU runs loops' bodies
  several times slower than the same code outside a loop. With k > 1 the single
  steps go through the same rolled body as the k-step calls, so every k > 1 trains
  bitwise-identical weights, and a run may change k when it resumes.
  """
  if steps_per_call == 1:
    return {1: fuse_steps(draw, train_step, 1, state, rolled=False)}
  return {k: fuse_steps(draw, train_step, k, state) for k in (1, steps_per_call)}


def _unstack(first_step: int, stacked: dict) -> list:
  """(step, metrics) per step of a fused call's stacked metrics, still on the device."""
  n = len(next(iter(stacked.values())))
  return [(first_step + i, {k: v[i] for k, v in stacked.items()}) for i in range(n)]


def _flush(pending, log, lr_fn, images_per_step, t_last, bar, last_good_step):
  """Fetches pending per-step metrics, checks them, writes their mean. Returns (metrics, time)."""
  steps = [s for s, _ in pending]
  fetched = jax.device_get([m for _, m in pending])
  for step, metrics in zip(steps, fetched):
    bad = [k for k, v in metrics.items() if not np.all(np.isfinite(v))]
    if bad:
      raise FloatingPointError(
          f"non-finite {', '.join(bad)} at step {step} ({metrics}); training stopped. The last "
          f"good checkpoint (step {last_good_step}) is intact; lower the learning rate or check "
          f"the data before resuming.")
  now = time.perf_counter()
  mean = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
  record = {"step": steps[-1] + 1, **mean, "lr": float(lr_fn(steps[-1])),
            "images_per_sec": len(steps) * images_per_step / max(now - t_last, 1e-9)}
  log.write(record)
  bar.set_postfix({k: f"{v:.4g}" for k, v in mean.items()})
  return record, now


def _crosses_boundary(step: int, k: int, s: LoopSettings) -> bool:
  """Whether steps step+1 .. step+k-1 hold a log, eval or checkpoint step, or run past the end:
  the k-step call may end on a boundary, not pass one."""
  if step + k > s.steps:
    return True
  return any(done % every == 0 for done in range(step + 1, step + k)
             for every in (s.log_every, s.eval_every, s.checkpoint_every))


# The signals that stop training at a step boundary, and the handlers that they must have
# for the loop to take them over (a caller's own handler stays in charge): SIGINT
# Python's, SIGTERM the system's or the CLI's.
_STOPPABLE = {signal.SIGINT: (signal.default_int_handler,),
              signal.SIGTERM: (signal.SIG_DFL, raise_interrupted)}


class _StopOnSignal:
  """While active, a first SIGINT (Ctrl-C) or SIGTERM only asks the loop to stop at the
  next step boundary (`signum`); a second one stops at once (`errors.Interrupted`).
  Active only in the main thread of a single-process run: several processes must stop
  at one step, which JAX's preemption sync decides for them (`_preempted`)."""

  def __init__(self):
    self.signum, self._previous = None, {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread() and jax.process_count() == 1:
      for signum, defaults in _STOPPABLE.items():
        if signal.getsignal(signum) in defaults:
          self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def _handle(self, signum, frame):
    if self.signum is not None:
      raise_interrupted(signum, frame)
    self.signum = signum
    name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
    note(f"{name}: stopping after this step to save a checkpoint ({name} again to stop at "
         f"once, losing the steps since the last checkpoint)")

  def __exit__(self, *exc):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)


# JAX's preemption sync stops every process at the counter just past the highest that any
# process had passed when one received SIGTERM; so the counter goes up by one per call and
# is never reused in a process. Every process of a run makes the same calls: the
# counters agree.
_SYNC_COUNTER = itertools.count(1)


def _preempted() -> bool:
  """Whether this call is the one at which every process of a multi-process run stops,
  because one of them received SIGTERM (JAX handles that signal in such a run). Called
  after every call in every process; no communication unless a process was signalled."""
  try:
    return multihost_utils.reached_preemption_sync_point(next(_SYNC_COUNTER))
  except RuntimeError:  # JAX's preemption service is off (jax_enable_preemption_service)
    return False


def _compile(calls: dict, state) -> dict:
  """`step_calls`' calls compiled ahead of time, saying so: compiling takes seconds to
  minutes, and stays out of the first logged images/s."""
  note("compiling the train step (seconds to minutes)")
  t0 = time.perf_counter()
  compiled = {k: call.lower(state).compile() for k, call in calls.items()}
  note(f"compiled in {time.perf_counter() - t0:.1f} s")
  return compiled


def run(workdir, state, *, draw, train_step, evaluate, lr_fn, settings: LoopSettings,
        desc="train", time_limit_s: float | None = None):
  """Trains from the latest checkpoint in `workdir` (or `state`) to `settings.steps`.

  Returns (final state, last evaluation dict, wall seconds spent in this call).
  Ctrl-C (SIGINT) or SIGTERM stops it at the next step boundary after saving a checkpoint
  there, raising `errors.Interrupted` (a KeyboardInterrupt) with the signal; running it
  again resumes from that step. In a multi-process run, SIGTERM to any process stops all
  of them at one step (JAX's preemption sync). time_limit_s stops it the same way at the
  first boundary after that many seconds from this call (compiling included; 0: after
  the first call's steps), for a run that must fit a time budget. Single-process runs
  only: processes that stopped on their own clocks could stop at different steps.
  A checkpoint that cannot be written (a full disk) raises `errors.WriteError`; the
  last complete one stays, and the next start removes the partial one.
  """
  s = settings
  if time_limit_s is not None and jax.process_count() > 1:
    raise ValueError("a time limit needs a single-process run (processes would stop apart)")
  deadline = None if time_limit_s is None else time.monotonic() + time_limit_s
  mngr = checkpoint.manager(workdir, s.keep_checkpoints, cleanup=True)
  restored = checkpoint.restore_latest(mngr, state)
  if restored is not None:
    state = restored
  start = int(jax.device_get(state.step))
  if restored is not None and start < s.steps:
    note(f"resuming from step {start} of {s.steps} (the checkpoint in {mngr.directory})")
  elif restored is not None:
    note(f"the checkpoint in {mngr.directory} is at step {start}, and the run asks for "
         f"{s.steps}: nothing to train (a larger --steps trains on); evaluating")
  else:
    note(f"starting at step 0 of {s.steps}")
  log = runlog.MetricsLog(workdir, resume_step=start)
  last_good = mngr.latest_step()
  pending, evaluation = [], {}
  t0 = time.perf_counter()
  bar = tqdm(total=s.steps, initial=start, desc=desc, unit="step", dynamic_ncols=True,
             disable=jax.process_index() != 0)
  multi_process = jax.process_count() > 1
  stop = _StopOnSignal()
  try:
    stop.__enter__()
    if start < s.steps:
      calls = _compile(step_calls(draw, train_step, s.steps_per_call, state), state)
    t_last = time.perf_counter()
    step = start
    while step < s.steps:
      out_of_time = deadline is not None and time.monotonic() >= deadline
      if (stop.signum or out_of_time) and step > start:
        if out_of_time and not stop.signum:
          note(f"time limit of {time_limit_s:g} s reached at step {step}: saving a checkpoint")
        if pending:
          _flush(pending, log, lr_fn, s.batch_size, t_last, bar, last_good)
          pending = []
        if last_good != step:
          checkpoint.save(mngr, step, state)
        raise Interrupted(step, s.steps, stop.signum)
      k = s.steps_per_call if not _crosses_boundary(step, s.steps_per_call, s) else 1
      state, stacked = calls[k](state)
      pending.extend(_unstack(step, stacked))
      step += k
      bar.update(step - bar.n)
      if multi_process and _preempted():
        note(f"a process received SIGTERM: every process stops at step {step}")
        stop.signum = signal.SIGTERM
      done = step
      boundary = {
          "log": done % s.log_every == 0 or done == s.steps,
          "eval": done % s.eval_every == 0 or done == s.steps,
          "ckpt": done % s.checkpoint_every == 0 or done == s.steps,
      }
      if pending and any(boundary.values()):
        _, t_last = _flush(pending, log, lr_fn, s.batch_size, t_last, bar, last_good)
        pending = []
      if boundary["eval"]:
        bar.set_description(f"{desc} (evaluating)")
        evaluation = evaluate(state)
        bar.set_description(desc)
        if evaluation:
          log.write({"step": done, **evaluation})
      if boundary["ckpt"]:
        checkpoint.save(mngr, done, state)
        last_good = done
      if boundary["eval"] or boundary["ckpt"]:
        t_last = time.perf_counter()  # evaluating and saving are not training throughput
  finally:
    stop.__exit__()
    bar.close()
    checkpoint.close(mngr)
  if start >= s.steps:  # nothing to train: still report where the run stands
    evaluation = evaluate(state)
  return state, evaluation, time.perf_counter() - t0
