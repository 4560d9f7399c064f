"""Counting how often jax traces the fused train steps that `loop.run` drives (a trace counter in
the spirit of chex.assert_max_traces, for jitted functions built inside the trainers)."""

import collections
import contextlib
import types

import jax
import pytest

TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"  # jax records one per jit trace


@contextlib.contextmanager
def loop_traces():
  """Within the block, the fused train steps of every `loop.run` call are counted: yields a
  dict that ends up with {"name": the fused step's name, "calls": steps run through it,
  "traces": its traces, "all": traces of every jitted function by name}."""
  from cifarjax import loop
  traces = collections.Counter()
  seen = {"calls": 0}

  def listener(event, duration, **kwargs):
    del duration
    if event == TRACE_EVENT:
      traces[kwargs.get("fun_name")] += 1

  real_fuse = loop.fuse_steps

  def fuse_steps(draw, train_step, num_steps, state, **kwargs):
    fused = real_fuse(draw, train_step, num_steps, state, **kwargs)
    seen["name"] = fused.__name__

    def counted(compiled):
      def call(state):
        seen["calls"] += num_steps
        return compiled(state)
      return call
    # The loop compiles each fused step ahead of time (`.lower(state).compile()`).
    return types.SimpleNamespace(lower=lambda state: types.SimpleNamespace(
        compile=lambda: counted(fused.lower(state).compile())))

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    with pytest.MonkeyPatch.context() as mp:
      mp.setattr(loop, "fuse_steps", fuse_steps)
      yield seen
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
    seen["traces"] = traces[seen.get("name")]
    seen["all"] = dict(traces)
