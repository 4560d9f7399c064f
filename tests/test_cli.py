"""The command line's promises: bad input is caught before work starts and
reported in one line (exit 2) with the workdir untouched; long phases say what they do;
Ctrl-C saves and says how to resume (exit 130); outputs are readable.

Everything runs through `cli.main(argv)` in-process. One tiny classifier run (module
fixture `classifier_run`) serves the tests that need a trained workdir; a generator
workdir is made from an untrained tiny U-Net (`generator_dir`), and the FID tests stand
in fast fakes for the Inception features, so the file needs no weights.
"""

import contextlib
import importlib
import io
import json
import os
import platform
import re
import signal
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from PIL import Image

from cifarjax import checkpoint, cli, config as config_lib, run as run_lib, runlog
from cifarjax.config import (CLASSIFIER_PRESETS, DIFFUSION_PRESETS, ClassifierConfig,
                             DiffusionConfig)
from cifarjax.kinds import CLASSIFIER, GENERATOR


def call(*argv):
  """(exit code, stdout, stderr) of `cifarjax argv...`."""
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    code = cli.main([str(a) for a in argv])
  return code, out.getvalue(), err.getvalue()


def error_of(err: str, command: str) -> str:
  """The single error line of a command that failed on a user mistake."""
  assert "Traceback" not in err, err
  lines = [line for line in err.splitlines() if line.startswith(f"cifarjax {command}: error: ")]
  assert len(lines) == 1, err
  return lines[0]


def png_bytes(size=32, seed=0) -> bytes:
  rng = np.random.default_rng(seed)
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
  return buf.getvalue()


def image_zip(path, classes=5, per_class=8, size=32, extra=None):
  """A zip of train/<class>/<i>.png only (so a held-out slice of train stands in for test)."""
  with zipfile.ZipFile(path, "w") as zf:
    for c in range(classes):
      for i in range(per_class):
        zf.writestr(f"train/class_{c}/{i}.png", png_bytes(size, seed=c * 100 + i))
    for name, data in (extra or {}).items():
      zf.writestr(name, data)
  return path


TRAIN = ("--steps", 3, "--batch-size", 8, "--log-every", 1, "--eval-every", 3,
         "--checkpoint-every", 3, "--holdout", 10)


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory):
  """Runs, from a folder of its own with a relative --data: a start with --batch-size 0
  (refused), a start that Ctrl-C stops at step 1, and the same command again (resumes)."""
  root = tmp_path_factory.mktemp("cli_run")
  image_zip(root / "data.zip")
  record = {"root": root, "workdir": root / "run"}
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
  with pytest.MonkeyPatch.context() as mp:
    mp.chdir(root)
    record["zero"] = call("train-classifier", "--data", "data.zip", *TRAIN,
                          "--batch-size", 0, "--workdir", "run")
    record["zero_left"] = (root / "run").exists()

    original = runlog.MetricsLog.write
    def write_then_ctrl_c(self, rec):  # Ctrl-C right after the first logged step
      original(self, rec)
      if rec.get("step") == 1 and "loss" in rec:
        signal.raise_signal(signal.SIGINT)
    mp.setattr(runlog.MetricsLog, "write", write_then_ctrl_c)
    record["interrupted"] = call("train-classifier", "--data", "data.zip", *TRAIN,
                                 "--workdir", "run")
    mngr = checkpoint.manager(root / "run", None)
    record["steps_saved"] = list(mngr.all_steps())
    mngr.close()
    mp.setattr(runlog.MetricsLog, "write", original)
    record["resumed"] = call("train-classifier", "--data", "data.zip", *TRAIN,
                             "--workdir", "run")
  signal.signal(signal.SIGINT, previous)
  return record


@pytest.fixture(scope="module")
def generator_dir(tmp_path_factory):
  """A generator workdir (tiny U-Net, T=10, synthetic data) holding an untrained checkpoint."""
  from cifarjax import train_diffusion as td
  workdir = tmp_path_factory.mktemp("generator")
  config = DiffusionConfig(data="synthetic", unet="tiny", num_timesteps=10)
  run_lib.save_json(config, workdir / "config.json")
  runlog.write_json(workdir / "classes.json", [f"class_{i}" for i in range(10)])
  tx, _ = td.make_optimizer(config, 1)
  mngr = checkpoint.manager(workdir, None)
  checkpoint.save(mngr, 0, GENERATOR.init_state(td.make_unet(config, 10), tx, config.seed,
                                               ema=True))
  mngr.close()
  return workdir


# --- Values checked before the workdir is touched ----------------------------------------


@pytest.mark.parametrize("command", ["train-classifier", "train-diffusion"])
def test_negative_steps_are_refused_before_anything_is_written(tmp_path, command):
  code, out, err = call(command, "--data", "synthetic", "--steps", -5,
                        "--workdir", tmp_path / "run")
  assert code == 2 and out == ""
  assert error_of(err, command).endswith("--steps must be positive, got -5")
  assert not (tmp_path / "run").exists()


@pytest.mark.integration
def test_batch_size_zero_leaves_no_workdir_and_the_corrected_run_works(classifier_run):
  code, _, err = classifier_run["zero"]
  assert code == 2
  assert error_of(err, "train-classifier").endswith("--batch-size must be positive, got 0")
  assert not classifier_run["zero_left"]
  code, out, _ = classifier_run["resumed"]  # the corrected command, same workdir
  assert code == 0 and json.loads(out)["steps"] == 3


