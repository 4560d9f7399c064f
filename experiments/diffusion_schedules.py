"""Section 4: the linear and the sigmoid noise schedules, each trained at batch 128 (50,000
steps, lr 0.003, decay 0.995), and the FID of each (paper: linear 90.52, sigmoid 75.19).

  python experiments/diffusion_schedules.py --out runs/schedules [--fid-weights W] [--quick]
"""

import dataclasses

import common
from cifarjax.config import DIFFUSION_PRESETS

PAPER_FID = {"linear": 90.52, "sigmoid": 75.19}


def run(out, quick=False, data=None, fid_weights=None) -> common.Section:
  linear = DIFFUSION_PRESETS["linear-schedule"]
  configs = {"linear": linear, "sigmoid": dataclasses.replace(linear, schedule="sigmoid")}
  rows, runs = [], []
  for name, config in configs.items():
    r = common.train_diffusion_run(out, f"{name}-schedule", config, quick, data)
    runs.append(r)
    fid, note = common.fid_of_run(r.workdir, fid_weights, quick)
    rows.append((name, f"{PAPER_FID[name]:.2f}", common.fid_text(fid, note),
                 f"{r.summary['final_loss']:.4f}"))
  return common.Section("Noise schedules (section 4)",
                        common.table(("schedule", "paper FID", "our FID", "final train loss"), rows),
                        runs=runs)


def main():
  p = common.parser(__doc__)
  p.add_argument("--fid-weights", help="pt_inception-2015-12-05 weights (.pth or .npz)")
  args = p.parse_args()
  common.print_section(run(args.out, args.quick, args.data, args.fid_weights))


if __name__ == "__main__":
  common.run_script(main)
