"""The generator's training run, sampling, interpolation, FID evaluation and their CLI.

A tiny U-Net (unet="tiny") with T = 100 keeps every code path of the paper's
model at a size that compiles in seconds; one module-scoped run serves most tests.
"""

import dataclasses
import functools
import json
import pathlib
import re
import shutil

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from cifarjax import (augment, cli, config as config_lib, diffusion, generate, image_grid,
                      mesh as mesh_lib)
from cifarjax import checkpoint, run as run_lib, runlog
from cifarjax import train_diffusion as td
from cifarjax.commands import diffusion as diffusion_commands
from cifarjax.config import DIFFUSION_PRESETS, ClassifierConfig, DiffusionConfig
from cifarjax.data.synthetic import load_synthetic
from cifarjax.errors import UserError
from cifarjax.kinds import GENERATOR

from _traces import loop_traces

TINY = DiffusionConfig(data="synthetic", unet="tiny", num_timesteps=100, steps=6, batch_size=16,
                       log_every=3, eval_every=3, eval_batch_size=16, checkpoint_every=3)
SAMPLER = dict(sampler="ddim", steps=4)  # few steps: the tests check plumbing, not image quality

RUN_TRACES = {}  # run_dir's train step: its name, calls and jax traces


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("diffusion")
  with loop_traces() as traces:
    summary = td.train(TINY, workdir)
  RUN_TRACES.update(traces)
  return workdir, summary


def test_the_training_graph_shows_every_logged_loss_in_plain_numbers(run_dir):
  """training_graph.png (the name README gives) draws the train batch loss and both
  evaluation losses; its y ticks read 0.05, 1.2, ..., not 1.24x10^0, over a narrow range
  (a linear axis) and over decades (a log axis)."""
  from cifarjax import plots
  workdir, _ = run_dir
  records = runlog.read_metrics(workdir)
  assert {"loss", "eval_loss", "ema_loss"} <= {k for r in records for k in r}
  wide = [{"step": s, "loss": 1.0 / s ** 2, "eval_loss": 1.1 / s ** 2} for s in range(1, 30)]
  for records, scale in ((records, None), ([{"step": s, "loss": 1.2 + 0.001 * s}
                                            for s in range(1, 9)], "linear"), (wide, "log")):
    fig = plots.generator_figure(records)
    ax = fig.axes[0]
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels and all(re.fullmatch(r"[0-9.]+", label) for label in labels), labels
    assert ax.yaxis.get_offset_text().get_text() == ""
    assert scale is None or ax.get_yscale() == scale
    keys = [k for k, _ in plots.GENERATOR_LOSSES if any(k in r for r in records)]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        dict(plots.GENERATOR_LOSSES)[k] for k in keys]
  assert len(plots.GENERATOR_LOSSES) == 3 and (workdir / "training_graph.png").is_file()


def test_run_outputs(run_dir):
  workdir, summary = run_dir
  for name in ("config.json", "classes.json", "metrics.jsonl", "summary.json", "training_graph.png"):
    assert (workdir / name).is_file(), name
  assert run_lib.load_run_config(workdir, DiffusionConfig, "generator", "x") == \
      config_lib.validate(TINY)  # its entries' settings completed with their defaults
  assert runlog.read_json(workdir / "classes.json") == [f"class_{i}" for i in range(10)]
  assert summary["steps"] == 6 and summary["model"] == "unet:tiny"
  records = runlog.read_metrics(workdir)
  assert [r["step"] for r in records if "loss" in r] == [3, 6]
  assert [r["step"] for r in records if "ema_loss" in r] == [3, 6]
  assert {"loss", "lr", "images_per_sec"} <= set(records[0])
  assert summary["final_loss"] == [r["loss"] for r in records if "loss" in r][-1]


def test_exact_resume(run_dir, tmp_path):
  workdir, _ = run_dir
  td.train(dataclasses.replace(TINY, steps=3), tmp_path)  # "interrupted" after its checkpoint at 3
  td.train(TINY, tmp_path)  # resumes from step 3 to 6
  _, uninterrupted, _, _ = td.load_trained(workdir)
  _, resumed, _, _ = td.load_trained(tmp_path)
  # params, the average, Adam's moments, step and key: all bitwise equal.
  chex.assert_trees_all_equal(jax.device_get(uninterrupted), jax.device_get(resumed))


