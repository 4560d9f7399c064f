"""`cifarjax train-diffusion`, `sample`, `interpolate` and `eval-diffusion`.

Every flag is checked against the workdir's saved run (its classes, its number of
timesteps) before the generator is loaded, so a mistake costs no model load.
"""

import json

from cifarjax.commands import (config_flags, config_from_args, distributed_flag, flag_names,
                               fresh_start_guard, positive, registered_help, set_flag,
                               setting_value)
from cifarjax.commands.classifier import DATA_HELP, FUSED_HELP
from cifarjax.config import DIFFUSION_PRESETS

# Written out so that --help imports no JAX; tests/test_train_diffusion.py checks it against
# generate.SAMPLE_FROM. Samplers, clips and U-Nets are registries, which --import extends:
# their options are checked after the imports, and their help lists what is registered
# when it is shown.
WEIGHTS_FROM = ("ema", "raw")
# The config fields train-diffusion sets by a flag of their name, and what each does.
TRAIN_FLAGS = {
    "data": DATA_HELP,
    "holdout": "held-out train examples where the source has no test split",
    "steps": "training steps",
    "batch_size": "",
    "label_dropout": "train the null label for classifier-free guidance (beyond the paper)",
    "unet": registered_help("UNETS", "the U-Net, a name in cifarjax.models.UNETS"),
    "train_on": "train+test adds the test split (or the held-out slice) to the training "
                "images, as the paper's final model",
    "eval_every": "",
    "checkpoint_every": "",
    "log_every": "",
    "steps_per_call": FUSED_HELP,
    "seed": "",
}


def register(subparsers):
  p = subparsers.add_parser("train-diffusion", help="train (or resume) the paper's generator",
                            description="Train the paper's generator, or resume the run in "
                            "--workdir (run the same command again to resume).")
  p.add_argument("--preset", default="paper",
                 help="paper, linear-schedule (section 4's comparison, batch 128) or improved "
                 "(beyond the paper: v-prediction, min-SNR loss weighting, label dropout 0.1)")
  config_flags(p, DIFFUSION_PRESETS, TRAIN_FLAGS)
  p.add_argument("--workdir", default="runs/diffusion",
                 help="where the run keeps its config, metrics, plots and checkpoints")
  set_flag(p, "--set learning_rate=0.001 --set schedule_kwargs.tau=0.9")
  distributed_flag(p)
  p.set_defaults(func=train)

  p = subparsers.add_parser("sample", help="sample images from a trained generator")
  p.add_argument("--workdir", required=True)
  p.add_argument("--num", type=int, required=True, help="number of images")
  p.add_argument("--labels", help="comma-separated class indices, cycled to --num "
                 "(default: every class in turn)")
  _sampler_args(p)
  _weights_from_arg(p)
  _guidance_arg(p)
  p.add_argument("--seed", type=int, default=0, help="sampling seed")
  p.add_argument("--out", required=True, metavar="FILE.npz",
                 help="writes 'images' (uint8 N x 32 x 32 x 3) and 'labels', and FILE.png beside "
                 "it: a sheet with a row per class, named, the images enlarged 3x")
  p.set_defaults(func=sample)

  p = subparsers.add_parser("interpolate",
                            help="interpolate between two dataset images through DDIM latents")
  p.add_argument("--workdir", required=True)
  p.add_argument("--data", required=True, help="the source of the two images")
  p.add_argument("--split", default="train", help="the split --a and --b index")
  p.add_argument("--a", type=int, required=True, help="index of the first image in the split")
  p.add_argument("--b", type=int, required=True, help="index of the second image")
  p.add_argument("--frames", type=int, default=8, help="frames between a and b, both "
                 "reconstructions included")
  p.add_argument("--steps", type=int, default=50, help="DDIM steps of inversion and decoding")
  _clip_arg(p)
  p.add_argument("--out", required=True, metavar="FILE.png",
                 help="a strip: image a, the frames, image b")
  p.set_defaults(func=interpolate)

  p = subparsers.add_parser(
      "export-diffusion", help="write a trained generator's weights to a folder of a few MB",
      description="Write the latest checkpoint's weights, with the run's config and class "
      "names, to a new folder that sample, interpolate and eval-diffusion read as a --workdir.")
  p.add_argument("--workdir", required=True)
  p.add_argument("--out", required=True, help="a new folder")
  _weights_from_arg(p)
  p.set_defaults(func=export)

  p = subparsers.add_parser("eval-diffusion", help="FID of a trained generator's samples")
  p.add_argument("--workdir", required=True)
  p.add_argument("--num", type=int, required=True,
                 help="number of samples (the paper: 10,000; FID of fewer than 2,048 is biased)")
  p.add_argument("--weights", help="FID Inception weights (as `cifarjax fid --weights`)")
  p.add_argument("--reference", help="FID reference: a stats .npz (mu, sigma; used as it is) "
                 "or any FID source (its statistics cached). Default: the training images of "
                 "the run's data (without its held-out slice), their statistics cached")
  _sampler_args(p)
  _weights_from_arg(p)
  _guidance_arg(p)
  p.add_argument("--seed", type=int, default=0, help="sampling seed")
  p.add_argument("--json", action="store_true", help="print one JSON line")
  p.set_defaults(func=evaluate)


