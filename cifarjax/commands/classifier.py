"""`cifarjax train-classifier` and `cifarjax eval-classifier`."""

import json

from cifarjax.commands import (config_from_args, distributed_flag, fresh_start_guard,
                               positive, set_flag)

DATA_HELP = ("cifar100, cifar10, synthetic, a cifar-100-python folder or .tar.gz, or an image "
             "folder or .zip laid out <split>/<class>/<image> (32x32)")
# The paper preset's values, shown by --help (tests/test_cli.py checks them against config.py).
PAPER = {"data": "cifar100", "holdout": 5000, "steps": 10_000, "batch_size": 256,
         "eval_every": 500, "checkpoint_every": 1000, "log_every": 50, "seed": 0}


def register(subparsers):
  p = subparsers.add_parser("train-classifier", help="train (or resume) the paper's classifier",
                            description="Train the paper's classifier, or resume the run in "
                            "--workdir (run the same command again to resume).")
  p.add_argument("--preset", default="paper",
                 help="paper, a section 1.1 ablation (strong-wd, dropout, aug-noise, "
                 "aug-jitter), or improved (beyond the paper: crop, label smoothing, cosine "
                 "schedule, weight average, mirror averaging)")
  p.add_argument("--data", help=f"{DATA_HELP} (default: {PAPER['data']})")
  p.add_argument("--holdout", type=int, help="held-out train examples where the source has no "
                 f"test split (default: {PAPER['holdout']})")
  p.add_argument("--steps", type=int, help=f"training steps (default: {PAPER['steps']})")
  p.add_argument("--batch-size", type=int, help=f"default: {PAPER['batch_size']}")
  p.add_argument("--eval-every", type=int, help=f"steps between evaluations on the test split "
                 f"and a train subset (default: {PAPER['eval_every']})")
  p.add_argument("--checkpoint-every", type=int,
                 help=f"default: {PAPER['checkpoint_every']}")
  p.add_argument("--log-every", type=int, help=f"default: {PAPER['log_every']}")
  p.add_argument("--steps-per-call", type=int, help="train steps fused into one jitted call "
                 "(must divide the log, eval and checkpoint intervals; e.g. --steps-per-call 50 "
                 "on a GPU; default: 1)")
  p.add_argument("--workdir", default="runs/classifier",
                 help="where the run keeps its config, metrics, plots and checkpoints")
  p.add_argument("--seed", type=int, help=f"default: {PAPER['seed']}")
  set_flag(p, "--set learning_rate=0.001 --set augment.crop_prob=0.5")
  distributed_flag(p)
  p.set_defaults(func=train)

  p = subparsers.add_parser("eval-classifier", help="accuracy of a trained classifier")
  p.add_argument("--workdir", required=True)
  p.add_argument("--data", help="default: the data it was trained on")
  p.add_argument("--split", default="test", help="train, or test (a held-out slice of train "
                 "where the source has no test split)")
  p.add_argument("--batch-size", type=int, default=1000, help="images per compiled batch")
  p.add_argument("--weights", choices=("raw", "ema"), help="the trained weights or their moving "
                 "average (default: what the run evaluates: ema where it kept one)")
  p.add_argument("--flip", choices=("on", "off"), help="average each image's and its mirror "
                 "image's predictions (default: as the run's config, eval_flip)")
  p.add_argument("--json", action="store_true", help="print one JSON line")
  p.set_defaults(func=evaluate)


def train(args):
  from cifarjax import mesh as mesh_lib
  from cifarjax.config import CLASSIFIER_PRESETS
  from cifarjax.train_classifier import train as train_classifier
  mesh_lib.initialize_distributed(args.distributed)
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
                            weights=args.weights, flip=flip)
  if args.json:
    print(json.dumps(result))
  else:
    print(f"{result['data']}:{result['split']} at step {result['step']}: "
          f"top-1 {result['accuracy']:.4f}"
          + (f", top-5 {result['top5']:.4f}" if result["top5"] is not None else "") + " "
          f"({result['num_examples']} images, {result['weights']} weights"
          + (", mirror-averaged" if result["flip"] else "") + ")")
