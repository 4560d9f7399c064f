"""The `cifarjax` command line: a thin layer over the library.

Each group of subcommands lives in `cifarjax/commands/<group>.py` and exposes
`register(subparsers)`; a subcommand's parser sets `func(args) -> int|None`.
"""

import argparse
import importlib
import sys

# Imported lazily so that `cifarjax --help` does not pay for importing JAX.
COMMAND_MODULES = (
    "cifarjax.commands.classifier",
    "cifarjax.commands.info",
    "cifarjax.commands.fid",
    "cifarjax.commands.diffusion",
)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="cifarjax",
      description="Efficient CIFAR-100 modelling in JAX: classifier, diffusion generator, FID.")
  subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
  for name in COMMAND_MODULES:
    try:
      module = importlib.import_module(name)
    except ModuleNotFoundError as e:
      if e.name == name:  # group not written yet
        continue
      raise
    module.register(subparsers)
  return parser


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  try:
    return args.func(args) or 0
  except (ValueError, FileNotFoundError, FloatingPointError, KeyError) as e:
    # Library errors carry a message meant for the user; a traceback adds nothing.
    print(f"cifarjax {args.command}: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