@flax.struct.dataclass
class _StateWithEmaParams:  # the generator's state as checkpoints held it before `ema`
  step: jax.Array
  params: dict
  ema_params: dict
  opt_state: tuple
  rng: jax.Array


def test_a_checkpoint_holding_ema_params_still_loads(run_dir, tmp_path):
  """A checkpoint that holds the average as `ema_params` (the params alone) loads into
  today's state, the average as ema["params"]; one that lacks it is refused."""
  workdir, _ = run_dir
  _, state, _, _ = td.load_trained(workdir)
  state = jax.device_get(state)
  for name in ("config.json", "classes.json"):
    (tmp_path / name).write_text((workdir / name).read_text())
  old = _StateWithEmaParams(step=state.step, params=state.params, ema_params=state.ema["params"],
                            opt_state=state.opt_state, rng=state.rng)
  mngr = checkpoint.manager(tmp_path, keep=None)
  checkpoint.save(mngr, 6, old)
  mngr.close()
  _, restored, _, _ = td.load_trained(tmp_path)
  assert restored.batch_stats is None
  chex.assert_trees_all_equal(jax.device_get(restored), state)
  without = tmp_path / "without"
  without.mkdir()
  for name in ("config.json", "classes.json"):
    (without / name).write_text((workdir / name).read_text())
  mngr = checkpoint.manager(without, keep=None)
  checkpoint.save(mngr, 6, {"step": state.step, "params": state.params,
                            "opt_state": state.opt_state, "rng": state.rng})
  mngr.close()
  with pytest.raises(UserError, match="does not fit"):
    td.load_trained(without)


def test_resume_with_another_config_is_refused(run_dir):
  workdir, _ = run_dir
  with pytest.raises(ValueError, match="ema_decay differ"):
    td.train(dataclasses.replace(TINY, ema_decay=0.9), workdir)


@pytest.mark.parametrize("objective", [{}, dict(prediction="v", loss_weighting="min-snr")],
                         ids=["eps", "v-min-snr"])
def test_loss_falls_when_overfitting_a_small_batch(objective):
  mesh = mesh_lib.make_mesh()
  config = dataclasses.replace(TINY, learning_rate=0.01, **objective)
  model, schedule = td.make_unet(config, 10), td.make_schedule(config)
  tx, _ = td.make_optimizer(config, steps_per_epoch=1000)
  state = jax.device_put(GENERATOR.init_state(model, tx, 0, ema=True), mesh_lib.replicated(mesh))
  data = load_synthetic("test").take(np.arange(16))
  batch = (augment.to_model_range(jnp.asarray(data.images)), jnp.asarray(data.labels))
  step = td.make_train_step(model, schedule, tx, mesh, config)
  losses = []
  for _ in range(40):  # the same timesteps and noise each step: a fixed regression
    state, metrics = step(state, batch, jax.random.PRNGKey(0))
    losses.append(float(metrics["loss"]))
  # Seen: eps 1.15 -> 0.70 (0.61x), v with min-SNR weights 0.30 -> 0.19 (0.64x); the
  # 4,571-weight tiny U-Net cannot memorise noise outright, but the fall is steady.
  assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses


def test_the_weights_average_ramps_from_the_first_step():
  """After one step the average is 0.1 initial + 0.9 trained weights (decay (1+0)/(10+0)),
  not 0.999 initial: the generator's average follows the trained weights from the start."""
  mesh = mesh_lib.make_mesh()
  model, schedule = td.make_unet(TINY, 10), td.make_schedule(TINY)
  tx, _ = td.make_optimizer(TINY, steps_per_epoch=1000)
  state = jax.device_put(GENERATOR.init_state(model, tx, 0, ema=True), mesh_lib.replicated(mesh))
  initial = jax.device_get(state.params)
  data = load_synthetic("test").take(np.arange(16))
  batch = (augment.to_model_range(jnp.asarray(data.images)), jnp.asarray(data.labels))
  state, _ = td.make_train_step(model, schedule, tx, mesh, TINY)(state, batch,
                                                                jax.random.PRNGKey(0))
  trained = jax.device_get(state.params)
  want = jax.tree.map(lambda a, b: 0.1 * a + 0.9 * b, initial, trained)
  chex.assert_trees_all_close(jax.device_get(state.ema["params"]), want, rtol=1e-5, atol=1e-7)


