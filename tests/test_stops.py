"""What clusters do to a run, done to the `cifarjax` command in a subprocess: SIGTERM (a
scheduler's time limit, `timeout`, a preempted VM) stops training at a step boundary with a
checkpoint, and the run resumes exactly; a write that fails (a full disk, a file-size
limit) ends in one line and exit code 1, the last complete checkpoint untouched and the
partial one removed at the next start.

Every run trains the paper classifier on synthetic data at batch 8; the runs share one
JAX compilation cache, so only the first compiles.
"""

import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from cifarjax import checkpoint, runlog

pytestmark = pytest.mark.integration

TIMEOUT_S = 600
# Evaluation at the end of a run only, on small sets (the runs compare checkpoints).
SMALL = ("--data", "synthetic", "--batch-size", 8, "--log-every", 1, "--eval-every", 100_000,
         "--set", "eval_batch_size=64", "--set", "train_eval_size=64")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  base = tmp_path_factory.getbasetemp()
  return {**os.environ, "CIFARJAX_HUGE_PAGES": "0", "CIFARJAX_CACHE": str(base / "cache"),
          "JAX_COMPILATION_CACHE_DIR": str(base.parent / "jax-cache-cli"),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
          "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def train_command(workdir, steps, *more) -> list[str]:
  return [sys.executable, "-m", "cifarjax", "train-classifier", "--workdir", str(workdir),
          "--steps", str(steps), *map(str, SMALL), *map(str, more)]


def run(command, env, **kwargs) -> subprocess.CompletedProcess:
  return subprocess.run(command, env=env, capture_output=True, text=True, timeout=TIMEOUT_S,
                        **kwargs)


def steps_saved(workdir) -> list[int]:
  return sorted(int(p.name) for p in (pathlib.Path(workdir) / "checkpoints").iterdir()
                if p.name.isdigit())


def messages(stderr: str) -> list[str]:
  """The command's lines, progress bars left out; nothing else (no library's log, no
  traceback) may be there."""
  lines = [line for line in stderr.replace("\r", "\n").splitlines() if line.strip()]
  assert [line for line in lines if not line.startswith(("cifarjax ", "classifier"))] == []
  return [line for line in lines if line.startswith("cifarjax ")]


def trained_leaves(workdir) -> list[np.ndarray]:
  from cifarjax.train_classifier import load_trained
  _, state, _, _ = load_trained(workdir)
  return [np.asarray(leaf) for leaf in jax.tree.leaves(state)]


def sigterm_once(command, env, ready, waiting_for) -> tuple[int, str]:
  """(exit code, stderr) of `command` sent SIGTERM as soon as `ready()` holds."""
  process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
  try:
    deadline = time.monotonic() + TIMEOUT_S
    while not ready() and process.poll() is None:
      assert time.monotonic() < deadline, f"the run never logged {waiting_for}"
      time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=TIMEOUT_S)
  finally:
    if process.poll() is None:
      process.kill()
  return process.returncode, err


def test_sigterm_saves_a_checkpoint_at_the_next_step_and_the_run_resumes_exactly(tmp_path, env):
  workdir = tmp_path / "stopped"
  code, err = sigterm_once(train_command(workdir, 100_000), env,
                           lambda: len(runlog.read_metrics(workdir)) >= 3, "3 steps")
  assert code == 143, err
  (step,) = steps_saved(workdir)  # checkpoint_every is the default 1,000: SIGTERM saved it
  assert step >= 3 and runlog.read_metrics(workdir)[-1]["step"] == step
  assert messages(err)[-2:] == [
      "cifarjax train-classifier: SIGTERM: stopping after this step to save a checkpoint "
      "(SIGTERM again to stop at once, losing the steps since the last checkpoint)",
      f"cifarjax train-classifier: stopped by SIGTERM at step {step} of 100000; checkpoint "
      f"saved. Run the same command to resume."]

  resumed = run(train_command(workdir, step + 2), env)
  assert resumed.returncode == 0, resumed.stderr
  assert f"cifarjax train-classifier: resuming from step {step} of {step + 2}" in resumed.stderr
  straight = run(train_command(tmp_path / "straight", step + 2), env)
  assert straight.returncode == 0, straight.stderr
  for a, b in zip(trained_leaves(workdir), trained_leaves(tmp_path / "straight"), strict=True):
    np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module")
def run_at_step_2(tmp_path_factory, env):
  """A workdir with a checkpoint at step 2 (of runs that go on to step 4)."""
  workdir = tmp_path_factory.mktemp("disk") / "run"
  done = run(train_command(workdir, 2, "--checkpoint-every", 2), env)
  assert done.returncode == 0, done.stderr
  return workdir


