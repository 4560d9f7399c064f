"""The code of README's "Use as a library" section runs as written."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def library_blocks() -> list[str]:
  text = README.read_text()
  section = text.split("## Use as a library", 1)[1].split("\n## ", 1)[0]
  return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def run_block(index, monkeypatch, tmp_path):
  monkeypatch.chdir(tmp_path)  # blocks write runs/ where they run
  namespace = {"__name__": f"readme_block_{index}"}
  exec(compile(library_blocks()[index], f"README.md:library:{index}", "exec"), namespace)
  return namespace


def test_readme_has_the_three_examples():
  assert len(library_blocks()) == 3


def test_custom_block_classifier(monkeypatch, tmp_path):
  ns = run_block(0, monkeypatch, tmp_path)
  summary = ns["summary"]
  assert summary["steps"] == 4 and summary["model"] == "Classifier"
  assert any("FireBlock_0" in str(k) for k in ns["state"].params)
  assert int(ns["state"].step) == 4


def test_custom_schedule_sampler(monkeypatch, tmp_path):
  ns = run_block(1, monkeypatch, tmp_path)
  assert ns["images"].shape == (4, 32, 32, 3)
  assert ns["schedule"].num_timesteps == 100


def test_fid_of_arrays(monkeypatch, tmp_path, fid_weights_path):
  monkeypatch.setenv("CIFARJAX_FID_WEIGHTS", str(fid_weights_path))
  run_block(2, monkeypatch, tmp_path)