def test_the_loss_follows_the_configs_objective():
  """make_loss is diffusion.training_loss with the config's prediction and weighting: the v,
  min-SNR loss of some weights is not the eps one, and it is what training_loss gives."""
  config = dataclasses.replace(TINY, prediction="v", loss_weighting="min-snr",
                               loss_weighting_kwargs={"gamma": 2.0})
  model, schedule = td.make_unet(config, 10), td.make_schedule(config)
  tx, _ = td.make_optimizer(config, steps_per_epoch=1)
  params = GENERATOR.init_state(model, tx, 0, ema=True).params
  data = load_synthetic("test").take(np.arange(4))
  images, labels = augment.to_model_range(jnp.asarray(data.images)), jnp.asarray(data.labels)
  key = jax.random.PRNGKey(3)
  model_fn = lambda x, t, y: model.apply({"params": params}, x, t, y)
  loss = td.make_loss(model, schedule, config)(params, images, labels, key)
  paper_loss = td.make_loss(model, schedule, TINY)(params, images, labels, key)
  assert loss == diffusion.training_loss(model_fn, schedule, images, labels, key, prediction="v",
                                         loss_weighting="min-snr",
                                         loss_weighting_kwargs={"gamma": 2.0})
  assert paper_loss == diffusion.training_loss(model_fn, schedule, images, labels, key)
  assert not np.isclose(loss, paper_loss)


def test_presets():
  """paper is the defaults (eps, unweighted, train split); improved changes the objective and
  label dropout only; the schedule comparison is unchanged."""
  paper = DIFFUSION_PRESETS["paper"]
  assert paper == DiffusionConfig()
  assert (paper.prediction, paper.loss_weighting, paper.train_on, paper.schedule) == (
      "eps", "none", "train", "sigmoid")
  assert DIFFUSION_PRESETS["linear-schedule"] == dataclasses.replace(paper, schedule="linear",
                                                                     batch_size=128)
  assert DIFFUSION_PRESETS["improved"] == dataclasses.replace(
      paper, prediction="v", loss_weighting="min-snr", loss_weighting_kwargs={"gamma": 5.0},
      label_dropout=0.1)
  for config in DIFFUSION_PRESETS.values():
    config_lib.validate(config)
  # validate completes each entry's settings with its defaults, so config.json holds them.
  paper = config_lib.validate(paper)
  assert paper.schedule_kwargs == {"start": -3.0, "end": 3.0, "tau": 1.0, "clip_min": 1e-9}
  assert (paper.loss_weighting_kwargs, paper.unet_kwargs) == ({}, {})
  assert config_lib.validate(DIFFUSION_PRESETS["linear-schedule"]).schedule_kwargs == {
      "beta_start": 1e-4, "beta_end": 0.02}


@pytest.mark.parametrize("field,value,message", [
    ("prediction", "x0", "config field prediction must be one of eps, v, got 'x0'"),
    ("loss_weighting", "snr", "config field loss_weighting must be one of none, min-snr"),
    ("train_on", "test", "config field train_on must be one of train, train\\+test, got 'test'"),
    ("schedule", "cosine", "config field schedule must be one of sigmoid, linear, sigmoid-blog"),
])
def test_new_fields_are_validated(field, value, message):
  with pytest.raises(UserError, match=message):
    config_lib.validate(dataclasses.replace(TINY, **{field: value}))
  config_lib.validate(dataclasses.replace(TINY, schedule="sigmoid-blog"))


def test_cli_choices_are_the_registries():
  assert diffusion_commands.WEIGHTS_FROM == tuple(generate.SAMPLE_FROM)
  train_on = next(a for a in cli.build_parser()._subparsers._group_actions[0]
                  .choices["train-diffusion"]._actions if a.dest == "train_on")
  assert train_on.option_strings == ["--train-on"]
  assert tuple(train_on.choices) == tuple(config_lib.TRAINING_SPLITS)


def test_train_cli_passes_the_preset_and_train_on(tmp_path, monkeypatch):
  seen = []
  monkeypatch.setattr(td, "train", lambda config, workdir: seen.append(config) or {})
  assert cli.main(["train-diffusion", "--preset", "improved", "--train-on", "train+test",
                   "--workdir", str(tmp_path / "run")]) == 0
  assert seen == [config_lib.validate(
      dataclasses.replace(DIFFUSION_PRESETS["improved"], train_on="train+test"))]


