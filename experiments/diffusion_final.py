"""Section 6: the final generator (sigmoid schedule, batch 256, 50,000 steps): its FID
(paper: 58.00 with 996,863 parameters), a grid of non-cherry-picked samples (a row per
class) and an interpolation between two test images (section 4's recipe).

  python experiments/diffusion_final.py --out runs/final [--fid-weights W] [--quick]
"""

import pathlib

import jax
import numpy as np

import common
from cifarjax import generate, image_grid
from cifarjax.config import DIFFUSION_PRESETS
from cifarjax.data import load_split

PAPER = {"fid": 58.00, "params": 996_863}
GRID_CLASSES, GRID_PER_CLASS = 10, 10
SAMPLE_STEPS = 50  # DDIM steps for the figures (FID uses the paper's DDPM sampler)


def sample_grid(workdir, out, quick):
  per_class = 2 if quick else GRID_PER_CLASS
  labels = np.repeat(np.arange(GRID_CLASSES), per_class)
  images = generate.generate(workdir, labels, "ddim", 4 if quick else SAMPLE_STEPS, progress=False)
  path = pathlib.Path(out) / "samples.png"
  if jax.process_index() == 0:  # every process samples (one sharded computation); one writes
    image_grid.write_grid(path, images, labels, scale=2)
  return path


def interpolation(workdir, config, out, quick):
  """Frames between the first two test images of different classes."""
  test = load_split(config.data, "test", holdout=config.holdout)
  a = 0
  b = int(np.flatnonzero(test.labels != test.labels[a])[0])
  frames, _ = generate.interpolate(workdir, test.images[a], int(test.labels[a]), test.images[b],
                                   int(test.labels[b]), frames=4 if quick else 8,
                                   steps=4 if quick else SAMPLE_STEPS)
  path = pathlib.Path(out) / "interpolation.png"
  if jax.process_index() == 0:
    image_grid.write_strip(path, frames)
  return path


def run(out, quick=False, data=None, fid_weights=None) -> common.Section:
  r = common.train_diffusion_run(out, "final", DIFFUSION_PRESETS["paper"], quick, data)
  fid, note = common.fid_of_run(r.workdir, fid_weights, quick)
  rows = [("FID", f"{PAPER['fid']:.2f}", common.fid_text(fid, note)),
          ("parameters", f"{PAPER['params']:,}", f"{r.summary['num_params']:,}"),
          ("final train loss", "n/a", f"{r.summary['final_loss']:.4f}")]
  figures = [sample_grid(r.workdir, out, quick), interpolation(r.workdir, r.config, out, quick)]
  return common.Section("Final generator (section 6)", common.table(("", "paper", "ours"), rows),
                        figures=figures, runs=[r])


def main():
  p = common.parser(__doc__)
  p.add_argument("--fid-weights", help="pt_inception-2015-12-05 weights (.pth or .npz)")
  args = p.parse_args()
  common.print_section(run(args.out, args.quick, args.data, args.fid_weights))


if __name__ == "__main__":
  common.run_script(main)