def test_batch_larger_than_the_data_is_refused_before_the_workdir(tmp_path):
  code, _, err = call("train-diffusion", "--data", "synthetic", "--unet", "tiny",
                      "--batch-size", 100_000, "--workdir", tmp_path / "run")
  assert code == 2 and "--batch-size 100000 exceeds the 2560" in error_of(err, "train-diffusion")
  assert not (tmp_path / "run").exists()


def test_a_start_that_fails_leaves_no_config_behind(tmp_path, monkeypatch):
  from cifarjax import train_classifier
  def broken(*args, **kwargs):
    raise RuntimeError("compiler crashed")
  monkeypatch.setattr(train_classifier, "make_train_step", broken)
  with pytest.raises(RuntimeError, match="compiler crashed"):  # a bug keeps its traceback
    call("train-classifier", "--data", "synthetic", "--steps", 2, "--workdir", tmp_path / "run")
  assert not (tmp_path / "run").exists()  # so the rerun does not meet "another config"


# --- Data checked at load ----------------------------------------------------------------


@pytest.mark.parametrize("command", ["train-classifier", "train-diffusion"])
def test_images_of_another_size_are_refused(tmp_path, command):
  data = image_zip(tmp_path / "big.zip", size=40)
  code, _, err = call(command, "--data", data, *TRAIN, "--workdir", tmp_path / "run")
  assert code == 2
  line = error_of(err, command)
  assert "40x40" in line and "32x32" in line and str(data) in line
  assert not (tmp_path / "run").exists()


@pytest.mark.integration
def test_fewer_than_five_classes_trains_and_reports_no_top5(tmp_path):
  data = image_zip(tmp_path / "three.zip", classes=3)
  code, out, err = call("train-classifier", "--data", data, *TRAIN, "--holdout", 4,
                        "--batch-size", 4, "--workdir", tmp_path / "run")
  assert code == 0, err
  summary = json.loads((tmp_path / "run" / "summary.json").read_text())
  assert summary["final_test_top5"] is None  # top-5 of 3 classes would be trivially 1
  assert 0 <= summary["final_test_accuracy"] <= 1
  code, out, err = call("train-classifier", "--data", image_zip(tmp_path / "one.zip", classes=1),
                        *TRAIN, "--holdout", 2, "--batch-size", 4, "--workdir", tmp_path / "one")
  assert code == 2 and "1 class(es)" in error_of(err, "train-classifier")
  assert not (tmp_path / "one").exists()


# --- Absolute paths in saved configs -----------------------------------------------------


@pytest.mark.integration
def test_relative_data_is_saved_absolute_and_evaluates_from_elsewhere(classifier_run,
                                                                       tmp_path, monkeypatch):
  root, workdir = classifier_run["root"], classifier_run["workdir"]
  saved = runlog.read_json(workdir / "config.json")["data"]
  assert saved == str(root / "data.zip")
  monkeypatch.chdir(tmp_path)
  code, out, err = call("eval-classifier", "--workdir", workdir, "--json")
  assert code == 0, err
  result = json.loads(out)
  assert result["num_examples"] == 10 and result["step"] == 3  # the held-out slice


@pytest.mark.integration
def test_a_resume_with_other_settings_names_their_flags(classifier_run, monkeypatch):
  """The trainer's refusal names config fields; the command line words them as its flags."""
  monkeypatch.chdir(classifier_run["root"])
  code, out, err = call("train-classifier", "--data", "data.zip", *TRAIN, "--batch-size", 4,
                        "--set", "dropout=0.1", "--workdir", "run")
  assert code == 2 and out == ""
  assert error_of(err, "train-classifier").endswith(
      "(batch_size, dropout differ: --batch-size: 8 there, 4 now; config field dropout: 0.0 "
      "there, 0.1 now); use another --workdir, or the same settings to resume")


@pytest.mark.integration
def test_eval_classifier_picks_the_weights_with_weights_from_and_the_old_name(classifier_run,
                                                                             capsys):
  workdir = classifier_run["workdir"]
  code, out, err = call("eval-classifier", "--workdir", workdir, "--weights-from", "raw", "--json")
  assert code == 0 and json.loads(out)["weights"] == "raw" and "warning" not in err, err
  code, old_out, err = call("eval-classifier", "--workdir", workdir, "--weights", "raw", "--json")
  assert code == 0 and json.loads(old_out) == json.loads(out)
  assert "cifarjax eval-classifier: warning: --weights is now --weights-from" in err
  with pytest.raises(SystemExit) as info:
    cli.main(["eval-classifier", "--workdir", str(workdir), "--weights-from", "best"])
  assert info.value.code == 2
  assert "argument --weights-from: invalid choice: 'best'" in capsys.readouterr().err


# --- eval-diffusion's reference ----------------------------------------------------------