def test_train_plus_test_is_every_image_of_a_source_with_a_test_split():
  train, test = load_synthetic("train"), load_synthetic("test")
  data = td.load_training_data(dataclasses.replace(TINY, train_on="train+test"))
  assert len(data) == len(train) + len(test) == 3072
  np.testing.assert_array_equal(data.images, np.concatenate([train.images, test.images]))
  np.testing.assert_array_equal(data.labels, np.concatenate([train.labels, test.labels]))
  assert data.class_names == train.class_names
  only_train = td.load_training_data(TINY)
  np.testing.assert_array_equal(only_train.images, train.images)


def test_train_plus_test_adds_the_held_out_slice_of_a_source_without_one(tmp_path):
  """An image folder with a train split only: "train" leaves its held-out slice out (the
  stand-in test split), "train+test" takes it back, so every image is trained on once."""
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, size=(12, 32, 32, 3), dtype=np.uint8)
  for i, image in enumerate(images):
    folder = tmp_path / "train" / f"class_{i % 3}"
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(folder / f"{i}.png")
  config = dataclasses.replace(TINY, data=str(tmp_path), holdout=4)
  train = td.load_training_data(config)
  everything = td.load_training_data(dataclasses.replace(config, train_on="train+test"))
  assert len(train) == 8 and len(everything) == 12
  key = lambda split: sorted(image.tobytes() for image in split.images)
  assert key(everything) == sorted(image.tobytes() for image in images)
  assert set(key(train)) < set(key(everything))


def test_generate_shapes_dtype_and_determinism(run_dir):
  workdir, _ = run_dir
  labels = [0, 1, 2, 3, 9]  # 5 images in batches of 4: the last batch is padded
  a = generate.generate(workdir, labels, **SAMPLER, seed=0, batch_size=4, progress=False)
  b = generate.generate(workdir, labels, **SAMPLER, seed=0, batch_size=4, progress=False)
  c = generate.generate(workdir, labels, **SAMPLER, seed=1, batch_size=4, progress=False)
  assert a.shape == (5, 32, 32, 3) and a.dtype == np.uint8
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  ddpm = generate.generate(workdir, [4, 5], sampler="ddpm", steps=None, seed=0, batch_size=2,
                           progress=False)
  assert ddpm.shape == (2, 32, 32, 3) and ddpm.dtype == np.uint8


def test_sample_cli_writes_npz_and_grid(run_dir, tmp_path):
  workdir, _ = run_dir
  out = tmp_path / "samples.npz"
  assert cli.main(["sample", "--workdir", str(workdir), "--num", "5", "--labels", "2,7",
                   "--sampler", "ddim", "--steps", "4", "--batch-size", "4",
                   "--out", str(out)]) == 0
  with np.load(out) as npz:
    assert npz["images"].shape == (5, 32, 32, 3) and npz["images"].dtype == np.uint8
    np.testing.assert_array_equal(npz["labels"], [2, 7, 2, 7, 2])
  grid = np.asarray(Image.open(out.with_suffix(".png")))
  gap, size = 2, 3 * 32  # enlarged 3x, a column of class names on the left
  assert grid.shape[0] == gap + 2 * (size + gap)  # rows: class 2, class 7
  assert grid.shape[1] > gap + 3 * (size + gap)


def test_default_labels_cycle_through_the_classes():
  np.testing.assert_array_equal(generate.default_labels(12, 10), [*range(10), 0, 1])


def test_interpolation_uses_the_closer_endpoints_label(run_dir, tmp_path):
  workdir, _ = run_dir
  data = load_synthetic("train")
  frames, labels = generate.interpolate(workdir, data.images[0], 3, data.images[1], 8, frames=5,
                                        steps=4)
  assert frames.shape == (5, 32, 32, 3) and frames.dtype == np.uint8
  np.testing.assert_array_equal(labels, [3, 3, 8, 8, 8])  # alphas 0, .25, .5, .75, 1
  out = tmp_path / "strip.png"
  assert cli.main(["interpolate", "--workdir", str(workdir), "--data", "synthetic", "--a", "0",
                   "--b", "1", "--frames", "5", "--steps", "4", "--out", str(out)]) == 0
  strip = np.asarray(Image.open(out))
  gap, apart = 2, 8  # 2x scale: 32 -> 64 pixels
  frames = gap + 5 * (64 + gap)  # 5 frames in one row, the two source images at its ends
  assert strip.shape == (gap + 64 + gap, 2 * (gap + 64 + gap + apart) + frames, 3)


