"""`cifarjax train-diffusion`, `sample`, `interpolate` and `eval-diffusion`."""

import dataclasses
import json


def register(subparsers):
  p = subparsers.add_parser("train-diffusion", help="train (or resume) the paper's generator")
  p.add_argument("--preset", default="paper",
                 help="paper (default) or linear-schedule (section 4's comparison, batch 128)")
  p.add_argument("--data", help="cifar100 (default), cifar10, synthetic, or a path")
  p.add_argument("--holdout", type=int, help="held-out train examples where the source has no test split")
  p.add_argument("--steps", type=int)
  p.add_argument("--batch-size", type=int)
  p.add_argument("--label-dropout", type=float,
                 help="train the null label for classifier-free guidance (beyond the paper; default 0)")
  p.add_argument("--unet", help="U-Net size: paper (default) or tiny")
  p.add_argument("--eval-every", type=int)
  p.add_argument("--checkpoint-every", type=int)
  p.add_argument("--log-every", type=int)
  p.add_argument("--workdir", default="runs/diffusion")
  p.add_argument("--seed", type=int)
  p.set_defaults(func=train)

  p = subparsers.add_parser("sample", help="sample images from a trained generator")
  p.add_argument("--workdir", required=True)
  p.add_argument("--num", type=int, required=True, help="number of images")
  p.add_argument("--labels", help="comma-separated class indices, cycled to --num "
                 "(default: every class in turn)")
  _sampler_args(p)
  p.add_argument("--guidance", type=float, default=0.0,
                 help="classifier-free guidance weight (needs a model trained with --label-dropout)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", required=True, metavar="FILE.npz",
                 help="writes 'images' (uint8 N x 32 x 32 x 3) and 'labels', and FILE.png beside it")
  p.set_defaults(func=sample)

  p = subparsers.add_parser("interpolate",
                            help="interpolate between two dataset images through DDIM latents")
  p.add_argument("--workdir", required=True)
  p.add_argument("--data", required=True, help="the source of the two images")
  p.add_argument("--split", default="train")
  p.add_argument("--a", type=int, required=True, help="index of the first image in the split")
  p.add_argument("--b", type=int, required=True, help="index of the second image")
  p.add_argument("--frames", type=int, default=8)
  p.add_argument("--steps", type=int, default=50, help="DDIM steps of inversion and decoding")
  p.add_argument("--out", required=True, metavar="FILE.png")
  p.set_defaults(func=interpolate)

  p = subparsers.add_parser("eval-diffusion", help="FID of a trained generator's samples")
  p.add_argument("--workdir", required=True)
  p.add_argument("--num", type=int, required=True, help="number of samples (the paper: 10,000)")
  p.add_argument("--weights", help="FID Inception weights (as `cifarjax fid --weights`)")
  p.add_argument("--reference", help="FID reference source (default: the training data's train "
                 "split, its statistics cached)")
  _sampler_args(p)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json", action="store_true", help="print one JSON line")
  p.set_defaults(func=evaluate)


def _sampler_args(p):
  p.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddpm",
                 help="ddpm: the paper's ancestral sampler, all T steps (default); "
                      "ddim: deterministic, --steps of them (e.g. 50: ~20x faster)")
  p.add_argument("--steps", type=int, help="sampler steps (ddim default: 50)")
  p.add_argument("--batch-size", type=int, default=256, help="images per compiled batch")


def _steps(args):
  return 50 if args.sampler == "ddim" and args.steps is None else args.steps


def _load_config(workdir):
  from cifarjax.config import DiffusionConfig, load_run_config
  return load_run_config(workdir, DiffusionConfig, "diffusion (generator) run", "train-diffusion")


def _parse_labels(text: str) -> list[int]:
  try:
    return [int(v) for v in text.split(",") if v.strip()]
  except ValueError:
    raise ValueError(f"--labels must be comma-separated integers, got {text!r}") from None


def train(args):
  from cifarjax import mesh as mesh_lib
  from cifarjax.config import DIFFUSION_PRESETS, preset
  from cifarjax.train_diffusion import train as train_diffusion
  mesh_lib.initialize_distributed()
  config = preset(DIFFUSION_PRESETS, args.preset)
  overrides = {k: getattr(args, k) for k in ("data", "holdout", "steps", "batch_size",
                                             "label_dropout", "unet", "eval_every",
                                             "checkpoint_every", "log_every", "seed")
               if getattr(args, k) is not None}
  config = dataclasses.replace(config, **overrides)
  summary = train_diffusion(config, args.workdir)
  print(json.dumps(summary, indent=2))


def sample(args):
  import pathlib
  import numpy as np
  from cifarjax import generate, image_grid, mesh as mesh_lib, runlog
  mesh_lib.initialize_distributed()
  out = pathlib.Path(args.out)
  if out.suffix != ".npz":
    raise ValueError(f"--out must end in .npz, got {out}")
  if args.num < 1:
    raise ValueError(f"--num must be positive, got {args.num}")
  if args.labels:
    labels = np.resize(np.asarray(_parse_labels(args.labels), np.int64), args.num)
  else:
    _load_config(args.workdir)  # a clear error for a workdir without a generator run
    num_classes = len(runlog.read_json(pathlib.Path(args.workdir) / "classes.json"))
    labels = generate.default_labels(args.num, num_classes)
  images = generate.generate(args.workdir, labels, args.sampler, _steps(args), args.guidance,
                             args.seed, args.batch_size)
  generate.save_npz(out, images, labels)
  png = image_grid.write_grid(out.with_suffix(".png"), images, labels)
  print(f"wrote {out} ({len(images)} images) and {png}")


def interpolate(args):
  from cifarjax import generate, image_grid, mesh as mesh_lib
  from cifarjax import runlog
  from cifarjax.data import load_split, with_class_order
  import pathlib
  mesh_lib.initialize_distributed()
  config = _load_config(args.workdir)
  data = load_split(args.data, args.split, holdout=config.holdout)
  for name, i in (("--a", args.a), ("--b", args.b)):
    if not 0 <= i < len(data):
      raise ValueError(f"{name} {i} is outside {args.data}:{args.split} ({len(data)} images)")
  data = with_class_order(data, runlog.read_json(pathlib.Path(args.workdir) / "classes.json"))
  frames, labels = generate.interpolate(args.workdir, data.images[args.a], int(data.labels[args.a]),
                                        data.images[args.b], int(data.labels[args.b]),
                                        args.frames, args.steps)
  png = image_grid.write_strip(args.out, frames)
  names = [data.class_names[i] for i in labels]
  print(f"wrote {png}: {len(frames)} frames, labels {' '.join(names)}")


def evaluate(args):
  from cifarjax import mesh as mesh_lib
  from cifarjax.generate import evaluate_fid
  mesh_lib.initialize_distributed()
  result = evaluate_fid(args.workdir, args.num, weights=args.weights, reference=args.reference,
                        sampler=args.sampler, steps=_steps(args), seed=args.seed,
                        batch_size=args.batch_size)
  if args.json:
    print(json.dumps(result))
  else:
    print(f"FID {result['fid']:.2f} of {result['fid_num']} samples ({result['fid_sampler']}, "
          f"{result['fid_steps']} steps) at step {result['fid_step']} against "
          f"{result['fid_reference']}")