@pytest.fixture
def stand_in_generator(tmp_path, monkeypatch, fake_inception):
  """(workdir, data, weights, seen, guidance): a generator workdir over a 40-image zip (10
  held out) whose sampling returns black images and records each call's guidance, with
  `fake_inception`'s features (`seen`: the images each extraction got)."""
  from types import SimpleNamespace
  from cifarjax import generate
  seen, weights = fake_inception
  data = image_zip(tmp_path / "data.zip")  # 40 images, train only
  workdir = tmp_path / "gen"
  workdir.mkdir()
  config = DiffusionConfig(data=str(data), holdout=10, unet="tiny", num_timesteps=10,
                           label_dropout=0.1)
  run_lib.save_json(config, workdir / "config.json")
  runlog.write_json(workdir / "classes.json", [f"class_{i}" for i in range(5)])
  monkeypatch.setattr(run_lib.Workdir, "trained",
                      lambda run, mesh: (None, SimpleNamespace(step=7)))
  guidance = []

  def black_images(workdir, labels, sampler, steps, w, *args, **kwargs):
    guidance.append(w)
    return np.zeros((len(labels), 32, 32, 3), np.uint8)

  monkeypatch.setattr(generate, "generate", black_images)
  return workdir, data, weights, seen, guidance


def test_eval_diffusion_names_its_reference_and_leaves_out_the_held_out_images(
    tmp_path, stand_in_generator):
  workdir, data, weights, seen, _ = stand_in_generator
  code, out, err = call("eval-diffusion", "--workdir", workdir, "--num", 4, "--sampler", "ddim",
                        "--steps", 2, "--weights", weights)
  assert code == 0, err
  assert seen == [30, 4]  # the reference: 40 images less the 10 held out; then the samples
  assert f"FID reference: the 30 training images of {data}" in err
  assert "held out for testing left out" in err
  cached = list((tmp_path / "cache" / "fid_stats").glob("*.npz"))
  assert len(cached) == 1 and "train-holdout10" in cached[0].name

  stats = tmp_path / "stats.npz"
  np.savez(stats, mu=np.zeros(600), sigma=np.eye(600))
  code, out, err = call("eval-diffusion", "--workdir", workdir, "--num", 4, "--sampler", "ddim",
                        "--steps", 2, "--weights", weights, "--reference", stats)
  assert code == 0, err
  assert seen == [30, 4, 4]  # the stats file is used as it is
  assert f"FID reference: the statistics in {stats}, used as they are" in err
  assert list((tmp_path / "cache" / "fid_stats").glob("*.npz")) == cached  # not copied


def test_eval_diffusion_samples_with_the_guidance_it_is_given(tmp_path, stand_in_generator):
  workdir, _, weights, seen, guidance = stand_in_generator
  argv = ("eval-diffusion", "--workdir", workdir, "--num", 4, "--sampler", "ddim", "--steps", 2,
          "--weights", weights, "--json")
  for bad in ("-1", "nan"):
    code, out, err = call(*argv, "--guidance", bad)
    assert code == 2
    assert error_of(err, "eval-diffusion").endswith(
        f"guidance must be a non-negative number, got {float(bad)}")
  # Refused before the reference statistics (an hour for 45,000 images) and any sampling.
  assert seen == [] and guidance == [] and not (tmp_path / "cache").exists()

  code, out, err = call(*argv, "--guidance", 3)
  assert code == 0, err
  assert guidance == [3.0]
  assert json.loads(out.splitlines()[-1])["fid_guidance"] == 3.0
  assert runlog.read_json(workdir / "summary.json")["fid_guidance"] == 3.0
  code, out, err = call(*argv)
  assert code == 0, err
  assert guidance == [3.0, 0.0]  # unguided by default
  assert json.loads(out.splitlines()[-1])["fid_guidance"] == 0.0


# --- One-point series are drawn ----------------------------------------------------------


def _pixels_of(png, rgb) -> int:
  a = np.asarray(Image.open(png).convert("RGB")).astype(int)
  return int((np.abs(a - np.array(rgb)).sum(-1) < 60).sum())


@pytest.mark.integration
def test_one_point_series_show_in_both_figures(classifier_run, tmp_path):
  from cifarjax import plots
  # The run evaluated once (step 3): its train/test accuracy series hold one point each.
  graph = classifier_run["workdir"] / "training_graph.png"
  green = (0x2C, 0xA0, 0x2C)  # matplotlib's third colour: test loss / test accuracy
  assert _pixels_of(graph, green) > 150  # a legend line alone has about 70
  (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 3, "loss": 1.0}) + "\n")
  blue = (0x1F, 0x77, 0xB4)  # the first colour: the generator's train batch loss
  assert _pixels_of(plots.generator_graph(tmp_path), blue) > 110  # its legend line alone: 77


# --- Ordinary mistakes without tracebacks ------------------------------------------------


def test_a_truncated_zip_is_named(tmp_path):
  data = image_zip(tmp_path / "data.zip")
  data.write_bytes(data.read_bytes()[:3000])
  code, _, err = call("train-classifier", "--data", data, "--workdir", tmp_path / "run")
  assert code == 2
  line = error_of(err, "train-classifier")
  assert str(data) in line and "truncated or corrupt" in line
  assert not (tmp_path / "run").exists()


def test_truncated_weights_are_named(tmp_path):
  images = tmp_path / "images.npz"
  np.savez(images, images=np.zeros((2, 32, 32, 3), np.uint8))
  weights = tmp_path / "weights.npz"
  np.savez(weights, a=np.zeros(1000))
  weights.write_bytes(weights.read_bytes()[:500])
  code, _, err = call("fid-stats", images, "--out", tmp_path / "o.npz", "--weights", weights)
  assert code == 2
  line = error_of(err, "fid-stats")
  assert f"FID weights file {weights} is not a readable .npz (truncated or corrupt?)" in line


