"""Beyond the paper: each change of the `improved` classifier preset alone, then all together,
against the `paper` preset at equal steps; held-out top-1 per seed, mean, and change.

  python experiments/classifier_improved.py --data ../shared/data/cifar10-jpeg-train.zip \
      --out runs/improved --steps 1000 --seeds 0 1 [--only paper improved]

Every run lives in OUT/<variant>-seed<s> and resumes there, so the two seeds can train in two
processes at once (`--seeds 0` and `--seeds 1`) and a last call with all seeds only
evaluates. The moving average and the mirror averaging change only evaluation: their rows
evaluate the paper run's own weights (which keeps a moving average it does not use for
training) instead of training again.
"""

import dataclasses
import pathlib

import numpy as np

import common
from cifarjax.config import CLASSIFIER_PRESETS
from cifarjax.train_classifier import evaluate_workdir, train

PAPER = CLASSIFIER_PRESETS["paper"]
IMPROVED = CLASSIFIER_PRESETS["improved"]

# name: (what changes, the config's changes to `paper`). The paper run keeps a weight average
# (ema_decay) for the rows that score it, which does not change its training.
RUNS = {
    "paper": ("the paper's recipe", {"ema_decay": IMPROVED.ema_decay}),
    "improved": ("all of crop, label smoothing, cosine, AdamW, moving average, mirror averaging "
                 "(the `improved` preset)", {}),
    "crop": ("random crop, zero-padded by 4 (every image) + flip",
             {"augment": IMPROVED.augment}),
    "label-smoothing": (f"label smoothing {IMPROVED.label_smoothing}",
                        {"label_smoothing": IMPROVED.label_smoothing}),
    "cosine": (f"{IMPROVED.warmup_steps}-step warm-up, cosine decay to 0",
               {"lr_schedule": "cosine", "warmup_steps": IMPROVED.warmup_steps}),
    "adamw": ("AdamW, decoupled weight decay 0.05 (instead of L2 5e-5)",
              {"optimizer": IMPROVED.optimizer, "weight_decay": IMPROVED.weight_decay}),
}
# Table rows: (row, run, weights evaluated, mirror averaging, what it shows).
ROWS = [
    ("paper", "paper", "raw", False, None),
    ("+ moving average of the weights", "paper", "ema", False,
     "the paper run's weights averaged (decay {ema})"),
    ("+ mirror averaging at test time", "paper", "raw", True,
     "the paper run, each test image's and its mirror image's probabilities averaged"),
    ("+ crop", "crop", "raw", False, None),
    ("+ label smoothing", "label-smoothing", "raw", False, None),
    ("+ cosine schedule", "cosine", "raw", False, None),
    ("+ AdamW", "adamw", "raw", False, None),
    ("improved, raw weights, no mirror", "improved", "raw", False,
     "the improved run's trained weights alone"),
    ("**improved**", "improved", "ema", True, None),
]


def run_config(name, steps, seed, data, quick):
  base = IMPROVED if name == "improved" else dataclasses.replace(PAPER, **RUNS[name][1])
  config = dataclasses.replace(base, steps=steps, seed=seed)
  return common.quick_config(config, quick, data, {**common.QUICK_CLASSIFIER,
                                                   "warmup_steps": min(config.warmup_steps, 1)})


def train_runs(out, names, steps, seeds, data, quick=False):
  runs = {}
  for name in names:
    for seed in seeds:
      config = run_config(name, steps, seed, data, quick)
      workdir = pathlib.Path(out) / f"{name}-seed{seed}"
      summary, wall = common.timed(train, config, workdir,
                                   model=common.quick_classifier(config, quick))
      runs[name, seed] = common.Run(f"{name} seed {seed}", workdir, config, wall, summary)
  return runs


def held_out_accuracy(run, weights, flip, quick):
  model = common.quick_classifier(run.config, quick)
  return evaluate_workdir(run.workdir, weights=weights, flip=flip, model=model)["accuracy"]


def run(out, quick=False, data=None, steps=1000, seeds=(0, 1), only=None) -> common.Section:
  names = [n for n in RUNS if not only or n in only]
  runs = train_runs(out, names, steps, seeds, data, quick)
  steps = next(iter(runs.values())).config.steps  # --quick's, where quick
  ema = f"ramped to {min(IMPROVED.ema_decay, (1 + steps) / (10 + steps)):.3f} by step {steps:,}"
  rows, baseline = [], None
  for row, name, weights, flip, how in ROWS:
    if name not in names:
      continue
    accs = [held_out_accuracy(runs[name, s], weights, flip, quick) for s in seeds]
    mean = float(np.mean(accs))
    baseline = mean if row == "paper" else baseline
    change = "" if baseline is None or row == "paper" else f"{100 * (mean - baseline):+.2f}"
    rows.append((row, (how or RUNS[name][0]).format(ema=ema), *(f"{100 * a:.2f}%" for a in accs),
                 f"{100 * mean:.2f}%", change))
  headers = ("variant", "what changes", *(f"seed {s}" for s in seeds), "mean", "vs paper (points)")
  return common.Section(
      f"Classifier beyond the paper: {steps:,} steps of batch {PAPER.batch_size}",
      common.table(headers, rows), runs=list(runs.values()),
      notes=f"held-out top-1 at the last step, {len(seeds)} seed(s)")


def main():
  p = common.parser(__doc__)
  p.add_argument("--steps", type=int, default=1000)
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
  p.add_argument("--only", nargs="+", choices=list(RUNS), help="train and report these runs only")
  args = p.parse_args()
  common.print_section(run(args.out, args.quick, args.data, args.steps, tuple(args.seeds),
                           args.only))


if __name__ == "__main__":
  common.run_script(main)
