"""The paper and the improved generator trained side by side to a series of step counts, with
the FID of each at each (DPM-Solver++(2M), 20 steps, averaged weights), the linear schedule
against the sigmoid at one of them, and the fuller set of FIDs at the last: DDIM-50, the raw
weights, and classifier-free guidance 1 and 3 for the run that learned the null label.

  python experiments/generator_fid_by_steps.py --data ../shared/data/cifar10-jpeg-train.zip \\
      --out ~/runs/generator --fid-weights ../shared/fid/pt_inception-2015-12-05.npz \\
      --milestones 1000 2500 5000 [--linear-at 2500] [--full-at 5000] [--batch-size 128]

Every run resumes in OUT/<run> and every FID is kept in OUT/fid.jsonl (keyed by the run, its
training step, the cell and the Inception weights), so the same command continues where an
earlier one stopped, and adding a milestone trains on. A milestone that a run has already
passed without its FIDs is reported, not re-measured at the wrong step. The table and the
figure (OUT/fid_by_steps.png) are written from fid.jsonl each time.
"""

import dataclasses
import pathlib

import common
import generator_improved as gi

MAIN = ("ema", 0.0, "dpm++2m", 20)  # (weights, guidance, sampler, sampler steps) at every milestone
# Besides MAIN at --full-at; the raw weights before DDIM-50, which makes 2.5 times the network
# calls, so that a stop mid-way leaves more cells measured.
FULL = (("raw", 0.0, "dpm++2m", 20), ("ema", 0.0, "ddim", 50))
GUIDANCE = (1.0, 3.0)  # at --full-at, for runs trained with label dropout
# A checkpoint every 100 steps, so that a stopped run loses minutes, not an hour; 100 kept, so
# that the checkpoints of every milestone up to 10,000 steps stay for their FIDs.
RUN_CONTROL = dict(checkpoint_every=100, keep_checkpoints=100)


def config_of(name, steps, data, batch_size, quick=False):
  config = dataclasses.replace(gi.run_config(name, steps, data, quick), **RUN_CONTROL)
  return config if quick else dataclasses.replace(config, batch_size=batch_size)


def latest_step(workdir) -> int:
  """The step of a run's latest checkpoint (0 where it has none), read without the data."""
  from cifarjax import checkpoint
  if not (pathlib.Path(workdir) / "checkpoints").is_dir():
    return 0
  mngr = checkpoint.manager(workdir, keep=None)
  try:
    return mngr.latest_step() or 0
  finally:
    mngr.close()


def grid(names, configs, full: bool):
  cells = [(n, *MAIN) for n in names]
  if full:
    cells += [(n, *cell) for cell in FULL for n in names]
    cells += [(n, "ema", g, "dpm++2m", 20) for n in names if configs[n].label_dropout
              for g in GUIDANCE]
  return cells


def at_milestone(out, step, names, data, batch_size, full, num, weights, quick=False):
  """Trains each run to `step` (where it is not past it) and measures its FIDs there
  (weights None: trains only). Each run's main FID comes as soon as it reaches `step`, before
  the next run trains: hours earlier than after all of them, and a run stopped meanwhile
  loses training, which resumes, rather than a measurement."""
  runs, missed = {}, []
  for name in names:
    workdir = pathlib.Path(out) / name
    config = config_of(name, step, data, batch_size, quick)
    if latest_step(workdir) > step:
      missed.append(name)
      continue
    reached = gi.train_for(config, workdir)
    if reached != step:
      raise RuntimeError(f"{name} is at step {reached:,}, not {step:,}")
    runs[name] = (config, workdir)
    if weights is not None:
      measure_missing(out, step, {name: runs[name]}, [(name, *MAIN)], num, weights)
  if weights is not None:
    measure_missing(out, step, runs, grid(list(runs), {n: c for n, (c, _) in runs.items()}, full),
                    num, weights)
  for name in missed:
    print(f"{name} is past step {step:,}; its FIDs there are what fid.jsonl kept")


def measure_missing(out, step, runs, wanted, num, weights):
  """Measures the cells of `wanted` that OUT/fid.jsonl lacks at `step`."""
  kept = {(r["run"], r["train_step"]) + gi.fid_key(r)[1:] for r in gi.read_records(
      pathlib.Path(out) / "fid.jsonl") if r["num"] == num}
  todo = {n: runs[n] for n in runs if any((n, step) + c[1:] not in kept
                                          for c in wanted if c[0] == n)}
  if todo:
    gi.measure_fids(todo, [c for c in wanted if c[0] in todo], out, num, weights)


def fid_table(records, milestones) -> str:
  """A row per (run, weights, guidance, sampler), a column per training step."""
  by = {}
  for r in records:
    by.setdefault(gi.fid_key(r), {})[r["train_step"]] = r["fid"]
  rows = [(*key[:2], f"{key[2]:g}", f"{key[3]} {key[4]}",
           *(f"{cols[m]:.2f}" if m in cols else "" for m in milestones))
          for key, cols in sorted(by.items())]
  return common.table(("run", "weights", "guidance", "sampler", *(f"step {m:,}" for m in milestones)),
                      rows)


def figure(records, path):
  """FID against training steps of the MAIN cell of each run."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=120)
  for run in dict.fromkeys(r["run"] for r in records):
    points = sorted((r["train_step"], r["fid"]) for r in records
                    if r["run"] == run and gi.fid_key(r)[1:] == MAIN)
    if points:
      ax.plot(*zip(*points), marker="o", label=run)
  ax.set_xlabel("training steps (batch 128)")
  ax.set_ylabel("FID-10k against train statistics")
  ax.set_title(f"{MAIN[2]} {MAIN[3]} steps, averaged weights", fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def run(out, milestones, data, *, fid_weights=None, linear_at=None, full_at=None,
        batch_size=128, num=10_000, quick=False):
  """Trains the runs to each milestone in turn and measures their FIDs there (fid_weights
  None: trains only). Writes the table's figure and returns the table (None when training only)."""
  milestones = sorted(milestones)
  full_at = full_at or milestones[-1]
  for step in milestones:
    names = ["paper", "improved"] + (["linear-schedule"] if step == linear_at else [])
    at_milestone(out, step, names, data, batch_size, step == full_at, num, fid_weights, quick)
  if fid_weights is None:
    return None
  records = [r for r in gi.read_records(pathlib.Path(out) / "fid.jsonl") if r["num"] == num]
  figure(records, pathlib.Path(out) / "fid_by_steps.png")
  return fid_table(records, milestones)


def main():
  p = common.parser(__doc__)
  p.add_argument("--fid-weights", required=True, help="pt_inception-2015-12-05 weights (.pth or .npz)")
  p.add_argument("--train-only", action="store_true", help="train to the milestones, measure nothing")
  p.add_argument("--milestones", type=int, nargs="+", required=True, help="training steps")
  p.add_argument("--linear-at", type=int, help="also train the linear schedule to this milestone")
  p.add_argument("--full-at", type=int, help="the milestone with the full set of FIDs (default: the last)")
  p.add_argument("--batch-size", type=int, default=128)
  p.add_argument("--num", type=int, default=10_000, help="samples per FID")
  args = p.parse_args()
  from cifarjax import fid
  fid.resolve_weights_path(args.fid_weights)  # a wrong path fails now, not after hours of training
  table = run(args.out, args.milestones, args.data, linear_at=args.linear_at, full_at=args.full_at,
              fid_weights=None if args.train_only else args.fid_weights,
              batch_size=args.batch_size, num=args.num, quick=args.quick)
  if table is not None:
    print(table)


if __name__ == "__main__":
  common.run_script(main)