def _sampler_args(p):
  p.add_argument("--sampler", default="ddpm", help=registered_help(
      "SAMPLERS", "ddpm: the paper's ancestral sampler, all T steps; ddim: deterministic "
      "(or with --eta), --steps of them (e.g. --sampler ddim --steps 50: ~20x faster than "
      "ddpm); dpm++2m: DPM-Solver++(2M), deterministic and second order, --steps of them"))
  p.add_argument("--steps", type=int, help="sampler steps (all but ddpm default: 50)")
  p.add_argument("--eta", type=float, default=0.0,
                 help="the sampler's noise, passed to it as given: DDIM's eta (0 "
                 "deterministic, 1 ancestral); ddpm and dpm++2m take only 0")
  p.add_argument("--sampler-arg", action="append", default=[], metavar="NAME=VALUE",
                 help="a setting of the sampler (a keyword parameter of its function; "
                 "repeatable): a JSON value, else a string")
  _clip_arg(p)
  p.add_argument("--batch-size", type=int, default=256, help="images per compiled batch")


def _guidance_arg(p):
  p.add_argument("--guidance", type=float, default=0.0,
                 help="classifier-free guidance weight w, eps = (1 + w) eps(x, y) - w eps(x, null); "
                 "0: unguided (needs a model trained with --label-dropout)")


def _clip_arg(p):
  p.add_argument("--clip", default="static", help=registered_help(
      "CLIPS", "what each step's predicted clean image goes through: static, the data range "
      "[-1, 1] (DDPM's official sampler); dynamic, Imagen's thresholding; off, as the "
      "network predicts it"))


def _sampler_kwargs(args) -> dict:
  """--sampler-arg NAME=VALUE ... as a dict (`setting_value` reads each value)."""
  from cifarjax.errors import UserError
  kwargs = {}
  for text in args.sampler_arg:
    name, sep, raw = text.partition("=")
    if not sep or not name.strip():
      raise UserError(f"--sampler-arg wants NAME=VALUE (e.g. s_noise=0.5), got {text!r}")
    kwargs[name.strip()] = setting_value(raw)
  return kwargs


def _weights_from_arg(p):
  p.add_argument("--weights-from", choices=WEIGHTS_FROM, default="ema",
                 help="sample the exponential moving average of the weights (ema) or the "
                 "last step's (raw)")


def _steps(args):
  return 50 if args.sampler != "ddpm" and args.steps is None else args.steps


def _open_run(workdir):
  """The generator run (or exported folder) in --workdir, its config and class names read
  and checked once: the commands below pass it on, so nothing reads them again."""
  from cifarjax import generate
  return generate.open_run(workdir).read()


def _check_sampler(args, config):
  """--sampler, --clip, --steps and --batch-size against the registries and the run's T,
  before any model load (the sampler's own checks follow in `generate`, also before it)."""
  from cifarjax import diffusion, registry
  from cifarjax.errors import UserError
  registry.lookup(diffusion.SAMPLERS, "sampler", args.sampler, flag="--sampler")
  registry.lookup(diffusion.CLIPS, "clip", args.clip, flag="--clip")
  positive("--batch-size", args.batch_size)
  positive("--steps", args.steps, allow_none=True)
  T = config.num_timesteps
  if args.sampler == "ddpm" and args.steps not in (None, T):
    raise UserError(f"--sampler ddpm runs all {T} steps of this model; for --steps "
                    f"{args.steps} use --sampler ddim")
  if args.steps is not None and args.steps > T:
    raise UserError(f"--steps must be at most the model's {T} timesteps, got {args.steps}")


def _parse_labels(text: str) -> list[int]:
  from cifarjax.errors import UserError
  try:
    labels = [int(v) for v in text.split(",") if v.strip()]
  except ValueError:
    raise UserError(f"--labels must be comma-separated integers, got {text!r}") from None
  if not labels:
    raise UserError(f"--labels names no class, got {text!r}")
  return labels


