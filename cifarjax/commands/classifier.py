"""`cifarjax train-classifier` and `cifarjax eval-classifier`."""

import dataclasses
import json


def register(subparsers):
  p = subparsers.add_parser("train-classifier", help="train (or resume) the paper's classifier")
  p.add_argument("--preset", default="paper",
                 help="paper (default) or a section 1.1 ablation: strong-wd, dropout, aug-noise, aug-jitter")
  p.add_argument("--data", help="cifar100 (default), cifar10, synthetic, or a path")
  p.add_argument("--holdout", type=int, help="held-out train examples where the source has no test split")
  p.add_argument("--steps", type=int)
  p.add_argument("--batch-size", type=int)
  p.add_argument("--eval-every", type=int)
  p.add_argument("--checkpoint-every", type=int)
  p.add_argument("--log-every", type=int)
  p.add_argument("--workdir", default="runs/classifier")
  p.add_argument("--seed", type=int)
  p.set_defaults(func=train)

  p = subparsers.add_parser("eval-classifier", help="accuracy of a trained classifier")
  p.add_argument("--workdir", required=True)
  p.add_argument("--data", help="default: the data it was trained on")
  p.add_argument("--split", default="test")
  p.add_argument("--batch-size", type=int, default=1000)
  p.add_argument("--json", action="store_true", help="print one JSON line")
  p.set_defaults(func=evaluate)


def train(args):
  from cifarjax import mesh as mesh_lib
  from cifarjax.config import CLASSIFIER_PRESETS, preset
  from cifarjax.train_classifier import train as train_classifier
  mesh_lib.initialize_distributed()
  config = preset(CLASSIFIER_PRESETS, args.preset)
  overrides = {k: getattr(args, k) for k in ("data", "holdout", "steps", "batch_size", "eval_every",
                                             "checkpoint_every", "log_every", "seed")
               if getattr(args, k) is not None}
  config = dataclasses.replace(config, **overrides)
  summary = train_classifier(config, args.workdir)
  print(json.dumps(summary, indent=2))


def evaluate(args):
  from cifarjax import mesh as mesh_lib
  from cifarjax.train_classifier import evaluate_workdir
  mesh_lib.initialize_distributed()
  result = evaluate_workdir(args.workdir, args.data, args.split, args.batch_size)
  if args.json:
    print(json.dumps(result))
  else:
    print(f"{result['data']}:{result['split']} at step {result['step']}: "
          f"top-1 {result['accuracy']:.4f}, top-5 {result['top5']:.4f} "
          f"({result['num_examples']} images)")
