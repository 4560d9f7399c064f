"""Two processes of 2 CPU devices each (jax.distributed on localhost, gloo collectives)
train the classifier and the generator like one process of 4 devices, checkpoint through orbax, and write each run file once."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from cifarjax import runlog

from _step_agreement import assert_steps_agree

pytestmark = pytest.mark.integration

WORKER = pathlib.Path(__file__).with_name("_multiprocess_worker.py")
TIMEOUT_S = 600
N = 16 * 32 * 32  # the worker's batch of 32x32 images: the longest sums in a step


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices_per_process: int, cache) -> dict:
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
  return {**env, "JAX_PLATFORMS": "cpu",
          # LLVM's optimisations speed up running, not what these tests compare; at level 0
          # the workers compile in about 60% of the time.
          "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_process} "
                       "--xla_backend_optimization_level=0",
          "JAX_COMPILATION_CACHE_DIR": str(cache),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
          "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def _start(num_processes, devices_per_process, out, modes, cache):
  """Starts the worker processes: ([Popen], [their open log files])."""
  out.mkdir(parents=True, exist_ok=True)
  port, env = _free_port(), _env(devices_per_process, cache)
  if num_processes > 1:  # read by cifarjax.mesh.initialize_distributed, as the commands do
    env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(num_processes))
  procs, logs = [], []
  for i in range(num_processes):
    log = open(out / f"log-{i}.txt", "w")
    logs.append(log)
    procs.append(subprocess.Popen(
        [sys.executable, str(WORKER), *modes, "--out", str(out)],
        env={**env, "JAX_PROCESS_ID": str(i)}, stdout=log, stderr=subprocess.STDOUT))
  return procs, logs


def _wait(procs, logs, out):
  """Waits for every worker, and fails with their logs if one fails."""
  try:
    codes = [p.wait(timeout=TIMEOUT_S) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
    for log in logs:
      log.close()
  if any(codes):
    text = "\n".join(f"--- process {i} (exit {c}):\n{(out / f'log-{i}.txt').read_text()[-3000:]}"
                     for i, c in enumerate(codes))
    pytest.fail(f"multi-process worker failed:\n{text}")


def _launch(num_processes, devices_per_process, out, modes, cache):
  """Starts the worker processes and waits for all (see `_wait`)."""
  _wait(*_start(num_processes, devices_per_process, out, modes, cache), out)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  base = tmp_path_factory.mktemp("multiprocess")
  cache = base.parent.parent / "jax-cache-multiprocess"
  _launch(1, 4, base / "one", ["step", "diffusion"], cache)
  _launch(2, 2, base / "two", ["step", "diffusion", "train"], cache)
  return base / "one", base / "two"


def test_sigterm_to_one_process_stops_every_process_at_one_step_with_a_checkpoint(tmp_path):
  """What a preempted host of a TPU slice (or a SLURM job at its time limit) gets: process
  1 alone receives SIGTERM; JAX's preemption sync stops both at one step, where they save
  one checkpoint together."""
  cache = tmp_path.parent.parent / "jax-cache-multiprocess"
  out = tmp_path / "preempt"
  procs, logs = _start(2, 2, out, ["preempt"], cache)
  try:
    deadline = time.monotonic() + TIMEOUT_S
    while len(runlog.read_metrics(out / "preempted")) < 3 and all(p.poll() is None for p in procs):
      assert time.monotonic() < deadline, "the run never logged 3 steps"
      time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)
  finally:
    _wait(procs, logs, out)
  records = [json.loads((out / f"preempt-{i}.json").read_text()) for i in (0, 1)]
  step = records[0]["step"]
  assert records == [{"step": step, "signum": signal.SIGTERM}] * 2
  assert step >= 3
  assert sorted(int(p.name) for p in (out / "preempted" / "checkpoints").iterdir()
                if p.name.isdigit()) == [step]
  assert runlog.read_metrics(out / "preempted")[-1]["step"] == step


def test_two_processes_step_like_one_process(runs):
  from cifarjax.config import ClassifierConfig
  from cifarjax.models.classifier import BN_MOMENTUM
  one, two = (dict(np.load(d / "step.npz")) for d in runs)
  # The comparison and its float32 tolerances are test_parallel.py's (tests/_step_agreement.py).
  report = assert_steps_agree(one, two, n=N, lr=ClassifierConfig().learning_rate,
                              bn_momentum=BN_MOMENTUM)
  assert report["layers"] == 6 and not report["zero_gradients"], report


def test_two_processes_diffusion_step_like_one_process(runs):
  from cifarjax import optim
  from cifarjax.config import DiffusionConfig
  one, two = (dict(np.load(d / "diffusion.npz")) for d in runs)
  config = DiffusionConfig()
  # In the tiny U-Net (8 channels in 8 groups) GroupNorm normalises each channel alone, so it
  # cancels any per-channel constant: the biases before it and the time encoding added before
  # it get rounding-noise gradients, which _step_agreement only checks are that small.
  assert_steps_agree(one, two, n=N, lr=config.learning_rate, ema_decay=float(optim.ema_decay_at(0, config.ema_decay)))


def test_two_processes_train_checkpoint_and_restore(runs):
  _, two = runs
  records = [json.loads((two / f"train-{i}.json").read_text()) for i in (0, 1)]
  for r in records:
    assert r["devices"] == 4 and r["steps"] == 2 and r["restored_step"] == 2
  # Both processes restored the same (replicated) parameters and saw the same evaluation.
  assert records[0]["restored_params_sum"] == records[1]["restored_params_sum"]
  assert records[0]["final_test_accuracy"] == records[1]["final_test_accuracy"]
  workdir = two / "workdir"
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()
                if p.name.isdigit()) == ["1", "2"]


def test_two_processes_write_run_files_once(runs):
  _, two = runs
  workdir = two / "workdir"
  for name in ("config.json", "classes.json", "summary.json", "training_graph.png"):
    assert (workdir / name).is_file(), name
  steps = [r["step"] for r in runlog.read_metrics(workdir) if "loss" in r]
  assert steps == [1, 2]  # one line per log step: only process 0 writes
  assert [r["step"] for r in runlog.read_metrics(workdir) if "test_accuracy" in r] == [2]
  assert "2 process(es)" in runlog.read_json(workdir / "summary.json")["devices"]
