"""`cifarjax train-classifier` and `cifarjax eval-classifier`."""

import argparse
import json
import warnings

from cifarjax.commands import (config_flags, config_from_args, distributed_flag, flag_names,
                               fresh_start_guard, positive, set_flag)
from cifarjax.config import CLASSIFIER_PRESETS

WEIGHTS_FROM = ("raw", "ema")  # what eval-classifier scores
DATA_HELP = ("cifar100, cifar10, synthetic, a cifar-100-python folder or .tar.gz, or an image "
             "folder or .zip laid out <split>/<class>/<image> (32x32)")
FUSED_HELP = ("train steps fused into one jitted call (must divide the log, eval and checkpoint "
            "intervals; e.g. --steps-per-call 50 on a GPU)")
# The config fields train-classifier sets by a flag of their name, and what each does.
TRAIN_FLAGS = {
    "data": DATA_HELP,
    "holdout": "held-out train examples where the source has no test split",
    "steps": "training steps",
    "batch_size": "",
    "eval_every": "steps between evaluations on the test split and a train subset",
    "checkpoint_every": "",
    "log_every": "",
    "steps_per_call": FUSED_HELP,
    "seed": "",
}


class RenamedFlag(argparse.Action):
  """A flag kept under its old name: it sets the new one's value, with a notice naming it."""

  def __init__(self, option_strings, dest, new_name: str, **kwargs):
    super().__init__(option_strings, dest, **kwargs)
    self.new_name = new_name

  def __call__(self, parser, namespace, values, option_string=None):
    from cifarjax.errors import Notice
    warnings.warn(f"{option_string} is now {self.new_name}", Notice, stacklevel=2)
    setattr(namespace, self.dest, values)


def register(subparsers):
  p = subparsers.add_parser("train-classifier", help="train (or resume) the paper's classifier",
                            description="Train the paper's classifier, or resume the run in "
                            "--workdir (run the same command again to resume).")
  p.add_argument("--preset", default="paper",
                 help="paper, a section 1.1 ablation (strong-wd, dropout, aug-noise, "
                 "aug-jitter), or improved (beyond the paper: crop, label smoothing, cosine "
                 "schedule, weight average, mirror averaging)")
  config_flags(p, CLASSIFIER_PRESETS, TRAIN_FLAGS)
  p.add_argument("--workdir", default="runs/classifier",
                 help="where the run keeps its config, metrics, plots and checkpoints")
  set_flag(p, "--set learning_rate=0.001 --set augment.crop_prob=0.5")
  distributed_flag(p)
  p.set_defaults(func=train)

  p = subparsers.add_parser("eval-classifier", help="accuracy of a trained classifier")
  p.add_argument("--workdir", required=True)
  p.add_argument("--data", help="default: the data it was trained on")
  p.add_argument("--split", default="test", help="train, or test (a held-out slice of train "
                 "where the source has no test split)")
  p.add_argument("--batch-size", type=int, default=1000, help="images per compiled batch")
  p.add_argument("--weights-from", choices=WEIGHTS_FROM, help="the trained weights or their "
                 "moving average (default: what the run evaluates: ema where it kept one)")
  p.add_argument("--weights", dest="weights_from", choices=WEIGHTS_FROM, action=RenamedFlag,
                 new_name="--weights-from", help=argparse.SUPPRESS)
  p.add_argument("--flip", choices=("on", "off"), help="average each image's and its mirror "
                 "image's predictions (default: as the run's config, eval_flip)")
  p.add_argument("--json", action="store_true", help="print one JSON line")
  p.set_defaults(func=evaluate)


def train(args):
  from cifarjax import mesh as mesh_lib
  from cifarjax.train_classifier import train as train_classifier
  mesh_lib.initialize_distributed(args.distributed)
  with flag_names(TRAIN_FLAGS):
    config = config_from_args(CLASSIFIER_PRESETS, args)
    with fresh_start_guard(args.workdir):
      summary = train_classifier(config, args.workdir)
  print(json.dumps(summary, indent=2))


def evaluate(args):
  from cifarjax import mesh as mesh_lib
  from cifarjax.train_classifier import evaluate_workdir
  positive("--batch-size", args.batch_size)
  mesh_lib.initialize_distributed()
  flip = None if args.flip is None else args.flip == "on"
  result = evaluate_workdir(args.workdir, args.data, args.split, args.batch_size,
                            weights=args.weights_from, flip=flip)
  if args.json:
    print(json.dumps(result))
  else:
    print(f"{result['data']}:{result['split']} at step {result['step']}: "
          f"top-1 {result['accuracy']:.4f}"
          + (f", top-5 {result['top5']:.4f}" if result["top5"] is not None else "") + " "
          f"({result['num_examples']} images, {result['weights']} weights"
          + (", mirror-averaged" if result["flip"] else "") + ")")
