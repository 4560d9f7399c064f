"""XLA compiler options for our jitted functions (`jax.jit(..., compiler_options=options())`).

On CPUs, XLA's own convolution kernels are slow; XLA can instead hand
matmuls to YNNPACK (XNNPACK's successor, built into jaxlib), whose kernels are
faster (docs/benchmarks.md has the numbers). The switch is still marked
experimental in XLA, so it is tried once on a tiny program and left off where
this jaxlib lacks or rejects it. Other backends get no options.
"""

import functools

import jax
import numpy as np

_CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}


@functools.cache
def options() -> dict:
  """Compiler options for the default backend: YNNPACK dots on CPU if supported, else {}."""
  if jax.default_backend() != "cpu":
    return {}
  x = np.ones((2, 2), np.float32)
  try:
    jax.jit(lambda a: a @ a, compiler_options=_CPU_OPTIONS).lower(x).compile()
  except Exception:  # jaxlib without the option: XLA's own kernels, slower but correct
    return {}
  return dict(_CPU_OPTIONS)