def test_a_workdir_that_is_a_file_is_refused_and_kept(tmp_path):
  path = tmp_path / "notes.txt"
  path.write_text("keep me")
  code, _, err = call("train-classifier", "--data", "synthetic", "--workdir", path)
  assert code == 2 and f"--workdir {path} is a file" in error_of(err, "train-classifier")
  assert path.read_text() == "keep me"
  code, _, err = call("eval-classifier", "--workdir", path)
  assert code == 2 and "is a file" in error_of(err, "eval-classifier")


@pytest.mark.integration
def test_ctrl_c_saves_and_says_how_to_resume(classifier_run):
  code, _, err = classifier_run["interrupted"]
  assert code == 130 and "Traceback" not in err
  assert classifier_run["steps_saved"] == [1]  # the checkpoint Ctrl-C asked for
  assert "cifarjax train-classifier: interrupted at step 1 of 3; checkpoint saved. " \
         "Run the same command to resume." in err.splitlines()


# --- Messages that say what is wrong -----------------------------------------------------


def test_an_empty_weights_npz_is_not_called_a_torch_file(tmp_path):
  images = tmp_path / "images.npz"
  np.savez(images, images=np.zeros((2, 32, 32, 3), np.uint8))
  weights = tmp_path / "empty.npz"
  np.savez(weights)
  code, _, err = call("fid-stats", images, "--out", tmp_path / "o.npz", "--weights", weights)
  line = error_of(err, "fid-stats")
  assert code == 2 and "holds no arrays" in line and "torch.save" not in line.split("expected")[0]


def test_run_kinds_are_named_for_people(tmp_path):
  run_lib.save_json(ClassifierConfig(), tmp_path / "config.json")
  runlog.write_json(tmp_path / "classes.json", ["a", "b"])
  code, _, err = call("sample", "--workdir", tmp_path, "--num", 2, "--out", tmp_path / "x.npz")
  line = error_of(err, "sample")
  assert code == 2 and "holds a classifier (train-classifier) run" in line
  assert "Config" not in line
  code, _, err = call("train-diffusion", "--data", "synthetic", "--workdir", tmp_path)
  line = error_of(err, "train-diffusion")
  assert code == 2 and "generator (train-diffusion)" in line and "Config" not in line


def test_tfds_message_names_no_missing_subfolder(tmp_path, caplog):
  from cifarjax.data.tfds_source import TfdsUnavailableError, load_tfds
  missing = tmp_path / "nowhere"
  with pytest.raises(TfdsUnavailableError) as info:
    load_tfds("cifar100", "train", data_dir=missing, download=False)
  assert f"in {missing}, which does not exist" in str(info.value)
  assert "cifar100/" not in str(info.value)  # not tfds's versioned subfolder
  assert not [r for r in caplog.records if "dataset_info.json" in r.getMessage()]


def test_a_bad_jpeg_is_named_without_an_object_address(tmp_path):
  data = image_zip(tmp_path / "data.zip", extra={"train/class_0/broken.jpg": b"not a jpeg"})
  code, _, err = call("train-classifier", "--data", data, "--workdir", tmp_path / "run")
  line = error_of(err, "train-classifier")
  assert code == 2 and "broken.jpg" in line and "0x" not in line


