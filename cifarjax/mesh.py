"""The 1-D data-parallel device mesh and the shardings every jitted function uses.

Parameters and optimiser state are replicated, batches are split along their
leading axis over all devices of all processes. The same code runs on one CPU,
8 fake CPU devices, N GPUs and a multi-host TPU slice.
"""

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def initialize_distributed():
  """Calls `jax.distributed.initialize()` when launched as one of several processes.

  Multi-host launchers (TPU VMs, SLURM) are detected by JAX itself; explicit
  JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID variables (JAX
  reads only the first) are passed on here. CPU processes exchange data through
  gloo. Safe to call twice.
  """
  if jax.distributed.is_initialized():
    return
  explicit = "JAX_COORDINATOR_ADDRESS" in os.environ
  cluster = any(v in os.environ for v in ("SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS"))
  if not (explicit or cluster):
    return
  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # only CPU devices use it
  kwargs = {}
  for name, var in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID")):
    if var in os.environ:
      kwargs[name] = int(os.environ[var])
  jax.distributed.initialize(**kwargs)


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh named 'data' over `devices` (default: every device of every process)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over the 'data' axis, the rest replicated."""
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(batch_size: int, mesh: Mesh):
  if batch_size % mesh.size:
    raise ValueError(
        f"batch size {batch_size} must be divisible by the number of devices ({mesh.size})")