def test_frame_labels_and_alphas():
  np.testing.assert_allclose(generate.frame_alphas(3), [0, 0.5, 1])
  np.testing.assert_array_equal(generate.frame_labels([0, 0.49, 0.5, 1], 1, 2), [1, 1, 2, 2])
  with pytest.raises(ValueError, match="at least 2 frames"):
    generate.frame_alphas(1)


def test_label_outside_the_classes(run_dir, tmp_path, capsys):
  workdir, _ = run_dir
  with pytest.raises(ValueError, match="label 10 is outside the model's 10 classes"):
    generate.generate(workdir, [0, 10], **SAMPLER)
  assert cli.main(["sample", "--workdir", str(workdir), "--num", "2", "--labels", "-1",
                   "--out", str(tmp_path / "x.npz")]) == 2
  assert "label -1 is outside" in capsys.readouterr().err


def test_empty_workdir(tmp_path, capsys):
  with pytest.raises(FileNotFoundError, match="no config.json.*train-diffusion"):
    td.load_trained(tmp_path)
  assert cli.main(["sample", "--workdir", str(tmp_path), "--num", "2",
                   "--out", str(tmp_path / "x.npz")]) == 2
  assert "no config.json" in capsys.readouterr().err


def test_classifier_workdir_is_refused(tmp_path, capsys):
  run_lib.save_json(ClassifierConfig(), tmp_path / "config.json")
  runlog.write_json(tmp_path / "classes.json", ["a", "b"])
  with pytest.raises(ValueError, match="classifier \\(train-classifier\\) run, not a generator"):
    td.load_trained(tmp_path)
  assert cli.main(["sample", "--workdir", str(tmp_path), "--num", "2",
                   "--out", str(tmp_path / "x.npz")]) == 2
  assert "classifier (train-classifier) run" in capsys.readouterr().err
  with pytest.raises(ValueError, match="classifier \\(train-classifier\\) run"):
    td.train(TINY, tmp_path)


def test_grid_has_a_row_per_class():
  images = np.arange(5 * 4 * 4 * 3, dtype=np.uint8).reshape(5, 4, 4, 3)
  rows = image_grid.rows_by_class(images, [1, 0, 1, 1, 0])
  assert [len(r) for r in rows] == [2, 3]
  np.testing.assert_array_equal(rows[0][0], images[1])
  sheet = image_grid.tile(rows, gap=1)
  assert sheet.shape == (1 + 2 * 5, 1 + 3 * 5, 3)
  np.testing.assert_array_equal(sheet[1:5, 1:5], images[1])


@pytest.mark.integration
def test_eval_diffusion_fid_merges_into_summary(run_dir, tmp_path, fid_weights_path, monkeypatch,
                                                capsys):
  workdir, _ = run_dir
  monkeypatch.setenv("CIFARJAX_CACHE", str(tmp_path / "cache"))  # reference stats land here
  # The plumbing is under test: the Fréchet distance's eigh form saves scipy's sqrtm of a
  # 2048 x 2048 product (~30 s on 2 cores); test_fid_units.py checks both agree.
  from cifarjax.fid import stats as stats_lib
  monkeypatch.setattr(stats_lib, "frechet_distance",
                      functools.partial(stats_lib.frechet_distance, method="eigh"))
  reference = tmp_path / "reference.npz"
  np.savez(reference, images=load_synthetic("test").images[:16])
  before = runlog.read_json(workdir / "summary.json")
  assert cli.main(["eval-diffusion", "--workdir", str(workdir), "--num", "16", "--sampler", "ddim",
                   "--steps", "4", "--batch-size", "16", "--weights", str(fid_weights_path),
                   "--reference", str(reference), "--json"]) == 0
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert np.isfinite(result["fid"]) and result["fid"] > 0
  assert (result["fid_num"], result["fid_sampler"], result["fid_steps"]) == (16, "ddim", 4)
  summary = runlog.read_json(workdir / "summary.json")
  assert summary == {**before, **result}  # merged: the training keys are kept
  assert list((tmp_path / "cache" / "fid_stats").glob("*.npz"))  # the reference was cached


