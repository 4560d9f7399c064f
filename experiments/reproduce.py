"""Runs every experiment of the paper and writes DIR/REPORT.md: each table with the paper's
numbers beside ours, the figures, and each run's config, seed, machine and wall time.

  python experiments/reproduce.py --out runs/reproduce [--fid-weights W] [--data SRC]
  python experiments/reproduce.py --quick --out /tmp/smoke     # minutes on a CPU

Without --quick: the paper's budgets (3 x 10,000 classifier steps, 4 ablations, 3 x 50,000
generator steps, FID on 10,000 DDPM samples each), which want a GPU or TPU.
"""

import json
import os
import pathlib
import time

import jax

import classifier_baseline
import common
import diffusion_final
import diffusion_schedules
import regularisation
import training_graph


def _rel(path, out):
  return os.path.relpath(path, out)


def runs_table(sections, out) -> str:
  rows = []
  for section in sections:
    for r in section.runs:
      rows.append((r.name, f"`{_rel(r.workdir, out)}`", getattr(r.config, "seed", ""),
                   r.summary.get("steps"), r.summary.get("devices", ""), f"{r.wall_s:.1f} s"))
  return common.table(("run", "workdir", "seed", "steps", "machine", "wall time"), rows)


def configs_text(sections) -> str:
  parts = []
  for section in sections:
    for r in section.runs:
      cfg = json.dumps({"type": type(r.config).__name__, **common.config_dict(r.config)})
      parts.append(f"- {r.name}: `{cfg}`")
  return "\n".join(parts)


def report(sections, out, quick, wall_s) -> str:
  head = ["# Reproduction report", ""]
  if quick:
    head += ["**--quick**: a few steps of small models on small data. This checks that every "
             "experiment runs end to end; its numbers say nothing about the paper's.", ""]
  head += [f"Machine: {common.machine()}; jax {jax.__version__}. Total wall time "
           f"{wall_s:.1f} s.", ""]
  body = []
  for s in sections:
    body += [f"## {s.title}", "", s.table, ""]
    if s.notes:
      body += [s.notes, ""]
    body += [f"![{pathlib.Path(f).stem}]({_rel(f, out)})" for f in s.figures]
    body += [""] if s.figures else []
  body += ["## Runs", "", runs_table(sections, out), "", "### Configs", "",
           configs_text(sections), ""]
  return "\n".join(head + body)


def run_all(out, quick=False, data=None, fid_weights=None, seeds=3):
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  t0 = time.perf_counter()
  baseline = classifier_baseline.run(out / "baseline", quick, data,
                                     tuple(range(2 if quick else seeds)))
  sections = [
      baseline,
      training_graph.run(baseline.runs[0].workdir, out / "training_graph.png"),
      regularisation.run(out / "regularisation", quick, data, baseline_runs=baseline.runs),
      diffusion_schedules.run(out / "schedules", quick, data, fid_weights),
      diffusion_final.run(out / "final", quick, data, fid_weights),
  ]
  text = report(sections, out, quick, time.perf_counter() - t0)
  if jax.process_index() == 0:
    (out / "REPORT.md").write_text(text)
  return out / "REPORT.md"


def main():
  p = common.parser(__doc__)
  p.add_argument("--fid-weights", help="pt_inception-2015-12-05 weights (.pth or .npz); "
                 "without them the FID rows say skipped")
  p.add_argument("--seeds", type=int, default=3, help="classifier baseline seeds (--quick: 2)")
  args = p.parse_args()
  from cifarjax import mesh as mesh_lib
  mesh_lib.initialize_distributed()
  path = run_all(args.out, args.quick, args.data, args.fid_weights, args.seeds)
  print(path)


if __name__ == "__main__":
  common.run_script(main)
