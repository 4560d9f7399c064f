"""What a run leaves in its workdir besides checkpoints: config, metrics, summary, plots."""

import json
import pathlib

import jax


def write_json(path, obj):
  """Writes atomically, so an interrupted run never leaves half a file."""
  path = pathlib.Path(path)
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_text(json.dumps(obj, indent=2) + "\n")
  tmp.replace(path)


def read_json(path):
  return json.loads(pathlib.Path(path).read_text())


def read_metrics(workdir) -> list[dict]:
  path = pathlib.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsLog:
  """Appends one JSON line per record to `metrics.jsonl`, in process 0 only.

  On resume from step s, records after s (written by the interrupted run past
  its last checkpoint) are dropped, since the resumed run writes them again.
  """

  def __init__(self, workdir, resume_step: int = 0):
    self.path = pathlib.Path(workdir) / "metrics.jsonl"
    self.active = jax.process_index() == 0
    if self.active and self.path.exists():
      kept = [r for r in read_metrics(workdir) if r["step"] <= resume_step]
      self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

  def write(self, record: dict):
    if self.active:
      with self.path.open("a") as f:
        f.write(json.dumps(record) + "\n")
