"""Beyond the paper: the generator's `improved` preset and each of its changes alone against
`paper`, at equal training steps; FID of each with DDPM (all T steps), DDIM and DPM-Solver++(2M)
at 10, 20 and 50 steps, from the moving average and from the raw weights, and with
classifier-free guidance where a run learned the null label.

  python experiments/generator_improved.py --data ../shared/data/cifar10-jpeg-train.zip \
      --out runs/generator-improved --fid-weights pt_inception-2015-12-05.npz \
      [--steps 50000 | --train-seconds S] [--budget-s B] [--num 10000] [--only paper improved]

--train-seconds stops the first run at the first step boundary after S seconds (with a
checkpoint, as on Ctrl-C) and trains every other run to the step it reached: all compare at
equal steps within a time budget (`accelerator_run.sh` does this). --budget-s skips each FID
that would end more than B seconds after the start, by the speed of the ones before it; the
table says "not measured" there. The FIDs go most telling first: DPM-Solver++ and DDIM at 20
steps for every run, the raw weights, guidance, 10 and 50 steps, and DDPM's 1,000 steps last
(50 times a 20-step FID's sampling). The Frechet distances take their matrix square root by
`eigh` (seconds; scipy's sqrtm, pytorch-fid's way, takes a minute per FID on a small CPU and
agrees to ~3e-7 relative). Every FID samples with the same seed (the same noise for every
run, so the differences between runs carry less sampling noise) and is kept in
OUT/fid.jsonl, keyed by the training step, the number of samples and the Inception weights'
sha256, which a later call reuses; every run resumes in OUT/<run>.
"""

import dataclasses
import json
import pathlib
import time

import common
from cifarjax.config import DIFFUSION_PRESETS
from cifarjax.errors import Interrupted

PAPER, IMPROVED = DIFFUSION_PRESETS["paper"], DIFFUSION_PRESETS["improved"]
GAMMA = IMPROVED.loss_weighting_kwargs["gamma"]

# name: (what changes, the config's changes to `paper`; None: the improved preset).
RUNS = {
    "paper": ("the paper's recipe: eps prediction, unweighted loss, no label dropout", {}),
    "improved": (f"v-prediction, min-SNR-{GAMMA:g} weighting, label dropout "
                 f"{IMPROVED.label_dropout} (the `improved` preset)", None),
    "v-prediction": ("v-prediction", {"prediction": IMPROVED.prediction}),
    "min-snr": (f"min-SNR-{GAMMA:g} loss weighting",
                {"loss_weighting": IMPROVED.loss_weighting,
                 "loss_weighting_kwargs": IMPROVED.loss_weighting_kwargs}),
    "label-dropout": (f"label dropout {IMPROVED.label_dropout} (what guidance needs)",
                      {"label_dropout": IMPROVED.label_dropout}),
    "sigmoid-blog": ("the blog's sigmoid betas instead of RIN's sigmoid schedule",
                     {"schedule": "sigmoid-blog"}),
    "linear-schedule": ("DDPM's linear schedule instead of the sigmoid (section 4's comparison)",
                        {"schedule": "linear"}),
    "train+test": ("trained on the held-out (or test) images too, as the paper's final model",
                   {"train_on": "train+test"}),
}
SAMPLERS = (("ddpm", None), ("ddim", 10), ("ddim", 20), ("ddim", 50), ("dpm++2m", 10),
            ("dpm++2m", 20), ("dpm++2m", 50))  # the table's columns; None: all of T
GUIDANCE = (0.5, 1.0, 2.0)  # output = (1 + w) conditional - w unconditional
FID_SEED = 0


def run_config(name, steps, data, quick, steps_per_call=1, unet=None):
  changes = RUNS[name][1]
  base = IMPROVED if changes is None else dataclasses.replace(PAPER, **changes)
  config = common.quick_config(base, quick, data, common.QUICK_DIFFUSION)
  return dataclasses.replace(config, steps=steps, steps_per_call=steps_per_call,
                             unet=unet or config.unet)


def cells(names, configs):
  """(run, weights, guidance, sampler, sampler steps) of every FID, most telling first; DDPM
  takes all of a run's T steps."""
  main = [(n, "ema", 0.0) for n in names]
  order = [(*r, "dpm++2m", 20) for r in main] + [(*r, "ddim", 20) for r in main]
  order += [(n, "raw", 0.0, "dpm++2m", 20) for n in names]
  order += [(n, "ema", g, "dpm++2m", 20) for n in names if configs[n].label_dropout
            for g in GUIDANCE]
  order += [(*r, s, k) for k in (10, 50) for s in ("dpm++2m", "ddim") for r in main]
  return order + [(n, "ema", 0.0, "ddpm", configs[n].num_timesteps) for n in names]


