"""The documentation's commands run: every example that `--help` prints (`e.g. --flag value`)
and every `cifarjax` command line in README.md, with tiny settings (synthetic data, two
steps of small batches, the tiny U-Net) added after its own flags; README's synopsis names
only commands, flags and choices that the parser has. So neither can drift from the code.
"""

import argparse
import contextlib
import io
import pathlib
import re
import shlex

import numpy as np
import pytest

from cifarjax import cli
from cifarjax.data import DATASET_NAMES

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PARSER = cli.build_parser()
SUBPARSERS = next(a for a in PARSER._actions if isinstance(a, argparse._SubParsersAction)).choices
# Added after a command line's own flags (argparse keeps the last value of a flag).
TINY = {
    "train-classifier": ["--data", "synthetic", "--steps", "2", "--batch-size", "8",
                         "--log-every", "1", "--eval-every", "2", "--checkpoint-every", "2",
                         "--set", "eval_batch_size=64", "--set", "train_eval_size=64",
                         "--set", "warmup_steps=1"],
    "train-diffusion": ["--data", "synthetic", "--steps", "2", "--batch-size", "8", "--unet",
                        "tiny", "--log-every", "1", "--eval-every", "2", "--checkpoint-every",
                        "2", "--set", "eval_batch_size=8"],
    "sample": ["--num", "2", "--batch-size", "2"],
    "eval-diffusion": ["--num", "2", "--batch-size", "2"],
}
# A --steps-per-call example needs cadences it divides.
FUSED = ["--steps", "{k}", "--log-every", "{k}", "--eval-every", "{k}", "--checkpoint-every", "{k}"]


def call(argv) -> tuple[int, str]:
  err = io.StringIO()
  with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
    code = cli.main([str(a) for a in argv])
  return code, err.getvalue()


def help_examples() -> list[list[str]]:
  """[command, flags...] of each `e.g. --flag value ...` in a command's --help."""
  examples = []
  for command, parser in SUBPARSERS.items():
    # The help strings as written (--help's wrapping may break a flag at its hyphen); a
    # callable one lists the registered names when shown.
    helps = [a.help() if callable(a.help) else a.help or "" for a in parser._actions]
    text = " ".join([parser.description or "", *helps])
    for match in re.finditer(r"e\.g\. ((?:--[\w-]+ [^\s;:,)-][^\s;:,)]*\s?)+)", text):
      examples.append([command, *match.group(1).split()])
  return examples


def readme_lines() -> list[str]:
  """README's `cifarjax ...` lines: code-block lines (after a `pip install ... &&`) and inline
  code spans, whitespace made single; a span that starts with a command's name and a flag
  (`sample --sampler ...`) is one too. A block that imports a module of README's
  (`--import my_variants`) is left to tests/test_library_use.py, which writes the module."""
  blocks = [b for b in re.findall(r"```\w*\n(.*?)```", README, re.S) if "--import " not in b]
  lines = [line.split("&& ")[-1] for block in blocks for line in block.splitlines()]
  prose = re.sub(r"```\w*\n.*?```", "", README, flags=re.S)
  spans = [" ".join(s.split()) for s in re.findall(r"`([^`]+)`", prose)]
  spans = [f"cifarjax {s}" if s.split()[0] in SUBPARSERS and " --" in s else s for s in spans]
  lines = [line for line in lines + spans if line.startswith("cifarjax ")]
  return sorted({line for line in lines if not line.split()[1].endswith(":")})  # no messages


def is_pattern(line: str) -> bool:
  """A synopsis or a line with placeholders (FILE.npz, DIR): checked, not run."""
  return "[" in line or bool(re.search(r"\b[A-Z]{2,}\b", line))


def test_help_examples_are_found():
  found = {tuple(e) for e in help_examples()}
  assert ("train-classifier", "--set", "learning_rate=0.001", "--set",
          "augment.crop_prob=0.5") in found
  assert ("train-diffusion", "--steps-per-call", "50") in found
  assert ("sample", "--sampler", "ddim", "--steps", "50") in found
  assert len(found) == 6  # --set and --steps-per-call of each trainer; sample, eval-diffusion


def test_readme_lines_are_found():
  lines = readme_lines()
  assert "cifarjax sample --sampler dpm++2m --steps 20" in lines
  assert "cifarjax train-classifier --workdir runs/classifier" in lines
  assert sum(line.startswith("cifarjax train-") and "[" in line for line in lines) == 2