def test_generate_samples_from_the_ema_weights(run_dir):
  """Samples come from the EMA weights (DiffusionConfig.ema_decay), not the raw ones: the
  raw parameters do not change them, the EMA parameters do."""
  workdir, _ = run_dir
  model, state, config, class_names = td.load_trained(workdir)
  sample = lambda s: generate.generate(workdir, [0, 5], **SAMPLER, seed=0, batch_size=2,
                                       progress=False, trained=(model, s, config, class_names))
  # After 6 steps the EMA is still near the initial weights, far from the raw ones.
  assert not np.allclose(jax.tree.leaves(state.params)[0],
                         jax.tree.leaves(state.ema["params"])[0])
  images = sample(state)
  np.testing.assert_array_equal(sample(state.replace(params=state.ema["params"])), images)
  assert not np.array_equal(sample(state.replace(ema={"params": state.params})), images)
  # sample_from="raw" is sampling the raw weights where the EMA ones would be.
  raw = generate.generate(workdir, [0, 5], **SAMPLER, seed=0, batch_size=2, progress=False,
                          trained=(model, state, config, class_names), sample_from="raw")
  np.testing.assert_array_equal(raw, sample(state.replace(ema={"params": state.params})))
  with pytest.raises(UserError, match="sample_from must be one of ema, raw, got 'best'"):
    generate.generate(workdir, [0], sample_from="best")


def test_generate_reads_the_output_as_the_runs_prediction(run_dir):
  """generate hands the run's DiffusionConfig.prediction to the sampler: the same weights
  read as v draw other images than read as eps (the run's own), and those of
  diffusion.sample with prediction='v'."""
  workdir, _ = run_dir
  model, state, config, class_names = td.load_trained(workdir)
  as_v = generate.generate(workdir, [0, 5], **SAMPLER, seed=0, batch_size=2, progress=False,
                           trained=(model, state, dataclasses.replace(config, prediction="v"),
                                    class_names))
  as_eps = generate.generate(workdir, [0, 5], **SAMPLER, seed=0, batch_size=2, progress=False,
                             trained=(model, state, config, class_names))
  assert not np.array_equal(as_v, as_eps)
  direct = diffusion.sample(lambda x, t, y: model.apply({"params": state.ema["params"]}, x, t, y),
                            td.make_schedule(config), jax.random.fold_in(jax.random.PRNGKey(0), 0),
                            jnp.array([0, 5], jnp.int32), sampler="ddim", num_steps=4,
                            null_label=model.num_classes, prediction="v")
  # Eager here, jitted there: float rounding moves a pixel across a uint8 level now and then.
  np.testing.assert_allclose(as_v, augment.to_uint8(direct), rtol=0, atol=1)
  assert np.abs(as_v.astype(int) - as_eps).mean() > 10


def test_sample_cli_weights_from_raw_with_dpmpp_2m(run_dir, tmp_path):
  """--weights-from raw and --sampler dpm++2m reach `generate`: the CLI's images are its."""
  workdir, _ = run_dir
  out = tmp_path / "raw.npz"
  assert cli.main(["sample", "--workdir", str(workdir), "--num", "3", "--labels", "1,4,6",
                   "--sampler", "dpm++2m", "--steps", "4", "--batch-size", "4",
                   "--weights-from", "raw", "--out", str(out)]) == 0
  expected = generate.generate(workdir, [1, 4, 6], sampler="dpm++2m", steps=4, seed=0,
                               batch_size=4, progress=False, sample_from="raw")
  with np.load(out) as npz:
    np.testing.assert_array_equal(npz["images"], expected)
  ema = generate.generate(workdir, [1, 4, 6], sampler="dpm++2m", steps=4, seed=0, batch_size=4,
                          progress=False)
  assert not np.array_equal(ema, expected)