def train(args):
  from cifarjax import mesh as mesh_lib
  from cifarjax.train_diffusion import train as train_diffusion
  mesh_lib.initialize_distributed(args.distributed)
  with flag_names(TRAIN_FLAGS):
    config = config_from_args(DIFFUSION_PRESETS, args)
    with fresh_start_guard(args.workdir):
      summary = train_diffusion(config, args.workdir)
  print(json.dumps(summary, indent=2))


def sample(args):
  import pathlib
  import numpy as np
  from cifarjax import generate, image_grid, mesh as mesh_lib
  from cifarjax.errors import UserError
  out = pathlib.Path(args.out)
  if out.suffix != ".npz":
    raise UserError(f"--out must end in .npz, got {out}")
  positive("--num", args.num)
  run = _open_run(args.workdir)  # a clear error for a workdir without a generator run
  _check_sampler(args, run.config)
  class_names = run.class_names
  if args.labels:
    labels = np.resize(np.asarray(_parse_labels(args.labels), np.int64), args.num)
  else:
    labels = generate.default_labels(args.num, len(class_names))
  mesh_lib.initialize_distributed()
  images = generate.generate(run, labels, args.sampler, _steps(args), args.guidance,
                             args.seed, args.batch_size, sample_from=args.weights_from,
                             clip=args.clip, eta=args.eta, sampler_kwargs=_sampler_kwargs(args))
  generate.save_npz(out, images, labels)
  png = image_grid.write_grid(out.with_suffix(".png"), images, labels, class_names=class_names)
  print(f"wrote {out} ({len(images)} images) and {png}")


def interpolate(args):
  import pathlib
  from cifarjax import generate, image_grid, mesh as mesh_lib
  from cifarjax.data import load_split, with_class_order
  from cifarjax.errors import UserError, note
  if pathlib.Path(args.out).suffix.lower() != ".png":
    raise UserError(f"--out must end in .png, got {args.out}")
  if args.frames < 2:
    raise UserError(f"--frames must be at least 2, got {args.frames}")
  positive("--steps", args.steps)
  run = _open_run(args.workdir)
  config = run.config
  if args.steps > config.num_timesteps:
    raise UserError(f"--steps must be at most the model's {config.num_timesteps} timesteps, "
                    f"got {args.steps}")
  class_names = run.class_names
  mesh_lib.initialize_distributed()
  note(f"loading {args.data} ({args.split} split)")
  data = load_split(args.data, args.split, holdout=config.holdout)
  for name, i in (("--a", args.a), ("--b", args.b)):
    if not 0 <= i < len(data):
      raise UserError(f"{name} {i} is outside {args.data}:{args.split} ({len(data)} images)")
  data = with_class_order(data, class_names)
  a, b = data.images[args.a], data.images[args.b]
  frames, labels = generate.interpolate(run, a, int(data.labels[args.a]),
                                        b, int(data.labels[args.b]), args.frames, args.steps,
                                        clip=args.clip)
  png = image_grid.write_strip(args.out, frames, sources=(a, b))
  names = [data.class_names[i] for i in labels]
  print(f"wrote {png}: image a, {len(frames)} frames, image b; labels {' '.join(names)}")


def export(args):
  import pathlib
  from cifarjax import run as run_lib
  from cifarjax.errors import UserError
  run = _open_run(args.workdir)
  out = pathlib.Path(args.out)
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    raise UserError(f"--out {out} exists and is not an empty folder; name a new folder")
  step = run_lib.export_weights(run, out, args.weights_from)
  size = (out / "weights.npz").stat().st_size / 2**20
  print(f"wrote {out}: the {args.weights_from} weights of step {step} ({size:.1f} MiB); "
        f"sample them with `cifarjax sample --workdir {out} ...`")


def evaluate(args):
  from cifarjax import mesh as mesh_lib
  from cifarjax.errors import UserError
  from cifarjax.generate import evaluate_fid
  if args.num < 2:
    raise UserError(f"--num must be at least 2 (FID needs 2 samples), got {args.num}")
  run = _open_run(args.workdir)
  _check_sampler(args, run.config)
  mesh_lib.initialize_distributed()
  result = evaluate_fid(run, args.num, weights=args.weights, reference=args.reference,
                        sampler=args.sampler, steps=_steps(args), guidance=args.guidance,
                        seed=args.seed, batch_size=args.batch_size, sample_from=args.weights_from,
                        clip=args.clip, eta=args.eta, sampler_kwargs=_sampler_kwargs(args))
  if args.json:
    print(json.dumps(result))
  else:
    print(f"FID {result['fid']:.2f} of {result['fid_num']} samples ({result['fid_sampler']}, "
          f"{result['fid_steps']} steps) at step {result['fid_step']} against "
          f"{result['fid_reference']}")