def train_for(config, workdir, seconds=None) -> int:
  """Trains (or resumes) a run; with `seconds`, stops it with a checkpoint once that much
  time has passed (`train`'s time_limit_s). Returns the step the run reached."""
  from cifarjax.train_diffusion import train
  t0 = time.monotonic()
  try:
    return train(config, workdir, time_limit_s=seconds)["steps"]
  except Interrupted as stopped:
    if seconds is None or time.monotonic() - t0 < seconds:
      raise  # Ctrl-C: the person at the keyboard stops the script
    return stopped.step


def train_runs(out, names, steps, data, quick, train_seconds=None, steps_per_call=1, unet=None):
  """{name: (config, workdir)}, every run trained to the same step: `steps`, or with
  train_seconds the step the first run reached in that time (at most `steps`)."""
  out = pathlib.Path(out)
  runs = {name: (run_config(name, steps, data, quick, steps_per_call, unet), out / name)
          for name in names}
  if train_seconds:
    steps = train_for(runs[names[0]][0], out / names[0], train_seconds)
    print(f"{names[0]} reached step {steps:,} in {train_seconds:g} s; every run trains to it")
    runs = {name: (dataclasses.replace(config, steps=steps), workdir)
            for name, (config, workdir) in runs.items()}
  for name in names[1:] if train_seconds else names:
    reached = train_for(*runs[name])
    if reached != steps:
      raise RuntimeError(f"run {name} in {runs[name][1]} is at step {reached:,}, not {steps:,}: "
                         f"its runs must compare at equal steps (use another --out)")
  return runs


CELL = ("run", "weights", "guidance", "sampler", "sampler_steps")  # a FID record's key fields


def fid_key(record) -> tuple:
  return tuple(record[k] for k in CELL)


def read_records(path) -> list:
  return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []


def passes(guidance) -> int:
  """Network evaluations per sampling step: two (with and without the label) under guidance."""
  return 2 if guidance else 1


def estimated_seconds(records, num, sampler_steps, guidance=0.0) -> float:
  """A FID's time by the largest one measured: its sampling per image and network pass, its
  features per image (compiling included, so an overestimate)."""
  if not records:
    return 0.0
  big = max(records, key=lambda r: r["num"] * r["sampler_steps"] * passes(r["guidance"]))
  per_pass = big["sample_s"] / (big["num"] * big["sampler_steps"] * passes(big["guidance"]))
  return num * (sampler_steps * passes(guidance) * per_pass + big["feature_s"] / big["num"])


def measure_fids(runs, grid, out, num, weights, budget_s=None, start=None):
  """The FID record (dict) of each cell of `grid` measured now or kept in OUT/fid.jsonl; a
  cell that would end past `budget_s` seconds from `start` is left out."""
  from cifarjax import fid, generate
  from cifarjax.fid.weights import file_sha256
  from cifarjax.train_diffusion import load_trained
  path = pathlib.Path(out) / "fid.jsonl"
  start = time.monotonic() if start is None else start
  sha256 = file_sha256(fid.resolve_weights_path(weights))
  trained = {name: load_trained(workdir) for name, (_, workdir) in runs.items()}
  steps = {name: int(t[1].step) for name, t in trained.items()}
  kept = {fid_key(r): r for r in read_records(path) if r["num"] == num
          and r["train_step"] == steps.get(r["run"]) and r["fid_weights_sha256"] == sha256}

  def past_budget(seconds):
    return budget_s is not None and time.monotonic() - start + seconds > budget_s

  if past_budget(0):  # not even the reference statistics fit: what is kept
    return [kept[key] for key in grid if key in kept]
  first = next(iter(runs.values()))[0]
  reference = fid.training_reference_stats(first.data, first.holdout, weights)  # cached
  variables = fid.load_inception_params(weights)  # read once, not per FID
  records = []
  for key in grid:
    run, weights_from, guidance, sampler, k = key
    if key in kept:
      records.append(kept[key])
      continue
    if past_budget(estimated_seconds(records, num, k, guidance)):
      continue
    t0 = time.perf_counter()
    images = generate.generate(runs[run][1], generate.default_labels(num, len(trained[run][3])),
                               sampler, k, guidance, FID_SEED,
                               progress=False, trained=trained[run], sample_from=weights_from)
    t1 = time.perf_counter()
    mu, sigma = fid.stats_from_images(images, variables, progress=False)
    value = fid.frechet_distance(mu, sigma, *reference, method="eigh")
    record = dict(zip(CELL, key), train_step=steps[run], num=num, fid=float(value), clip="static",
                  fid_weights_sha256=sha256, sample_s=t1 - t0,
                  feature_s=time.perf_counter() - t1)
    records.append(record)
    with path.open("a") as f:
      f.write(json.dumps(record) + "\n")
    print(f"FID {value:.2f}: {run}, {weights_from} weights, guidance {guidance:g}, {sampler} {k}")
  return records


