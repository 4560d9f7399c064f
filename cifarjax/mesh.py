"""The 1-D data-parallel device mesh and the shardings every jitted function uses.

Parameters and optimiser state are replicated, batches are split along their
leading axis over all devices of all processes. The same code runs on one CPU,
8 fake CPU devices, N GPUs and a multi-host TPU slice.
"""

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cifarjax.errors import UserError, note, one_line

DATA_AXIS = "data"
MODES = ("auto", "on", "off")

# Launcher variables giving the number of processes started, this one among them. Within a
# group the first one set is read: a SLURM step (srun -n 1 inside a larger allocation) may
# run fewer tasks than the job has.
_PROCESS_COUNT_VARS = (("JAX_NUM_PROCESSES",),
                       ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS"),
                       ("OMPI_COMM_WORLD_SIZE",), ("PMI_SIZE",), ("MEGASCALE_NUM_SLICES",))
# Comma-separated lists of the hosts of a TPU slice, one process each.
_HOST_LIST_VARS = ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES")
# Where JAX's own cluster detection is not found (it is internal API), these variables,
# set by SLURM, Open MPI and multi-host TPU launchers, stand in for it.
_LAUNCHER_VARS = ("SLURM_NTASKS", "OMPI_MCA_orte_hnp_uri", "TPU_WORKER_HOSTNAMES",
                  "MEGASCALE_COORDINATOR_ADDRESS")
_HOW_TO_JOIN = ("set JAX_COORDINATOR_ADDRESS=host:port (process 0's, the same in every "
                "process), JAX_NUM_PROCESSES and JAX_PROCESS_ID (0 to N-1) in each process, "
                "or start them under a launcher JAX detects (SLURM srun, Open MPI mpirun, a "
                "Cloud TPU slice)")


def initialize_distributed(mode: str = "auto"):
  """Joins this process to the others of its run (`jax.distributed.initialize`), or refuses
  to run it alone where it is one of several; then notes the processes and devices.

  mode "on" always calls `jax.distributed.initialize()`; "off" never does; "auto" does
  where JAX_COORDINATOR_ADDRESS is set or JAX's own cluster detection finds a launcher of
  more than one process (SLURM, Open MPI, Cloud TPU, Kubernetes). JAX_NUM_PROCESSES and
  JAX_PROCESS_ID, which JAX itself does not read, are passed on. CPU processes exchange
  data through gloo. A failed start raises a UserError saying what to set, and so does a
  process that is not joined while its launcher's variables say it is one of several
  (`several_processes`): each would train alone on the same data and write the same
  workdir. Safe to call twice.
  """
  if mode not in MODES:
    raise ValueError(f"distributed mode must be one of {', '.join(MODES)}, got {mode!r}")
  if not jax.distributed.is_initialized():
    if mode == "on" or (mode == "auto" and _auto_should_join()):
      _join(mode)
    else:
      _refuse_alone(mode)
  note(describe_processes())


def describe_processes() -> str:
  """E.g. 'process 0 of 2, 16 gpu device(s) in all'."""
  devices = jax.devices()
  return (f"process {jax.process_index()} of {jax.process_count()}, {len(devices)} "
          f"{devices[0].platform} device(s) in all")


def detect_cluster():
  """(name, process count or None) of the launcher JAX's auto-detection would use, or None.

  JAX keeps its detectors in `jax._src.clusters` with no public way to ask; where that has
  moved, the first of _LAUNCHER_VARS set stands in, with its count unknown. A detector that
  fails (a metadata server out of reach, a missing optional package) counts as absent.
  """
  try:
    from jax._src.clusters import ClusterEnv
    detectors = list(ClusterEnv._cluster_types)
  except (ImportError, AttributeError, TypeError):
    var = next((v for v in _LAUNCHER_VARS if v in os.environ), None)
    return None if var is None else (var, None)
  for env in detectors:
    if getattr(env, "opt_in_only_method", False):  # mpi4py's: "present" wherever it is installed
      continue
    name = getattr(env, "__name__", str(env))
    try:
      if not env.is_env_present():
        continue
    except Exception as e:  # noqa: BLE001 - any failure of a probe means no such launcher here
      note(f"could not check for {name}: {one_line(e)}")
      continue
    try:
      return name, int(env.get_process_count())
    except Exception:  # noqa: BLE001 - jax.distributed.initialize will report it
      return name, None
  return None


def several_processes():
  """(variable, its value, process count) of the first launcher variable saying this is one
  of several processes, or None."""
  for group in _PROCESS_COUNT_VARS:
    var = next((v for v in group if v in os.environ), None)
    if var is not None and (count := _as_int(os.environ[var])) is not None and count > 1:
      return var, os.environ[var], count
  for var in _HOST_LIST_VARS:
    hosts = [h for h in os.environ.get(var, "").split(",") if h.strip()]
    if len(hosts) > 1:
      return var, os.environ[var], len(hosts)
  return None


def _auto_should_join() -> bool:
  if "JAX_COORDINATOR_ADDRESS" in os.environ:
    return True
  cluster = detect_cluster()
  # A launcher of one process needs no coordinator, and joining would leave a SLURM task
  # just one of its node's GPUs (JAX gives each task the device of its local rank).
  return cluster is not None and cluster[1] != 1


def _join(mode: str):
  kwargs = {}
  for name, var in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID")):
    if var in os.environ:
      if (value := _as_int(os.environ[var])) is None:
        raise UserError(f"{var} must be an integer, got {os.environ[var]!r}")
      kwargs[name] = value
  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # only CPU devices use it
  try:
    jax.distributed.initialize(**kwargs)
  except (RuntimeError, ValueError, TypeError) as e:
    alone = "; or --distributed off to run this process alone" if mode == "auto" else ""
    raise UserError(f"--distributed {mode}: jax.distributed.initialize() failed: "
                    f"{one_line(e)}. To join the processes, {_HOW_TO_JOIN}{alone}") from e


def _refuse_alone(mode: str):
  found = several_processes()
  if found is None:
    return
  var, value, count = found
  raise UserError(
      f"{var}={value} says this is one of {count} processes, but it runs alone "
      f"(--distributed {mode}: jax.distributed not initialized), so each would train on "
      f"its own and write the same workdir. Join them with --distributed on or auto: "
      f"{_HOW_TO_JOIN}; or start a single process")


def _as_int(text: str):
  try:
    return int(text)
  except ValueError:
    return None


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


def describe_devices(mesh: Mesh) -> str:
  """E.g. "8 x NVIDIA H100 80GB HBM3 (gpu), 1 process(es)": what a summary records."""
  d = mesh.devices.flat[0]
  return f"{mesh.size} x {d.device_kind} ({d.platform}), {jax.process_count()} process(es)"
