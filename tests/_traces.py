"""Counting how often jax traces the train step that `loop.run` drives (a trace counter in
the spirit of chex.assert_max_traces, for jitted functions built inside the trainers)."""

import collections
import contextlib

import jax
import pytest

TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"  # jax records one per jit trace


@contextlib.contextmanager
def loop_traces():
  """Within the block, every `loop.run` call's train step is counted: yields a dict that
  ends up with {"name": the jitted step's name, "calls": steps run, "traces": its traces,
  "all": traces of every jitted function by name}."""
  from cifarjax import loop
  traces = collections.Counter()
  seen = {"calls": 0}

  def listener(event, duration, **kwargs):
    del duration
    if event == TRACE_EVENT:
      traces[kwargs.get("fun_name")] += 1

  real_run = loop.run

  def run(*args, train_step, **kwargs):
    seen["name"] = train_step.__name__

    def counted(*a):
      seen["calls"] += 1
      return train_step(*a)
    return real_run(*args, train_step=counted, **kwargs)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    with pytest.MonkeyPatch.context() as mp:
      mp.setattr(loop, "run", run)
      yield seen
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
    seen["traces"] = traces[seen.get("name")]
    seen["all"] = dict(traces)
