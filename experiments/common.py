"""What the experiment scripts share: quick-mode settings, timing, the machine, markdown.

Each experiment script has `run(out, quick=False, data=None, ...) -> Section`, and a
`main()` that runs it alone and prints its section. `reproduce.py` runs them all.
--quick swaps the paper's budgets for a few steps of small models on synthetic (or
the given) data: it checks the pipeline end to end, and its numbers mean nothing.
"""

import argparse
import dataclasses
import pathlib
import sys
import time

import jax

from cifarjax import config as config_lib

# --quick: a few steps, small batches and evaluations (every run's eval/log settings).
QUICK_CLASSIFIER = dict(steps=4, batch_size=16, log_every=2, eval_every=2, eval_batch_size=64,
                        train_eval_size=64, checkpoint_every=4)
QUICK_DIFFUSION = dict(steps=4, batch_size=16, log_every=2, eval_every=4, eval_batch_size=16,
                       checkpoint_every=4, unet="tiny")
QUICK_DATA = "synthetic"
NO_FID = "skipped: no FID weights"


@dataclasses.dataclass
class Run:
  """One training run: what the report lists under "runs"."""
  name: str
  workdir: pathlib.Path
  config: object
  wall_s: float
  summary: dict


@dataclasses.dataclass
class Section:
  """An experiment's part of the report."""
  title: str
  table: str  # markdown
  figures: list = dataclasses.field(default_factory=list)  # paths
  runs: list = dataclasses.field(default_factory=list)  # Run
  notes: str = ""


def machine() -> str:
  d = jax.devices()
  return f"{len(d)} x {d[0].device_kind} ({d[0].platform}), {jax.process_count()} process(es)"


def timed(fn, *args, **kwargs):
  t0 = time.perf_counter()
  result = fn(*args, **kwargs)
  return result, time.perf_counter() - t0


def quick_config(config, quick: bool, data, overrides: dict):
  """`config` with the --quick budget (when quick) and the data source (when given)."""
  changes = dict(overrides) if quick else {}
  if data or quick:
    changes["data"] = data or QUICK_DATA
  return dataclasses.replace(config, **changes)


def quick_classifier(config, quick: bool):
  """The network a classifier run trains: the paper's, or with --quick a small one that
  compiles in seconds (same blocks, BatchNorm and dropout placement)."""
  if not quick:
    return None
  from cifarjax.data import load_split
  from cifarjax.models import Classifier
  num_classes = load_split(config.data, "train", holdout=config.holdout).num_classes
  return Classifier(num_classes=num_classes, stem_channels=8, bottleneck_ratio=2,
                    layout=("expand", "residual", "pool", "expand"), dropout_rate=config.dropout)


def pct(x) -> str:
  return "n/a" if x is None else f"{100 * x:.2f}%"


def table(headers, rows) -> str:
  lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def config_dict(config) -> dict:
  return config_lib.to_dict(config)


def run_script(main):
  """Runs an experiment script's `main()` as the `cifarjax` command runs a command, and exits
  with its code: restarted first with the command's malloc settings where JAX runs on the CPU
  (`cli.reexec_with_huge_pages`, docs/benchmarks.md; the script's imports run again in the
  new process), cifarjax's phase messages (loading, compiling, resuming, ...) on stderr
  prefixed with the script's name, and Ctrl-C, SIGTERM, a failed write or a mistake in the
  input in one line (`cli.run_reporting`)."""
  from cifarjax import cli
  cli.reexec_with_huge_pages(sys.orig_argv[1:])
  cli.keep_call_buffers()
  sys.exit(cli.run_reporting(pathlib.Path(sys.argv[0]).name, main, resumable=True))


def parser(description) -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=description)
  p.add_argument("--quick", action="store_true", help="tiny budgets (a smoke run; numbers mean nothing)")
  p.add_argument("--data", help="data source (default: the paper's CIFAR-100; --quick: synthetic)")
  p.add_argument("--out", required=True, help="folder for the runs and figures")
  return p


def print_section(section: Section):
  print(f"## {section.title}\n\n{section.table}\n")
  for f in section.figures:
    print(f"figure: {f}")


# FID of a generator run: the paper's sampler (DDPM, all T steps) on 10,000 samples; --quick
# draws 16 samples with 4 DDIM steps.
FID_FULL = dict(num=10_000, sampler="ddpm", steps=None)
FID_QUICK = dict(num=16, sampler="ddim", steps=4)


def fid_of_run(workdir, weights, quick: bool):
  """(FID or None, a note): FID of the run's samples against its training data."""
  if weights is None:
    return None, NO_FID
  from cifarjax import generate
  result = generate.evaluate_fid(workdir, weights=weights, progress=False,
                                 **(FID_QUICK if quick else FID_FULL))
  return result["fid"], f"{result['fid_num']} samples, {result['fid_sampler']} {result['fid_steps']} steps"


def fid_text(value, note) -> str:
  return note if value is None else f"{value:.2f} ({note})"


def train_diffusion_run(out, name, config, quick, data):
  from cifarjax.train_diffusion import train
  config = quick_config(config, quick, data, QUICK_DIFFUSION)
  workdir = pathlib.Path(out) / name
  summary, wall = timed(train, config, workdir)
  return Run(name, workdir, config, wall, summary)