def fid_table(runs, grid, records) -> str:
  """A row per (run, weights, guidance), a column per sampler; blank where the grid has no
  cell, "not measured" where the budget skipped it."""
  by_key = {fid_key(r): r["fid"] for r in records}
  t = next(iter(runs.values()))[0].num_timesteps  # DDPM's steps: every run's T
  rows = []
  for run, weights_from, guidance in dict.fromkeys(c[:3] for c in grid):
    in_grid = {(s, k) for *r, s, k in grid if tuple(r) == (run, weights_from, guidance)}
    row = [run, weights_from, f"{guidance:g}"]
    for sampler, k in SAMPLERS:
      k = k or t
      value = by_key.get((run, weights_from, guidance, sampler, k))
      row.append("" if (sampler, k) not in in_grid else
                 "not measured" if value is None else f"{value:.2f}")
    rows.append(row)
  headers = ("run", "weights", "guidance", *(f"{s} {k or t}" for s, k in SAMPLERS))
  return common.table(headers, rows)


def run(out, quick=False, data=None, steps=None, only=None, fid_weights=None, num=10_000,
        train_seconds=None, budget_s=None, steps_per_call=1, unet=None) -> common.Section:
  start = time.monotonic()
  if fid_weights is not None:  # a wrong path fails now, not after hours of training
    from cifarjax import fid
    fid.resolve_weights_path(fid_weights)
  names = [n for n in RUNS if not only or n in only]
  steps = steps or (common.QUICK_DIFFUSION["steps"] if quick else PAPER.steps)
  runs = train_runs(out, names, steps, data, quick, train_seconds, steps_per_call, unet)
  first = next(iter(runs.values()))[0]
  what = common.table(("run", "what changes"), [(n, RUNS[n][0]) for n in names])
  if fid_weights is None:
    return common.Section(f"Generator beyond the paper: {first.steps:,} steps", what,
                          notes=common.NO_FID)
  grid = cells(names, {n: c for n, (c, _) in runs.items()})
  records = measure_fids(runs, grid, out, num, fid_weights, budget_s, start)
  return common.Section(
      f"Generator beyond the paper: {first.steps:,} steps of batch {first.batch_size}",
      f"{what}\n\n{fid_table(runs, grid, records)}",
      notes=f"FID of {num:,} samples (labels cycling through the classes, sampling seed "
            f"{FID_SEED}) against the training images")


def main():
  p = common.parser(__doc__)
  p.add_argument("--steps", type=int, help=f"training steps of every run (default {PAPER.steps:,})")
  p.add_argument("--train-seconds", type=float,
                 help="train the first run this long, the others to the step it reached")
  p.add_argument("--budget-s", type=float, help="skip the FIDs that would end later than this")
  p.add_argument("--num", type=int, default=10_000, help="samples per FID")
  p.add_argument("--steps-per-call", type=int, default=1, help="train steps per jitted call")
  p.add_argument("--unet", help="the network of every run (cifarjax.models.UNETS; default paper)")
  p.add_argument("--fid-weights", help="pt_inception-2015-12-05 weights (.pth or .npz)")
  p.add_argument("--only", nargs="+", choices=list(RUNS), help="train and report these runs only")
  args = p.parse_args()
  section = run(args.out, args.quick, args.data, args.steps, args.only, args.fid_weights,
                args.num, args.train_seconds, args.budget_s, args.steps_per_call, args.unet)
  common.print_section(section)
  print(section.notes)


if __name__ == "__main__":
  common.run_script(main)
