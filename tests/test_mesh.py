"""`mesh.initialize_distributed`: when a process joins the others of its run, the one-line
errors where it cannot, and the refusal to run alone where its launcher started several.
jax.distributed.initialize is replaced by a recorder: nothing here really joins anything
(tests/test_multiprocess.py does, with two real processes)."""

import logging

import jax
import pytest

from cifarjax import cli, mesh
from cifarjax.commands import DISTRIBUTED_MODES
from cifarjax.errors import UserError

# Every variable a launcher, JAX's cluster detection or mesh.py reads.
LAUNCHER_VARS = (
    "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAX_COORDINATOR_PORT",
    "SLURM_JOB_ID", "SLURM_NODELIST", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_NPROCS",
    "SLURM_STEP_NUM_TASKS", "SLURM_PROCID", "SLURM_LOCALID", "OMPI_MCA_orte_hnp_uri",
    "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "PMI_SIZE",
    "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "TPU_WORKER_ID",
    "MEGASCALE_COORDINATOR_ADDRESS", "MEGASCALE_NUM_SLICES", "KUBERNETES_SERVICE_HOST")
SLURM_TWO_TASKS = {"SLURM_JOB_ID": "1234", "SLURM_STEP_NODELIST": "node[001-002]",
                   "SLURM_NTASKS": "2", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}


@pytest.fixture
def joins(monkeypatch):
  """The keyword arguments of each jax.distributed.initialize call, in a bare environment."""
  for var in LAUNCHER_VARS:
    monkeypatch.delenv(var, raising=False)
  calls = []
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
  return calls


def fake_cluster(present=True, count=4, opt_in=False, fails=False):
  """A JAX cluster detector (jax._src.clusters.ClusterEnv's interface)."""

  class FakeCluster:
    opt_in_only_method = opt_in

    @classmethod
    def is_env_present(cls):
      if fails:
        raise ConnectionError("metadata server unreachable")
      return present

    @classmethod
    def get_process_count(cls):
      return count
  return FakeCluster


@pytest.fixture
def detectors(monkeypatch):
  """Sets the cluster detectors JAX's auto-detection goes through."""
  from jax._src.clusters import ClusterEnv

  def use(*clusters):
    monkeypatch.setattr(ClusterEnv, "_cluster_types", list(clusters))
  return use


def test_the_cli_offers_every_mode():
  assert DISTRIBUTED_MODES == mesh.MODES
  for command in ("train-classifier", "train-diffusion"):
    assert cli.build_parser().parse_args([command]).distributed == "auto"


def test_one_process_without_launcher_runs_alone_in_every_mode_but_on(joins, detectors):
  detectors()
  mesh.initialize_distributed("auto")
  mesh.initialize_distributed("off")
  assert joins == []
  mesh.initialize_distributed("on")
  assert joins == [{}]


def test_off_never_joins(joins, monkeypatch, detectors):
  detectors(fake_cluster())
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
  mesh.initialize_distributed("off")
  assert joins == []


def test_auto_and_on_join_with_the_explicit_variables(joins, monkeypatch):
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")  # read by JAX itself
  monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
  monkeypatch.setenv("JAX_PROCESS_ID", "1")
  mesh.initialize_distributed("auto")
  mesh.initialize_distributed("on")
  assert joins == [{"num_processes": 2, "process_id": 1}] * 2


def test_auto_joins_a_slurm_step_that_jax_detects(joins, monkeypatch):
  """JAX's real detectors: a change in its internal API that made auto miss SLURM fails here."""
  for var, value in SLURM_TWO_TASKS.items():
    monkeypatch.setenv(var, value)
  assert mesh.detect_cluster() == ("SlurmCluster", 2)
  mesh.initialize_distributed("auto")
  assert joins == [{}]  # JAX reads the rest from SLURM's variables


def test_auto_leaves_a_one_task_slurm_job_alone(joins, monkeypatch):
  """Joining would cost it all but one of its node's GPUs."""
  for var, value in {**SLURM_TWO_TASKS, "SLURM_NTASKS": "1"}.items():
    monkeypatch.setenv(var, value)
  assert mesh.detect_cluster() == ("SlurmCluster", 1)
  mesh.initialize_distributed("auto")
  assert joins == []


@pytest.mark.parametrize("cluster, joined", [
    (fake_cluster(count=4), True),
    (fake_cluster(count=None), True),  # count unknown: JAX's own start will tell
    (fake_cluster(count=1), False),
    (fake_cluster(present=False), False),
    (fake_cluster(opt_in=True), False),  # like mpi4py's: present wherever the package is
    (fake_cluster(fails=True), False),  # a probe that fails is no launcher
])
def test_auto_follows_jax_cluster_detection(joins, detectors, cluster, joined):
  detectors(cluster)
  mesh.initialize_distributed("auto")
  assert joins == ([{}] if joined else [])


def test_auto_falls_back_to_launcher_variables_without_jax_detection(joins, monkeypatch):
  from jax._src.clusters import ClusterEnv
  monkeypatch.delattr(ClusterEnv, "_cluster_types")
  mesh.initialize_distributed("auto")
  assert joins == []
  monkeypatch.setenv("SLURM_NTASKS", "2")
  mesh.initialize_distributed("auto")
  assert joins == [{}]


