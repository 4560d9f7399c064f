"""Section 1.1: the baseline and its four regularisation ablations; the maximum test and
train accuracy of each run beside the paper's.

  python experiments/regularisation.py --out runs/regularisation [--quick]
"""

import common
from classifier_baseline import train_seeds
from cifarjax import runlog

# Maximum (test, train) accuracy, in %, from section 1.1 (the baseline from section 3).
PAPER = {
    "paper": (58.14, 79.34),
    "strong-wd": (43.26, 52.94),
    "dropout": (49.55, 67.27),
    "aug-noise": (55.40, 62.04),
    "aug-jitter": (52.74, 58.38),
}
WHAT = {
    "paper": "baseline (weight decay 5e-5, horizontal flip)",
    "strong-wd": "weight decay 1.5e-4",
    "dropout": "dropout 0.4 before the last 2 expansion blocks",
    "aug-noise": "flips, Gaussian noise (var 0.015, p 0.7), crop (p 0.7)",
    "aug-jitter": "flips, crop, spatial and colour jitter",
}


def max_accuracies(workdir):
  evals = [r for r in runlog.read_metrics(workdir) if "test_accuracy" in r]
  return max(r["test_accuracy"] for r in evals), max(r["train_accuracy"] for r in evals)


def run(out, quick=False, data=None, seed=0, baseline_runs=None) -> common.Section:
  """baseline_runs: reuse the baseline's runs (a Run of seed `seed`) instead of training it."""
  rows, runs = [], []
  for preset, (paper_test, paper_train) in PAPER.items():
    reuse = [r for r in baseline_runs or () if r.config.seed == seed]
    if preset == "paper" and reuse:
      run_ = reuse[0]
    else:
      run_ = train_seeds(out, (seed,), quick, data, preset=preset, name=preset)[0]
      runs.append(run_)
    test, train = max_accuracies(run_.workdir)
    rows.append((preset, WHAT[preset], f"{paper_test:.2f}%", f"{100 * test:.2f}%",
                 f"{paper_train:.2f}%", f"{100 * train:.2f}%"))
  headers = ("preset", "change", "paper max test", "our max test", "paper max train",
             "our max train")
  return common.Section("Regularisation ablations (section 1.1)", common.table(headers, rows),
                        runs=runs, notes=f"one run each, seed {seed}")


def main():
  args = common.parser(__doc__).parse_args()
  common.print_section(run(args.out, args.quick, args.data))


if __name__ == "__main__":
  common.run_script(main)
