"""Fig. 4: train/test accuracy and loss against steps, drawn from a run's metrics.jsonl.

  python experiments/training_graph.py --workdir runs/baseline/baseline-seed0 --out fig4.png
"""

import argparse
import pathlib

import jax

import common
from cifarjax import plots


def run(workdir, out) -> common.Section:
  path = pathlib.Path(out)
  if jax.process_index() == 0:
    plots.training_graph(workdir, path)
  return common.Section("Training graph (Fig. 4)", f"From `{workdir}/metrics.jsonl`.",
                        figures=[path])


def main():
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--workdir", required=True, help="a classifier run")
  p.add_argument("--out", required=True, help="the .png to write")
  args = p.parse_args()
  common.print_section(run(args.workdir, args.out))


if __name__ == "__main__":
  main()
