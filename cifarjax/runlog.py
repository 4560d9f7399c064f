"""What a run leaves in its workdir besides checkpoints: config, metrics, summary, plots."""

import json
import pathlib

import jax

from cifarjax.errors import writing


def write_text(path, text: str):
  """Writes atomically, so that an interrupted run or a full disk never leaves half a file
  (nor spoils the one there): `errors.WriteError` where the text cannot be written."""
  path = pathlib.Path(path)
  tmp = path.with_suffix(path.suffix + ".tmp")
  try:
    with writing(path):
      tmp.write_text(text)
      tmp.replace(path)
  finally:
    tmp.unlink(missing_ok=True)


def write_json(path, obj):
  write_text(path, json.dumps(obj, indent=2) + "\n")


def read_json(path):
  return json.loads(pathlib.Path(path).read_text())


def read_metrics(workdir) -> list[dict]:
  """The records of metrics.jsonl; a last line cut short (a process killed, or a disk
  filled, while appending it) is left out."""
  path = pathlib.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  lines = [line for line in path.read_text().splitlines() if line.strip()]
  records = [json.loads(line) for line in lines[:-1]]
  try:
    return records + [json.loads(line) for line in lines[-1:]]
  except json.JSONDecodeError:
    return records


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
      write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

  def write(self, record: dict):
    if self.active:
      with writing(self.path), self.path.open("a") as f:
        f.write(json.dumps(record) + "\n")