def test_a_failed_start_is_one_line_saying_what_to_set(joins, monkeypatch):
  def initialize(**kwargs):
    raise ValueError("coordinator_address should be defined.")
  monkeypatch.setattr(jax.distributed, "initialize", initialize)
  with pytest.raises(UserError) as e:
    mesh.initialize_distributed("on")
  message = str(e.value)
  assert "\n" not in message and "coordinator_address should be defined" in message
  assert "JAX_COORDINATOR_ADDRESS" in message and "JAX_PROCESS_ID" in message
  assert isinstance(e.value.__cause__, ValueError)
  monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
  with pytest.raises(UserError, match="JAX_NUM_PROCESSES must be an integer, got 'two'"):
    mesh.initialize_distributed("on")


def test_auto_says_off_runs_alone_when_the_start_fails(joins, monkeypatch, detectors):
  detectors(fake_cluster(count=None))
  monkeypatch.setattr(jax.distributed, "initialize",
                      lambda **kwargs: (_ for _ in ()).throw(RuntimeError("no job found")))
  with pytest.raises(UserError, match="no job found.*--distributed off"):
    mesh.initialize_distributed("auto")


@pytest.mark.parametrize("mode", ["auto", "off"])
@pytest.mark.parametrize("env, var", [
    ({"JAX_NUM_PROCESSES": "2"}, "JAX_NUM_PROCESSES"),  # the address forgotten
    ({"SLURM_NTASKS": "4"}, "SLURM_NTASKS"),  # not all of SLURM's variables: JAX misses it
    ({"OMPI_COMM_WORLD_SIZE": "2"}, "OMPI_COMM_WORLD_SIZE"),  # Open MPI 5, no ORTE URI
    ({"PMI_SIZE": "8"}, "PMI_SIZE"),
    ({"TPU_WORKER_HOSTNAMES": "t1k-0,t1k-1"}, "TPU_WORKER_HOSTNAMES"),
    ({"MEGASCALE_NUM_SLICES": "2"}, "MEGASCALE_NUM_SLICES"),
])
def test_one_of_several_processes_refuses_to_run_alone(joins, monkeypatch, detectors, mode,
                                                       env, var):
  detectors()  # nothing JAX can join
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  with pytest.raises(UserError) as e:
    mesh.initialize_distributed(mode)
  message = str(e.value)
  assert f"{var}={env[var]}" in message and "--distributed on" in message, message
  assert "\n" not in message and joins == []


@pytest.mark.parametrize("env", [
    {"SLURM_NTASKS": "1"},
    {"SLURM_STEP_NUM_TASKS": "1", "SLURM_NTASKS": "4"},  # srun -n 1 in a 4-task allocation
    {"TPU_WORKER_HOSTNAMES": "localhost"},
    {"OMPI_COMM_WORLD_SIZE": "1", "JAX_NUM_PROCESSES": "1"},
    {"PMI_SIZE": "not a number"},
])
def test_one_process_of_one_is_not_refused(joins, monkeypatch, detectors, env):
  detectors()
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  mesh.initialize_distributed("off")
  assert joins == []


def test_joined_processes_are_not_refused_nor_joined_twice(joins, monkeypatch):
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
  monkeypatch.setenv("SLURM_NTASKS", "4")
  for mode in mesh.MODES:
    mesh.initialize_distributed(mode)
  assert joins == []


def test_unknown_mode_is_refused(joins):
  with pytest.raises(ValueError, match="auto, on, off"):
    mesh.initialize_distributed("yes")


def test_the_first_line_names_the_processes_and_devices(joins, caplog):
  caplog.set_level(logging.INFO, logger="cifarjax")
  mesh.initialize_distributed("off")
  n = jax.device_count()
  assert caplog.messages == [f"process 0 of 1, {n} cpu device(s) in all"]


@pytest.fixture
def no_training(monkeypatch):
  """Where a command failed to refuse, fails at once instead of training."""
  from cifarjax import train_classifier

  def train(*args, **kwargs):
    raise AssertionError("the command went on to train")
  monkeypatch.setattr(train_classifier, "train", train)


def test_train_classifier_refuses_before_writing_anything(joins, no_training, monkeypatch,
                                                          tmp_path, capsys):
  monkeypatch.setenv("SLURM_NTASKS", "2")
  workdir = tmp_path / "run"
  code = cli.main(["train-classifier", "--data", "synthetic", "--workdir", str(workdir),
                   "--distributed", "off"])
  err = capsys.readouterr().err
  assert code == 2 and "Traceback" not in err
  (line,) = [x for x in err.splitlines() if x.startswith("cifarjax train-classifier: error: ")]
  assert "SLURM_NTASKS=2" in line and "--distributed on" in line
  assert not workdir.exists() and joins == []


def test_train_classifier_on_passes_the_mode_through(joins, no_training, monkeypatch, tmp_path,
                                                    capsys):
  def initialize(**kwargs):
    joins.append(kwargs)
    raise ValueError("coordinator_address should be defined.")
  monkeypatch.setattr(jax.distributed, "initialize", initialize)
  code = cli.main(["train-classifier", "--data", "synthetic", "--workdir", str(tmp_path / "r"),
                   "--distributed", "on"])
  err = capsys.readouterr().err
  assert code == 2 and joins == [{}] and "JAX_COORDINATOR_ADDRESS" in err
  assert not (tmp_path / "r").exists()


def test_a_training_commands_first_line_names_the_processes(joins, no_training, tmp_path,
                                                           capsys):
  code = cli.main(["train-classifier", "--preset", "no-such-preset", "--data", "synthetic",
                   "--workdir", str(tmp_path / "r")])
  lines = capsys.readouterr().err.splitlines()
  assert code == 2 and "no-such-preset" in lines[-1]
  n = jax.device_count()
  assert lines[0] == f"cifarjax train-classifier: process 0 of 1, {n} cpu device(s) in all"