def test_a_custom_model_checkpoint_gives_a_short_error(tmp_path):
  import flax.linen as nn
  from cifarjax import train_classifier as tc

  class Small(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
      x = nn.BatchNorm(use_running_average=not train)(nn.Conv(4, (3, 3))(x))
      return nn.Dense(10)(x.mean((1, 2)))

  config = ClassifierConfig(data="synthetic")
  run_lib.save_json(config, tmp_path / "config.json")
  runlog.write_json(tmp_path / "classes.json", [f"class_{i}" for i in range(10)])
  runlog.write_json(tmp_path / "summary.json", {"model": "Small"})
  tx, _ = tc.make_optimizer(config, 1)
  mngr = checkpoint.manager(tmp_path, None)
  checkpoint.save(mngr, 1, CLASSIFIER.init_state(Small(), tx, 0))
  mngr.close()
  code, _, err = call("eval-classifier", "--workdir", tmp_path)
  line = error_of(err, "eval-classifier")
  assert code == 2 and len(line) < 400
  assert "custom model (Small)" in line and "load_trained(workdir, model=" in line


def test_sample_steps_zero_names_the_flag(generator_dir, tmp_path):
  code, _, err = call("sample", "--workdir", generator_dir, "--num", 2, "--sampler", "ddim",
                      "--steps", 0, "--out", tmp_path / "x.npz")
  assert code == 2 and error_of(err, "sample").endswith("--steps must be positive, got 0")


# --- Long phases say what they do; checks come before loads ------------------------------


@pytest.mark.integration
def test_training_phases_and_resume_are_announced(classifier_run):
  _, _, first = classifier_run["interrupted"]
  assert "cifarjax train-classifier: loading " in first
  assert "30 training and 10 test images of 5 classes" in first
  assert "starting at step 0 of 3\n" in first
  assert "cifarjax train-classifier: compiling the train step (seconds to minutes)" in first
  assert "cifarjax train-classifier: compiled in " in first
  _, _, second = classifier_run["resumed"]
  assert "cifarjax train-classifier: resuming from step 1 of 3" in second
  assert "classifier (evaluating)" in second  # the bar says what it waits for


def test_labels_and_steps_are_checked_before_the_model_loads(generator_dir, tmp_path,
                                                                monkeypatch):
  from cifarjax import generate
  def no_load(*args, **kwargs):
    raise AssertionError("the model must not load for a bad flag")
  monkeypatch.setattr(run_lib.Workdir, "trained", no_load)
  code, _, err = call("sample", "--workdir", generator_dir, "--num", 2, "--labels", "3,99",
                      "--out", tmp_path / "x.npz")
  assert code == 2 and "label 99 is outside the model's 10 classes" in error_of(err, "sample")
  code, _, err = call("sample", "--workdir", generator_dir, "--num", 2, "--sampler", "ddim",
                      "--steps", 11, "--out", tmp_path / "x.npz")
  assert code == 2 and "at most the model's 10 timesteps" in error_of(err, "sample")
  code, _, err = call("interpolate", "--workdir", generator_dir, "--data", "synthetic",
                      "--a", 0, "--b", 1, "--frames", 1, "--out", tmp_path / "x.png")
  assert code == 2 and "--frames must be at least 2" in error_of(err, "interpolate")


def test_interpolation_says_what_it_does_and_shows_its_sources(generator_dir, tmp_path):
  out = tmp_path / "strip.png"
  code, stdout, err = call("interpolate", "--workdir", generator_dir, "--data", "synthetic",
                           "--a", 0, "--b", 1, "--frames", 2, "--steps", 2, "--out", out)
  assert code == 0, err
  assert "cifarjax interpolate: loading the generator" in err
  assert "2 DDIM steps to invert the two images" in err
  strip = np.asarray(Image.open(out))
  # a (2 + 64 + 2), 8 apart from the 2 frames (2 + 2 * (64 + 2)), 8 apart from b (2 + 64 + 2)
  assert strip.shape == (68, 68 + 8 + 134 + 8 + 68, 3)
  from cifarjax.data.synthetic import load_synthetic
  a = np.repeat(np.repeat(load_synthetic("train").images[0], 2, 0), 2, 1)
  np.testing.assert_array_equal(strip[2:66, 2:66], a)  # image a itself, at the left end


# --- Long phases show their progress; what needs no data, model or weights comes first ---


def test_sampling_counts_denoising_steps(generator_dir, tmp_path):
  """A DDPM sample of the paper's model runs 1,000 steps per batch: the bar counts steps."""
  for sampler, steps, shown in (("ddpm", (), "20/20"), ("ddim", ("--steps", 3), "6/6")):
    code, _, err = call("sample", "--workdir", generator_dir, "--num", 3, "--batch-size", 2,
                        "--sampler", sampler, *steps, "--out", tmp_path / "x.npz")
    assert code == 0, err
    per_batch = 10 if sampler == "ddpm" else 3
    assert (f"cifarjax sample: sampling 3 images in 2 batch(es) of {per_batch} {sampler} steps"
            in err)
    assert f"sample ({sampler}): 100%" in err and f"| {shown} [" in err


@pytest.mark.parametrize("command", ["eval-classifier", "sample"])
def test_a_run_without_a_checkpoint_is_refused_before_its_model_is_built(tmp_path, monkeypatch,
                                                                         command):
  from cifarjax import trainer
  config = (ClassifierConfig(data="synthetic") if command == "eval-classifier" else
            DiffusionConfig(data="synthetic", unet="tiny", num_timesteps=10))
  run_lib.save_json(config, tmp_path / "config.json")
  runlog.write_json(tmp_path / "classes.json", [f"class_{i}" for i in range(10)])
  def no_model(*args, **kwargs):
    raise AssertionError("no model is built for a run without a checkpoint")
  monkeypatch.setattr(trainer, "init_state", no_model)
  extra = ("--num", 2, "--out", tmp_path / "x.npz") if command == "sample" else ()
  code, _, err = call(command, "--workdir", tmp_path, *extra)
  assert code == 2
  assert f"{tmp_path}/checkpoints holds no checkpoint yet" in error_of(err, command)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["classes.json", "config.json"]


def test_fid_refuses_too_few_images_before_any_features(tmp_path, monkeypatch):
  from cifarjax.fid import features, weights
  def nothing_heavy(*args, **kwargs):
    raise AssertionError("neither weights nor features for a source FID cannot use")
  monkeypatch.setattr(features, "extract_features", nothing_heavy)
  monkeypatch.setattr(weights, "resolve_weights_path", nothing_heavy)
  one, many = tmp_path / "one.npz", tmp_path / "many.npz"
  np.savez(one, images=np.zeros((1, 32, 32, 3), np.uint8))
  np.savez(many, images=np.zeros((20, 32, 32, 3), np.uint8))
  code, _, err = call("fid-stats", one, "--out", tmp_path / "stats.npz")
  assert code == 2 and error_of(err, "fid-stats").endswith(
      f"FID needs at least 2 images; {one} holds 1")
  assert not (tmp_path / "stats.npz").exists()
  code, _, err = call("fid", many, one)  # the first source's features would be wasted
  assert code == 2 and error_of(err, "fid").endswith(f"FID needs at least 2 images; {one} holds 1")


# --- Workdirs that hold other files, whole messages, FID weights installed once ----------


@pytest.mark.parametrize("command", ["train-classifier", "train-diffusion"])
def test_a_folder_of_other_files_is_refused_as_a_workdir(tmp_path, command):
  folder = tmp_path / "photos"
  folder.mkdir()
  (folder / "cat.png").write_bytes(png_bytes())
  (folder / ".DS_Store").write_bytes(b"")  # hidden files are nobody's work
  small = ("--batch-size", 8) + (("--unet", "tiny") if command == "train-diffusion" else ())
  code, out, err = call(command, "--data", "synthetic", "--steps", 2, *small, "--workdir", folder)
  assert code == 2 and out == ""
  assert error_of(err, command).endswith(f"--workdir {folder} holds files but no run (no "
                                         f"config.json): cat.png; name a new or empty folder "
                                         f"for the run")
  assert sorted(p.name for p in folder.iterdir()) == [".DS_Store", "cat.png"]


def test_an_empty_data_folder_is_named_in_a_whole_sentence(tmp_path):
  (tmp_path / "data").mkdir()
  code, _, err = call("train-classifier", "--data", tmp_path / "data", "--workdir",
                      tmp_path / "run")
  assert code == 2 and error_of(err, "train-classifier").endswith(
      f"{tmp_path / 'data'} holds no images laid out <split>/<class>/<image> (as "
      f"train/cat/0001.png)")


def test_a_text_file_named_npz_is_called_what_it_is(tmp_path):
  text = tmp_path / "stats.npz"
  text.write_text("mu sigma\n")
  code, _, err = call("fid-stats", text, "--out", tmp_path / "out.npz")
  line = error_of(err, "fid-stats")
  assert code == 2 and f"FID source {text} is not an .npz: an .npz is a zip" in line
  assert "pickle" not in line


def test_fid_weights_are_installed_once_with_their_sha256_checked(fid_weights_path, tmp_path,
                                                                  monkeypatch):
  import hashlib
  from cifarjax.errors import UserError
  from cifarjax.fid import weights
  monkeypatch.setenv("CIFARJAX_CACHE", str(tmp_path / "cache"))
  monkeypatch.delenv("CIFARJAX_FID_WEIGHTS", raising=False)
  with pytest.raises(FileNotFoundError, match="once with `cifarjax fid-weights install PATH`"):
    weights.resolve_weights_path(download=False)  # the way in is named
  digest = hashlib.sha256(fid_weights_path.read_bytes()).hexdigest()
  not_fid = tmp_path / "other.npz"
  np.savez(not_fid, a=np.zeros(3))
  other = hashlib.sha256(not_fid.read_bytes()).hexdigest()
  for path, flags, message in (
      (fid_weights_path, (), f"has sha256 {digest}, not 6726825d...: that of pytorch-fid's"),
      (fid_weights_path, ("--sha256", "0" * 16), f"has sha256 {digest}, not 0000000000000000"),
      (fid_weights_path, ("--sha256", "f799"), "--sha256 wants 8 or more hex digits"),
      (not_fid, ("--sha256", other), "is not pytorch-fid's FID Inception state dict")):
    code, _, err = call("fid-weights", "install", path, *flags)
    assert code == 2 and message in error_of(err, "fid-weights")
    assert not weights.installed_dir().exists()
  code, out, err = call("fid-weights", "install", fid_weights_path, "--sha256", digest[:12])
  installed = weights.installed_dir() / "inception.npz"
  assert code == 0 and out.startswith(f"installed {installed} (sha256 {digest})"), err
  assert weights.resolve_weights_path() == installed  # what fid, fid-stats, eval-diffusion use
  with open(installed, "r+b") as f:  # a copy changed since: refused, not used
    f.seek(-1, 2)
    last = f.read(1)
    f.seek(-1, 2)
    f.write(bytes([last[0] ^ 1]))
  with pytest.raises(UserError, match="no longer have the sha256 they were installed with"):
    weights.resolve_weights_path()


# --- Readable outputs --------------------------------------------------------------------


def test_the_sample_sheet_is_enlarged_with_class_names(generator_dir, tmp_path):
  out = tmp_path / "samples.npz"
  code, _, err = call("sample", "--workdir", generator_dir, "--num", 3, "--labels", "2,7",
                      "--sampler", "ddim", "--steps", 2, "--out", out)
  assert code == 0, err
  sheet = np.asarray(Image.open(out.with_suffix(".png")))
  grid_width = 2 + 2 * (96 + 2)  # class 2 has two images, each 32 x 3
  assert sheet.shape[0] == 2 + 2 * (96 + 2)  # a row per class
  names = sheet[:, :sheet.shape[1] - grid_width]
  assert names.shape[1] > 40  # a column of names on the left ...
  assert (names < 128).any()  # ... with dark text in it


def test_fid_warns_about_few_images(tmp_path, fake_inception):
  _, weights = fake_inception
  for name in ("a", "b"):
    np.savez(tmp_path / f"{name}.npz", images=np.zeros((20, 32, 32, 3), np.uint8))
  code, out, err = call("fid", tmp_path / "a.npz", tmp_path / "b.npz", "--weights", weights)
  assert code == 0, err
  assert ("cifarjax fid: warning: FID statistics from 20 images, fewer than the 600 feature "
          "dimensions") in err
  assert "cifarjax fid: Fréchet distance of 600-d statistics" in err


def test_help_shows_defaults_and_there_is_a_version(capsys):
  from cifarjax import __version__
  from cifarjax.commands import classifier, diffusion
  with pytest.raises(SystemExit) as info:
    cli.main(["--version"])
  assert info.value.code == 0 and capsys.readouterr().out.strip() == f"cifarjax {__version__}"
  with pytest.raises(SystemExit):
    cli.main(["sample", "--help"])
  text = " ".join(capsys.readouterr().out.split())
  assert "images per compiled batch (default: 256)" in text
  assert "(default: ddpm)" in text
  # The trainers' flags are made from their config fields: each shows the presets' values.
  for command, presets, flags in (("train-classifier", CLASSIFIER_PRESETS, classifier.TRAIN_FLAGS),
                                  ("train-diffusion", DIFFUSION_PRESETS, diffusion.TRAIN_FLAGS)):
    with pytest.raises(SystemExit):
      cli.main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for field in flags:
      flag = "--" + field.replace("_", "-")
      assert re.search(f"{flag} [A-Z_{{}},+a-z]+ .*?default: {getattr(presets['paper'], field)}",
                       text), (command, flag)
  assert "--batch-size BATCH_SIZE default: 256; linear-schedule: 128" in text
  assert "(default: 0.0; improved: 0.1)" in text  # --label-dropout


# --- Every config field from the command line, and registered models by name ------------


def test_set_reaches_any_field_after_the_preset_and_the_flags():
  from cifarjax.commands import config_from_args
  from cifarjax.config import CLASSIFIER_PRESETS
  args = cli.build_parser().parse_args([
      "train-classifier", "--preset", "dropout", "--steps", "7", "--set", "learning_rate=0.001",
      "--set", "augment.crop_prob=0.5", "--set", "steps=9", "--set", "model=paper"])
  config = config_from_args(CLASSIFIER_PRESETS, args)
  assert (config.dropout, config.learning_rate, config.augment.crop_prob) == (0.4, 0.001, 0.5)
  assert config.steps == 9 and type(config.steps) is int  # --set comes after --steps
  assert config.augment.hflip_prob == 0.5  # the rest of the nested config is kept


@pytest.mark.parametrize("command,assignment,message", [
    ("train-classifier", "lr=0.1", "--set lr: classifier (train-classifier) configs have "
     "no field 'lr'; fields: model, model_kwargs, data,"),
    ("train-classifier", "learning_rate=fast", "--set learning_rate wants a float, got 'fast'"),
    ("train-classifier", "steps=1.5", "--set steps wants an int, got '1.5'"),
    ("train-classifier", "augment=0.5", "--set augment: augment is a group of fields; set "
     "one of augment.hflip_prob,"),
    ("train-classifier", "augment.hflip_prob=2", "config field augment.hflip_prob must lie in "
     "[0, 1], got 2.0"),
    ("train-classifier", "model=wide", "config field model must be one of paper, got 'wide'"),
    ("train-classifier", "learning_rate", "--set wants FIELD=VALUE"),
    ("train-classifier", "optimizer=sgd", "config field optimizer must be one of adam, adamw, "
     "got 'sgd'"),
    ("train-classifier", "lr_schedule=step", "config field lr_schedule must be one of "
     "exponential, cosine, got 'step'"),
    ("train-classifier", "lr_schedule=cosine warmup_steps=3", "config field warmup_steps 3 "
     "must be fewer than --steps 3"),
    ("train-classifier", "label_smoothing=1", "config field label_smoothing must lie in [0, 1), "
     "got 1.0"),
    ("train-classifier", "eval_flip=yes", "--set eval_flip wants a bool, got 'yes'"),
    ("train-diffusion", "unet=huge", "--unet must be one of paper, tiny, got 'huge'"),
    ("train-diffusion", "schedule=cosine", "config field schedule must be one of"),
])
def test_set_refuses_bad_assignments_before_anything_is_written(tmp_path, command, assignment,
                                                                message):
  sets = [arg for a in assignment.split(" ") for arg in ("--set", a)]
  # --steps 3: a refusal that fails to happen costs seconds, not a paper-length run.
  code, out, err = call(command, "--data", "synthetic", "--steps", 3, *sets,
                        "--workdir", tmp_path / "run")
  assert code == 2 and out == ""
  assert message in error_of(err, command)
  assert not (tmp_path / "run").exists()


def test_a_registered_classifier_is_trained_and_evaluated_by_name(tmp_path, monkeypatch):
  """config.json alone describes a run: a model registered in models.CLASSIFIERS and named
  by --set model=... trains from the CLI, and eval-classifier rebuilds it with no code."""
  import flax.linen as nn
  from cifarjax import models

  class Small(nn.Module):
    num_classes: int

    @nn.compact
    def __call__(self, x, train: bool):
      x = nn.BatchNorm(use_running_average=not train)(nn.Conv(4, (3, 3))(x))
      return nn.Dense(self.num_classes)(x.mean((1, 2)))

  monkeypatch.setitem(models.CLASSIFIERS, "small",
                      lambda num_classes, dropout_rate, layers: Small(num_classes))
  code, out, err = call("train-classifier", "--data", "synthetic", *TRAIN, "--set", "model=small",
                        "--workdir", tmp_path / "run")
  assert code == 0, err
  assert json.loads(out)["num_params"] == 3 * 3 * 3 * 4 + 4 + 2 * 4 + 4 * 10 + 10
  assert json.loads((tmp_path / "run" / "config.json").read_text())["model"] == "small"
  code, out, err = call("eval-classifier", "--workdir", tmp_path / "run", "--json")
  assert code == 0, err
  assert json.loads(out)["step"] == 3


glibc_only = pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc",
                                reason="the malloc settings are glibc's, on Linux")


