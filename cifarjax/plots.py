"""Figures drawn from a run's metrics.jsonl (matplotlib, no display needed)."""

import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from cifarjax import runlog  # noqa: E402
from cifarjax.errors import writing  # noqa: E402


def _series(records, key):
  points = [(r["step"], r[key]) for r in records if key in r]
  return [p[0] for p in points], [p[1] for p in points]


def _plot(ax, xs, ys, **kwargs):
  """A line with a marker on each point, so that a series of one point shows too (a line
  alone draws nothing there); markers shrink as points multiply."""
  size = 4 if len(xs) <= 50 else 2 if len(xs) <= 500 else 0
  ax.plot(xs, ys, marker="o" if size else None, markersize=size, **kwargs)


def training_graph(workdir, out=None) -> pathlib.Path:
  """The paper's Fig. 4: train/test accuracy and loss against steps."""
  workdir = pathlib.Path(workdir)
  records = runlog.read_metrics(workdir)
  fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
  for key, label in (("loss", "train batch loss"), ("train_loss", "train loss"),
                     ("test_loss", "test loss")):
    _plot(ax_loss, *_series(records, key), label=label)
  for key, label in (("accuracy", "train batch accuracy"), ("train_accuracy", "train accuracy"),
                     ("test_accuracy", "test accuracy")):
    _plot(ax_acc, *_series(records, key), label=label)
  for ax, title in ((ax_loss, "loss"), (ax_acc, "accuracy")):
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  out = pathlib.Path(out or workdir / "training_graph.png")
  with writing(out):
    fig.savefig(out, dpi=120)
  plt.close(fig)
  return out


def loss_curve(workdir, out=None) -> pathlib.Path:
  """Training loss against steps (the generator's)."""
  workdir = pathlib.Path(workdir)
  fig, ax = plt.subplots(figsize=(6, 4))
  _plot(ax, *_series(runlog.read_metrics(workdir), "loss"))
  ax.set_xlabel("step")
  ax.set_ylabel("loss")
  ax.set_yscale("log")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  out = pathlib.Path(out or workdir / "loss_curve.png")
  with writing(out):
    fig.savefig(out, dpi=120)
  plt.close(fig)
  return out
