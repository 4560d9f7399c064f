"""Figures drawn from a run's metrics.jsonl (matplotlib, no display needed)."""

import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402

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


# The generator's logged losses: each training step's batch, and at each evaluation the
# raw and the averaged weights' on a fixed batch (train_diffusion.make_evaluate).
GENERATOR_LOSSES = (("loss", "train batch loss"), ("eval_loss", "evaluation loss (raw weights)"),
                    ("ema_loss", "evaluation loss (averaged weights)"))


def _plain_numbers(ax, values):
  """y ticks as plain numbers (0.05, 0.1, 0.2, ...; never 1.24x10^0 or an offset): a log
  axis where the values span a decade or more, else a linear one."""
  values = [v for v in values if v > 0]
  if values and max(values) >= 10 * min(values):
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())
  else:
    ax.ticklabel_format(axis="y", style="plain", useOffset=False)


def generator_figure(records):
  """The generator's losses against steps (GENERATOR_LOSSES), from metrics.jsonl records."""
  fig, ax = plt.subplots(figsize=(7, 4))
  shown = []
  for key, label in GENERATOR_LOSSES:
    steps, values = _series(records, key)
    if steps:
      _plot(ax, steps, values, label=label)
      shown += values
  _plain_numbers(ax, shown)
  ax.set_xlabel("step")
  ax.set_ylabel("loss")
  ax.set_title("generator")
  ax.grid(alpha=0.3)
  if shown:
    ax.legend()
  fig.tight_layout()
  return fig


def generator_graph(workdir, out=None) -> pathlib.Path:
  """`generator_figure` of a workdir's metrics, as training_graph.png in it."""
  workdir = pathlib.Path(workdir)
  fig = generator_figure(runlog.read_metrics(workdir))
  out = pathlib.Path(out or workdir / "training_graph.png")
  with writing(out):
    fig.savefig(out, dpi=120)
  plt.close(fig)
  return out