def env_with_malloc_settings(settings: dict) -> dict:
  """This process's environment with its malloc settings replaced by `settings`, JAX on
  the CPU unless `settings` name other platforms."""
  base = {k: v for k, v in os.environ.items()
          if k not in ("GLIBC_TUNABLES", "CIFARJAX_HUGE_PAGES", "JAX_PLATFORM_NAME")}
  return {**base, "JAX_PLATFORMS": "cpu", **settings}


@glibc_only
@pytest.mark.parametrize("env,want", [({}, cli.MALLOC_TUNABLES),
                                      ({"CIFARJAX_HUGE_PAGES": "0"}, "None"),
                                      ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"},
                                       "glibc.malloc.arena_max=2"),
                                      ({"JAX_PLATFORMS": "cuda,cpu"}, "None")])
def test_processes_restart_once_with_huge_pages_unless_told_otherwise(tmp_path, env, want):
  """What `cifarjax` and every experiment script's main() do first where JAX runs on the
  CPU: its step's buffers then come from glibc's malloc."""
  script = tmp_path / "probe.py"
  script.write_text("import os, sys\nfrom cifarjax import cli\n"
                    "print('start', flush=True)\ncli.reexec_with_huge_pages(sys.argv)\n"
                    "print(os.environ.get('GLIBC_TUNABLES'))\n")
  out = subprocess.run([sys.executable, str(script)], env=env_with_malloc_settings(env), capture_output=True,
                       text=True, check=True).stdout.split()
  restarts = 1 if want == cli.MALLOC_TUNABLES else 0
  assert out == ["start"] * (1 + restarts) + [want]