@pytest.mark.parametrize("line", [line for line in readme_lines() if is_pattern(line)])
def test_readme_synopsis_names_what_the_parser_has(line):
  command, *rest = line.split()[1:]
  if command.startswith("--"):  # cifarjax --version
    return
  assert command in SUBPARSERS or command == "COMMAND", line
  if command == "COMMAND":
    return
  parser = SUBPARSERS[command]
  nested = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
  if nested:  # fid-weights install ...
    action, *rest = rest
    assert action in nested[0].choices, line
    parser = nested[0].choices[action]
  options = {s: a for a in parser._actions for s in a.option_strings}
  for flag, value in re.findall(r"(--[\w-]+)(?: ([^\s\]]+))?", " ".join(rest)):
    assert flag in options, f"{line}: {flag}"
    choices = options[flag].choices
    if value and "|" in value and choices is not None:
      assert value.split("|") == list(choices), f"{line}: {flag}"
  if command == "bench":
    from cifarjax.commands.info import BENCHMARK_NAMES
    assert re.findall(r"\[(\w+)\]", line) == list(BENCHMARK_NAMES)
  if "--preset" in line:
    from cifarjax.config import CLASSIFIER_PRESETS, DIFFUSION_PRESETS
    presets = CLASSIFIER_PRESETS if command == "train-classifier" else DIFFUSION_PRESETS
    assert re.search(r"--preset ([\w|-]+)", line).group(1).split("|") == list(presets)


@pytest.fixture(scope="module")
def generator(tmp_path_factory):
  """A tiny generator run (T = 1,000, two steps), for the sampling examples."""
  workdir = tmp_path_factory.mktemp("examples") / "generator"
  code, err = call(["train-diffusion", "--preset", "improved", *TINY["train-diffusion"],
                    "--workdir", workdir])
  assert code == 0, err
  return workdir


@pytest.fixture
def fake_inception(monkeypatch, tmp_path):
  """Random features instead of Inception's, and a weights file that is never read."""
  from cifarjax.fid import features, sources
  monkeypatch.setattr(features, "extract_features", lambda images, *a, **k: np.random.default_rng(
      len(images)).normal(size=(len(images), 8)).astype(np.float32))
  monkeypatch.setattr(sources, "as_variables", lambda weights: {})
  weights = tmp_path / "weights.npz"
  weights.write_bytes(b"never read")
  return weights


def run(argv, tmp_path, generator, weights) -> tuple[int, str]:
  """argv (a command line's, without `cifarjax`) with the tiny settings, in tmp_path."""
  command = argv[0]
  extra = list(TINY.get(command, []))
  if command.startswith("train-") and "--steps-per-call" in argv:
    k = argv[argv.index("--steps-per-call") + 1]
    extra += [a.format(k=k) for a in FUSED]
  if command.startswith("train-") and "--workdir" not in argv:
    extra += ["--workdir", tmp_path / "run"]
  if command in ("sample", "eval-diffusion"):
    extra += ["--workdir", generator]
  if command == "sample":
    extra += ["--out", tmp_path / "samples.npz"]
  if command == "eval-diffusion":
    extra += ["--weights", weights]
  return call([*argv, *extra])


RUN = ("train-classifier", "train-diffusion", "sample", "eval-diffusion", "info")


@pytest.mark.integration
@pytest.mark.parametrize("argv", help_examples(), ids=" ".join)
def test_help_examples_run(argv, tmp_path, generator, fake_inception, monkeypatch):
  monkeypatch.chdir(tmp_path)
  code, err = run(argv, tmp_path, generator, fake_inception)
  assert code == 0, err


@pytest.mark.integration
@pytest.mark.parametrize("line", [line for line in readme_lines() if not is_pattern(line)])
def test_readme_command_lines_run(line, tmp_path, generator, fake_inception, monkeypatch):
  argv = shlex.split(line)[1:]
  if argv == ["--version"]:
    with pytest.raises(SystemExit) as done, contextlib.redirect_stdout(io.StringIO()):
      cli.main(argv)
    assert done.value.code == 0
    return
  if "--data" in argv:
    data = argv[argv.index("--data") + 1]
    if data not in DATASET_NAMES and (ROOT.parent / "shared").is_dir():
      assert (ROOT / data).exists(), f"{line}: no {data} beside the checkout"
  if argv[0] not in RUN:
    PARSER.parse_args(argv)  # bench: each benchmark compiles for minutes; parsing checks it
    return
  monkeypatch.chdir(tmp_path)
  code, err = run(argv, tmp_path, generator, fake_inception)
  assert code == 0, err