def assert_failed_write_reported(result, workdir, reason, kept=None):
  """One line naming the checkpoint and the cause, exit code 1; `kept` (else `workdir`): the
  workdir as the command left it."""
  assert result.returncode == 1, result.stderr
  (error,) = [line for line in messages(result.stderr) if ": error: " in line]
  assert error == (f"cifarjax train-classifier: error: cannot write {workdir}/checkpoints/4: "
                   f"{reason}; the checkpoint of step 2 is intact; make room (or fix the "
                   f"cause), then run the same command to resume")
  kept = kept or workdir
  assert steps_saved(kept) == [2]
  assert any(".orbax-checkpoint-tmp" in p.name for p in (kept / "checkpoints").iterdir())


def test_a_file_the_system_refuses_to_grow_ends_in_one_line_and_the_run_resumes(
    run_at_step_2, tmp_path, env):
  """RLIMIT_FSIZE makes the system refuse writes past a size (EFBIG), as a quota does:
  half of the largest file of a checkpoint refuses the next checkpoint, nothing else."""
  workdir = tmp_path / "run"
  shutil.copytree(run_at_step_2, workdir)
  largest = max(p.stat().st_size for p in (workdir / "checkpoints").rglob("*") if p.is_file())
  limit = largest // 2
  limited = [sys.executable, "-c", "import os, resource, sys; resource.setrlimit("
             f"resource.RLIMIT_FSIZE, ({limit}, {limit})); os.execv(sys.argv[1], sys.argv[1:])"]
  result = run([*limited, *train_command(workdir, 4, "--checkpoint-every", 2)], env)
  assert_failed_write_reported(result, workdir, os.strerror(27))

  resumed = run(train_command(workdir, 4, "--checkpoint-every", 2), env)
  assert resumed.returncode == 0, resumed.stderr
  assert "cifarjax train-classifier: resuming from step 2 of 4" in resumed.stderr
  assert [p.name for p in (workdir / "checkpoints").iterdir()
          if not p.name.isdigit()] == []  # the partial checkpoint is gone
  assert steps_saved(workdir)[-1] == 4


def _can_mount_tmpfs(tmp_path) -> bool:
  try:
    return subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=1m none "
                           f"{tmp_path}"], capture_output=True, timeout=60).returncode == 0
  except (OSError, subprocess.TimeoutExpired):
    return False


def test_a_full_disk_ends_in_one_line_and_keeps_the_last_checkpoint(run_at_step_2, tmp_path, env):
  """The workdir on a tmpfs (in a mount namespace of its own) with room for half a
  checkpoint more than it holds."""
  if shutil.which("unshare") is None or not _can_mount_tmpfs(tmp_path):
    pytest.skip("no tmpfs can be mounted here (unshare -rm: user namespaces)")
  used = sum(p.stat().st_size for p in run_at_step_2.rglob("*") if p.is_file())
  checkpoint_bytes = sum(p.stat().st_size for p in (run_at_step_2 / "checkpoints").rglob("*")
                         if p.is_file())
  size_kib = (used + checkpoint_bytes // 2) // 1024 + 64
  disk, kept = tmp_path / "disk", tmp_path / "kept"
  disk.mkdir()
  command = " ".join(f"'{a}'" for a in train_command(disk / "run", 4, "--checkpoint-every", 2))
  script = (f"mount -t tmpfs -o size={size_kib}k none {disk} && cp -a {run_at_step_2} {disk}/run "
            f"&& {command}; code=$?; cp -a {disk}/run {kept}; exit $code")
  result = run(["unshare", "-rm", "sh", "-c", script], env)
  assert_failed_write_reported(result, disk / "run", os.strerror(28), kept)


EXPERIMENTS = pathlib.Path(__file__).resolve().parents[1] / "experiments"


def test_an_experiment_script_stops_and_refuses_input_in_one_line(tmp_path, env):
  """The scripts under experiments/ report as the command does: SIGTERM saves a checkpoint
  and ends in one line with exit code 143, a wrong path in one line with exit code 2."""
  script = [sys.executable, str(EXPERIMENTS / "generator_fid_by_steps.py"), "--quick",
            "--out", str(tmp_path), "--milestones", "100000", "--train-only"]
  wrong = run([*script, "--fid-weights", str(tmp_path / "missing.npz")], env)
  lines = [line for line in wrong.stderr.splitlines() if line.strip()]
  assert wrong.returncode == 2 and len(lines) == 1, wrong.stderr
  assert lines[0].startswith("generator_fid_by_steps.py: error: ") and "missing.npz" in lines[0]
  assert not (tmp_path / "paper").exists()

  weights = tmp_path / "weights.npz"  # only its existence is checked before training
  weights.write_bytes(b"weights")
  code, err = sigterm_once(
      [*script, "--fid-weights", str(weights)], env,
      lambda: any(r.get("step", 0) >= 2 for r in runlog.read_metrics(tmp_path / "paper")), "step 2")
  assert code == 143, err
  assert "Traceback" not in err
  (step,) = steps_saved(tmp_path / "paper")
  last = err.replace("\r", "\n").strip().splitlines()[-1]
  assert last == (f"generator_fid_by_steps.py: stopped by SIGTERM at step {step} of 100000; "
                  f"checkpoint saved. Run the same command to resume.")