@pytest.mark.integration
@glibc_only
@pytest.mark.parametrize("huge_pages", ["1", "0"])
def test_a_restarted_process_reuses_its_call_buffers(tmp_path, huge_pages):
  """A call's 128 MiB of buffers is faulted in once, not on every call (zeroing fresh
  pages is CPU time every step would pay). A fresh mapping of it costs at
  least one page fault per 2 MiB (x86's largest page for it); reused, none, and the rest of
  a call a few (up to 9 beside the suite's other workers)."""
  script = tmp_path / "calls.py"
  script.write_text(
      "import resource, sys\nfrom cifarjax import cli\n"
      "cli.reexec_with_huge_pages(sys.argv)\ncli.keep_call_buffers()\n"
      "import jax, jax.numpy as jnp\n"
      "f = jax.jit(lambda x, w: jnp.max(x @ w, axis=0).sum() + jnp.min(x @ w, axis=1).sum())\n"
      "x, w = jnp.ones((32768, 64)), jnp.ones((64, 1024))\n"
      "print(f.lower(x, w).compile().memory_analysis().temp_size_in_bytes)\n"
      "for _ in range(2): jax.block_until_ready(f(x, w))\n"
      "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
      "for _ in range(4): jax.block_until_ready(f(x, w))\n"
      "print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 4)\n")
  out = subprocess.run([sys.executable, str(script)],
                       env=env_with_malloc_settings({"CIFARJAX_HUGE_PAGES": huge_pages}),
                       capture_output=True, text=True, check=True).stdout.split()
  temp_bytes, faults_per_call = int(out[0]), float(out[1])
  assert temp_bytes >= 128 * 2**20
  fresh_mapping_faults = temp_bytes / (2 * 2**20)
  if huge_pages == "1":
    assert faults_per_call < fresh_mapping_faults / 2
  else:
    assert faults_per_call >= fresh_mapping_faults