def test_export_keeps_a_fid_only_where_it_is_of_the_exported_weights(run_dir, tmp_path):
  """A FID that eval-diffusion left in the run's summary goes into the export only where it
  was measured at the exported step with the exported weights."""
  workdir = pathlib.Path(shutil.copytree(run_dir[0], tmp_path / "run"))
  summary = runlog.read_json(workdir / "summary.json")
  for fid_step, fid_from, kept in ((TINY.steps, "ema", True), (TINY.steps - 1, "ema", False),
                                   (TINY.steps, "raw", False)):
    fid = {"fid": 50.0, "fid_num": 10, "fid_step": fid_step, "fid_weights_from": fid_from}
    runlog.write_json(workdir / "summary.json", {**summary, **fid})
    out = tmp_path / f"exported-{fid_step}-{fid_from}"
    assert cli.main(["export-diffusion", "--workdir", str(workdir), "--out", str(out)]) == 0
    exported = runlog.read_json(out / "summary.json")
    assert {k: exported.get(k) for k in fid} == (fid if kept else dict.fromkeys(fid))
    assert exported["final_ema_loss"] == summary["final_ema_loss"]


def test_exported_weights_sample_as_the_workdir_does(run_dir, tmp_path, capsys):
  """export-diffusion writes config, classes and the averaged weights; sampling the folder
  gives the workdir's images bitwise. The folder cannot be trained into, holds no raw
  weights, and refuses weights that do not fit its config."""
  workdir, _ = run_dir
  out = tmp_path / "exported"
  assert cli.main(["export-diffusion", "--workdir", str(workdir), "--out", str(out)]) == 0
  assert sorted(p.name for p in out.iterdir()) == ["classes.json", "config.json",
                                                   "summary.json", "weights.npz"]
  summary = runlog.read_json(out / "summary.json")
  assert (summary["exported_step"], summary["exported_weights"]) == (TINY.steps, "ema")
  _, state, _, _ = td.load_trained(workdir)
  with np.load(out / "weights.npz") as npz:
    np.testing.assert_array_equal(
        npz["UNetBlock_0/TimeEncoder_0/Dense_0/kernel"],
        state.ema["params"]["UNetBlock_0"]["TimeEncoder_0"]["Dense_0"]["kernel"])
  np.testing.assert_array_equal(
      generate.generate(out, [1, 4], **SAMPLER, seed=0, batch_size=2, progress=False),
      generate.generate(workdir, [1, 4], **SAMPLER, seed=0, batch_size=2, progress=False))
  with pytest.raises(UserError, match="exported ema weights only"):
    generate.generate(out, [1], **SAMPLER, sample_from="raw")
  with pytest.raises(UserError, match="holds exported weights, not a run to train"):
    td.train(TINY, out)
  assert cli.main(["export-diffusion", "--workdir", str(workdir), "--out", str(out)]) == 2
  assert "not an empty folder" in capsys.readouterr().err
  with np.load(out / "weights.npz") as npz:
    arrays = {k: npz[k] for k in npz.files if k != "Conv_0/kernel"}
  np.savez(out / "weights.npz", **arrays)
  with pytest.raises(UserError, match="do not fit"):
    td.load_trained(out)


def test_train_step_compiles_once(run_dir):
  """As the classifier's: six steps, one trace of the train step and of the batch draw."""
  assert RUN_TRACES["calls"] == TINY.steps
  assert RUN_TRACES["traces"] == 1, RUN_TRACES
  assert RUN_TRACES["all"].get("draw") == 1, RUN_TRACES


def test_sampling_again_compiles_nothing_new(run_dir, monkeypatch):
  """Raw then EMA weights, another seed, another call: one trace of the sampler for one
  setting, and a new one only for a new setting (here another step count)."""
  workdir, _ = run_dir
  traced = []
  real_sample = diffusion.sample
  monkeypatch.setattr(diffusion, "sample", lambda *a, **k: traced.append(k["num_steps"]) or
                      real_sample(*a, **k))
  generate.make_sampler.cache_clear()
  trained = td.load_trained(workdir)
  draw = lambda steps, **k: generate.generate(workdir, [0, 5], sampler="ddim", steps=steps,
                                              batch_size=2, progress=False, trained=trained, **k)
  first = draw(3)
  assert not np.array_equal(draw(3, sample_from="raw"), first)
  assert not np.array_equal(draw(3, seed=1), first)
  np.testing.assert_array_equal(draw(3), first)
  assert traced == [3]
  draw(2)
  assert traced == [3, 2]
