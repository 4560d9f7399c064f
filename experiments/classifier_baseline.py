"""Section 2: the paper's classifier trained with k seeds; mean and std of the best test
accuracy, of the train accuracy there, and the train/test gap (paper: 58.2% +- 2.7%
test, 81.5% +- 2.1% train, gap 21.9%).

  python experiments/classifier_baseline.py --out runs/baseline [--seeds 3] [--quick]
"""

import dataclasses
import pathlib

import numpy as np

import common
from cifarjax import runlog
from cifarjax.config import CLASSIFIER_PRESETS
from cifarjax.train_classifier import train

PAPER = {"test": 0.582, "test_std": 0.027, "train": 0.815, "train_std": 0.021, "gap": 0.219}


def best_eval(workdir) -> dict:
  """The evaluation with the highest test accuracy (the paper's "maximal test accuracy")."""
  evals = [r for r in runlog.read_metrics(workdir) if "test_accuracy" in r]
  return max(evals, key=lambda r: r["test_accuracy"])


def train_seeds(out, seeds, quick=False, data=None, preset="paper", name="baseline"):
  """One run per seed in out/<name>-seed<s>; returns the Runs."""
  base = common.quick_config(CLASSIFIER_PRESETS[preset], quick, data, common.QUICK_CLASSIFIER)
  runs = []
  for seed in seeds:
    config = dataclasses.replace(base, seed=seed)
    workdir = pathlib.Path(out) / f"{name}-seed{seed}"
    summary, wall = common.timed(train, config, workdir, model=common.quick_classifier(config, quick))
    runs.append(common.Run(f"{name} seed {seed}", workdir, config, wall, summary))
  return runs


def mean_std(values) -> str:
  values = np.asarray(values, np.float64)
  std = values.std(ddof=1) if len(values) > 1 else float("nan")
  return f"{100 * values.mean():.2f}% +- {100 * std:.2f}%"


def run(out, quick=False, data=None, seeds=(0, 1, 2)) -> common.Section:
  runs = train_seeds(out, seeds, quick, data)
  best = [best_eval(r.workdir) for r in runs]
  test = [b["test_accuracy"] for b in best]
  train_acc = [b["train_accuracy"] for b in best]
  gap = [tr - te for tr, te in zip(train_acc, test)]
  rows = [
      ("best test accuracy", f"{100 * PAPER['test']:.1f}% +- {100 * PAPER['test_std']:.1f}%",
       mean_std(test)),
      ("train accuracy at that step", f"{100 * PAPER['train']:.1f}% +- {100 * PAPER['train_std']:.1f}%",
       mean_std(train_acc)),
      ("train - test gap", f"{100 * PAPER['gap']:.1f}%", mean_std(gap)),
      ("step of the best test accuracy", "10,000", ", ".join(str(b["step"]) for b in best)),
      ("parameters", "99,703", f"{runs[0].summary['num_params']:,}"),
  ]
  return common.Section(
      f"Classifier baseline ({len(seeds)} seeds)",
      common.table(("", "paper", "ours"), rows), runs=runs,
      notes="mean +- sample std over seeds " + ", ".join(map(str, seeds)))


def main():
  p = common.parser(__doc__)
  p.add_argument("--seeds", type=int, default=3)
  args = p.parse_args()
  common.print_section(run(args.out, args.quick, args.data, tuple(range(args.seeds))))


if __name__ == "__main__":
  common.run_script(main)