@pytest.mark.parametrize("environ,plugins,cpu", [
    ({}, [], True),
    ({}, ["xla_cuda12"], False),
    ({}, ["libtpu"], False),
    ({"JAX_PLATFORMS": "cpu"}, ["xla_cuda12"], True),
    ({"JAX_PLATFORMS": "cuda,cpu"}, [], False),
    ({"JAX_PLATFORMS": "tpu"}, [], False),
    ({"JAX_PLATFORMS": ""}, ["xla_cuda12"], False),
    ({"JAX_PLATFORM_NAME": "CPU"}, ["libtpu"], True),
])
def test_the_malloc_restart_is_for_processes_whose_jax_runs_on_the_cpu(environ, plugins, cpu):
  """JAX_PLATFORMS decides where set (its first platform); else an installed GPU or TPU
  runtime means JAX will run there, and the host's malloc holds no step buffers."""
  assert cli.cpu_backend_expected(environ, lambda: plugins) is cpu


def test_installed_accelerator_runtimes_are_found_without_importing_jax(tmp_path, monkeypatch):
  for name in ("jax_plugins", "libtpu"):
    monkeypatch.delitem(sys.modules, name, raising=False)
  before = set(cli.accelerator_plugins())
  (tmp_path / "jax_plugins" / "xla_fake_gpu").mkdir(parents=True)
  (tmp_path / "jax_plugins" / "xla_fake_gpu" / "__init__.py").write_text("")
  monkeypatch.syspath_prepend(str(tmp_path))
  assert set(cli.accelerator_plugins()) == before | {"xla_fake_gpu"}
  assert cli.cpu_backend_expected({}) is False
  (tmp_path / "libtpu").mkdir()
  (tmp_path / "libtpu" / "__init__.py").write_text("")
  importlib.invalidate_caches()
  assert "libtpu" in cli.accelerator_plugins()
  assert "jax_plugins.xla_fake_gpu" not in sys.modules and "libtpu" not in sys.modules
