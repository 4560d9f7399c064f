"""Variants of one's own: registry contracts and settings, fingerprints, --import and entry
points, and what a run records of them (README's "Variants of your own").

Modules of variants are written into the test's folder, the current directory, as a user's
would be; `fresh_registries` (conftest.py) gives each test the registries as cifarjax
defines them and forgets the modules named, as a fresh process would.
"""

import dataclasses
import functools
import json
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest

from cifarjax import (checkpoint, cli, commands, config as config_lib, diffusion, models, plugins,
                      registry)
from cifarjax import run as run_lib
from cifarjax.config import ClassifierConfig, DiffusionConfig
from cifarjax.errors import Notice, UserError
from test_cli import call, error_of, generator_dir  # noqa: F401 (a fixture)


def write_module(folder, name, source):
  (folder / f"{name}.py").write_text(textwrap.dedent(source))


# A sampler with a setting: DDIM from x_T scaled by `scale` (1: DDIM itself).
SCALED_DDIM = """
    from cifarjax import diffusion

    def scaled_ddim(predict, schedule, x, key, num_steps, eta, *, scale: float = 1.0):
      if not 0 < scale <= 1:
        raise ValueError(f"scale must lie in (0, 1], got {scale}")
      return diffusion.ddim_sampler(predict, schedule, x * scale, key, num_steps, eta)

    diffusion.SAMPLERS["scaled-ddim"] = scaled_ddim
"""

# A U-Net of one's own, with a setting.
MY_UNETS = """
    from cifarjax.models import UNETS, UNet

    def narrow_unet(num_classes, num_timesteps, layers="auto", *, base_channels: int = 8):
      return UNet(num_classes=num_classes, num_timesteps=num_timesteps,
                  base_channels=base_channels, channel_mults=(1, 2), blocks_per_level=1,
                  embed_hidden=16, layers=layers)

    UNETS["narrow"] = narrow_unet
"""


@pytest.fixture
def folder(tmp_path, monkeypatch, fresh_registries):
  monkeypatch.chdir(tmp_path)
  return tmp_path


# --- Contracts and settings -------------------------------------------------------------


def test_each_registry_s_contract_and_the_settings_of_its_entries():
  """The Protocols name what every entry receives first; the keyword parameters after those
  are settings, with their defaults (every built-in entry fits its contract)."""
  contracts = {diffusion.ScheduleFn: ("num_timesteps",),
               diffusion.LossWeighting: ("snr", "x0_error_scale"),
               diffusion.Sampler: ("predict", "schedule", "x", "key", "num_steps", "eta"),
               models.ClassifierFactory: ("num_classes", "dropout_rate", "layers"),
               models.UNetFactory: ("num_classes", "num_timesteps", "layers")}
  for protocol, params in contracts.items():
    assert registry.contract(protocol) == params
  settings = lambda entries, protocol: {name: registry.settings(entry, protocol)
                                        for name, entry in entries.items()}
  assert settings(diffusion.SCHEDULES, diffusion.ScheduleFn) == {
      "sigmoid": {"start": -3.0, "end": 3.0, "tau": 1.0, "clip_min": 1e-9},
      "linear": {"beta_start": 1e-4, "beta_end": 0.02},
      "sigmoid-blog": {"beta_start": 1e-4, "beta_end": 0.02}}
  assert settings(diffusion.LOSS_WEIGHTINGS, diffusion.LossWeighting) == {
      "none": {}, "min-snr": {"gamma": 5.0}}
  assert settings(diffusion.SAMPLERS, diffusion.Sampler) == {"ddpm": {}, "ddim": {}, "dpm++2m": {}}
  assert settings(models.CLASSIFIERS, models.ClassifierFactory) == {"paper": {}}
  assert settings(models.UNETS, models.UNetFactory) == {"paper": {}, "tiny": {}}


def test_what_counts_as_a_setting():
  def takes_any(num_timesteps, **kwargs): ...
  def typed(num_timesteps, *, dtype=jnp.float32, offsets=(1, 2), name: str = "a"): ...
  def too_few(predict, schedule, x, key, num_steps): ...
  def no_default(predict, schedule, x, key, num_steps, eta, s_noise): ...

  class Block(nn.Module):  # a flax module registered as its own factory
    num_classes: int
    num_timesteps: int
    layers: str = "auto"
    width: int = 8

  assert registry.settings(takes_any, diffusion.ScheduleFn) is None  # any name goes
  # dtype has no JSON default: not a setting; a tuple default is read as config.json's list.
  assert registry.settings(typed, diffusion.ScheduleFn) == {"offsets": [1, 2], "name": "a"}
  assert registry.settings(Block, models.UNetFactory) == {"width": 8}  # not parent, name
  with pytest.raises(UserError, match="too_few takes 5 positional parameters; its registry "
                     "passes 6 \\(predict, schedule, x, key, num_steps, eta\\)"):
    registry.settings(too_few, diffusion.Sampler)
  with pytest.raises(UserError, match="no_default's parameter s_noise needs a default"):
    registry.settings(no_default, diffusion.Sampler)


def test_settings_are_checked_against_the_entry_and_completed():
  check = lambda values: registry.check_settings(
      diffusion.sigmoid_schedule, values, diffusion.ScheduleFn, "schedule 'sigmoid'",
      "config field schedule_kwargs")
  completed = check({"tau": 2})  # an int where a float goes
  assert completed == {"start": -3.0, "end": 3.0, "tau": 2.0, "clip_min": 1e-9}
  assert type(completed["tau"]) is float
  for values, message in [
      ({"taux": 1.0}, "config field schedule_kwargs.taux: schedule 'sigmoid' has no setting "
                      "'taux'; its settings: start, end, tau, clip_min"),
      ({"tau": "fast"}, "config field schedule_kwargs.tau must be a number, as its default 1.0 "
                        "is, got 'fast'"),
      ({"tau": True}, "config field schedule_kwargs.tau must be a number"),
      ([1], "config field schedule_kwargs must map setting names to values, got [1]")]:
    with pytest.raises(UserError) as info:
      check(values)
    assert str(info.value).startswith(message), str(info.value)
  with pytest.raises(UserError, match="schedule 'linear' has no setting 'tau'; its settings: "
                     "beta_start, beta_end"):
    registry.check_settings(diffusion.linear_schedule, {"tau": 1.0}, diffusion.ScheduleFn,
                            "schedule 'linear'", "config field schedule_kwargs")
  with pytest.raises(UserError, match="it takes no settings"):
    registry.check_settings(diffusion.no_weighting, {"gamma": 1.0}, diffusion.LossWeighting,
                            "loss weighting 'none'", "config field loss_weighting_kwargs")


def test_set_reaches_an_entry_s_settings():
  values = commands.parse_assignments(DiffusionConfig, [
      "schedule=linear", "schedule_kwargs.beta_end=0.03", "loss_weighting=min-snr",
      'loss_weighting_kwargs={"gamma": 2}', "unet_kwargs.note=a b"])
  assert values == {"schedule": "linear", "schedule_kwargs.beta_end": 0.03,
                    "loss_weighting": "min-snr", "loss_weighting_kwargs": {"gamma": 2},
                    "unet_kwargs.note": "a b"}  # a JSON value, else the text
  del values["unet_kwargs.note"]
  config = config_lib.validate(config_lib.override(DiffusionConfig(), values))
  assert config.schedule_kwargs == {"beta_start": 1e-4, "beta_end": 0.03}
  assert config.loss_weighting_kwargs == {"gamma": 2.0}
  # --set merges one setting into those given so far.
  config = config_lib.override(config, {"schedule_kwargs.beta_start": 0.001})
  assert config.schedule_kwargs == {"beta_start": 0.001, "beta_end": 0.03}
  # Another entry drops the settings of the one it replaces: min-snr's gamma is not none's.
  improved = config_lib.DIFFUSION_PRESETS["improved"]
  assert config_lib.override(improved, {"loss_weighting": "none"}).loss_weighting_kwargs == {}
  assert config_lib.override(improved, {"loss_weighting": "min-snr"}) == improved
  assert config_lib.override(improved, {"loss_weighting": "none", "loss_weighting_kwargs.a": 1}
                             ).loss_weighting_kwargs == {"a": 1}
  for text, message in [("schedule_kwargs=3", "--set schedule_kwargs wants a JSON object of "
                                              'settings, e.g. {"s": 0.02}, got \'3\''),
                        ("schedule_kwargs.a.b=1", "--set schedule_kwargs.a.b: schedule_kwargs is "
                                                  "a dict, not a group of fields")]:
    with pytest.raises(UserError) as info:
      commands.parse_assignments(DiffusionConfig, [text])
    assert str(info.value) == message


@pytest.mark.parametrize("sets,message", [
    (["schedule_kwargs.taux=1"], "config field schedule_kwargs.taux: schedule 'sigmoid' has no "
     "setting 'taux'; its settings: start, end, tau, clip_min"),
    (["loss_weighting=min-snr", "loss_weighting_kwargs.gamma=0"],
     "loss weighting 'min-snr': gamma must be positive, got 0.0"),
    (["schedule=linear", "schedule_kwargs.beta_end=1.5"],
     "schedule 'linear': betas must be a vector of numbers in [0, 1), got shape (1000,) from "
     "0.0001 to 1.5"),
    (["schedule=cosine"], "config field schedule must be one of sigmoid, linear, sigmoid-blog, "
     "got 'cosine' (one of your own is registered by importing its module: --import MODULE)"),
])
def test_a_bad_setting_is_one_line_before_anything_is_written(folder, sets, message):
  """Names and types are checked with the config; the entry's own checks run as the trainer
  builds it, still before the workdir is written."""
  code, out, err = call("train-diffusion", "--data", "synthetic", "--unet", "tiny", "--steps", 2,
                        *[arg for s in sets for arg in ("--set", s)], "--workdir", "run")
  assert code == 2 and message in error_of(err, "train-diffusion")
  assert not (folder / "run").exists()


def test_a_saved_min_snr_gamma_is_the_weighting_s_setting(tmp_path):
  """Runs saved before loss weightings had settings held min_snr_gamma: it reads back as the
  setting gamma of min-snr, and such a run resumes with the same recipe."""
  improved = config_lib.validate(config_lib.DIFFUSION_PRESETS["improved"])
  old = {k: v for k, v in config_lib.to_dict(improved).items()
         if not k.endswith("_kwargs")} | {"min_snr_gamma": 5.0}
  assert config_lib.from_dict(DiffusionConfig, old) == dataclasses.replace(
      improved, schedule_kwargs={}, unet_kwargs={})
  (tmp_path / "config.json").write_text(json.dumps({"type": "DiffusionConfig", **old}))
  run_lib.check_resumable(tmp_path, improved)
  with pytest.raises(UserError, match="loss_weighting_kwargs differ: config field "
                     "loss_weighting_kwargs: {'gamma': 5.0} there, {'gamma': 2.0} now"):
    run_lib.check_resumable(tmp_path, dataclasses.replace(
        improved, loss_weighting_kwargs={"gamma": 2.0}))


def test_a_sampler_is_traced_without_a_model_before_any_work():
  schedule = diffusion.make_schedule("linear", 10)
  assert diffusion.check_sampler("ddim", schedule, 4, 0.5) == {}
  for args, message in [
      (("ddpm", 4, 0.0), "sampler 'ddpm': ddpm runs all 10 steps"),
      (("ddpm", None, 1.0), "sampler 'ddpm': ddpm adds its posterior's noise: eta must be 0"),
      (("dpm++2m", 4, 1.0), "sampler 'dpm++2m': dpm++2m is deterministic: eta must be 0"),
      (("ddim", 11, 0.0), "sampler 'ddim': num_steps must lie in [1, 10], got 11"),
      (("euler-x", 4, 0.0), "unknown sampler 'euler-x'; registered: ddpm, ddim, dpm++2m (one "
                            "of your own is registered by importing its module: --import MODULE)")]:
    with pytest.raises(UserError) as info:
      diffusion.check_sampler(args[0], schedule, args[1], args[2])
    assert str(info.value).startswith(message), str(info.value)


def test_a_sampler_of_another_shape_is_refused(monkeypatch):
  monkeypatch.setitem(diffusion.SAMPLERS, "flat",
                      lambda predict, schedule, x, key, num_steps, eta: x.reshape(-1))
  with pytest.raises(UserError, match=r"sampler 'flat' must return an image shaped like x_T "
                     r"\(32, 32, 3\), got \(3072,\)"):
    diffusion.check_sampler("flat", diffusion.make_schedule("linear", 10))


# --- Fingerprints -------------------------------------------------------------------------


def test_a_fingerprint_follows_the_code_an_entry_names(folder):
  """An entry's fingerprint covers its source and its module's functions and classes that it
  names, and nothing else of the module."""
  source = """
      import functools

      def helper(x):
        return x + 1

      class Block:
        def __call__(self, x):
          return helper(x)

      def unrelated():
        return 0

      def entry(n):
        return Block()(n)
  """
  variants = {"base": source, "helper": source.replace("x + 1", "x + 2"),
              "unrelated": source.replace("return 0", "return 1")}
  prints = {}
  for name, text in variants.items():
    write_module(folder, f"fingerprinted_{name}", text)
    plugins.import_modules([f"fingerprinted_{name}"])
    prints[name] = registry.fingerprint(sys.modules[f"fingerprinted_{name}"].entry)
  assert len(prints["base"]) == 16 and int(prints["base"], 16) >= 0
  assert prints["helper"] != prints["base"]  # entry names Block, whose method calls helper
  assert prints["unrelated"] == prints["base"]
  entry = sys.modules["fingerprinted_base"].entry
  partial = lambda n: registry.fingerprint(functools.partial(entry, n))
  assert partial(1) != partial(2) and partial(1) == partial(1)
  assert registry.fingerprint(diffusion.EPS_PREDICTION) != registry.fingerprint(
      diffusion.V_PREDICTION)
  assert registry.fingerprint(len) is None  # no Python source
  namespace = {}
  exec("def typed_at_a_prompt(n): return n", namespace)
  assert registry.fingerprint(namespace["typed_at_a_prompt"]) is None


# --- Bringing modules in: --import and entry points ---------------------------------------


def test_import_names_a_module_that_is_not_there(folder):
  code, out, err = call("train-classifier", "--import", "no_such_variants", "--data", "synthetic",
                        "--workdir", "run")
  assert code == 2 and error_of(err, "train-classifier") == (
      "cifarjax train-classifier: error: --import no_such_variants, but there is no module "
      "no_such_variants here (the current directory or sys.path): run from the folder that "
      "holds it, or put it on PYTHONPATH")
  write_module(folder, "needs_a_dependency", "import no_such_dependency\n")
  code, out, err = call("train-classifier", "--import", "needs_a_dependency", "--data",
                        "synthetic", "--workdir", "run")
  assert code == 2 and error_of(err, "train-classifier").endswith(
      "--import needs_a_dependency, which failed: No module named 'no_such_dependency'")
  assert not (folder / "run").exists()


def test_import_brings_a_sampler_to_sample_and_its_help(folder, generator_dir, capsys,
                                                        fresh_registries, monkeypatch):
  """--import registers before the options are checked and --help lists them; the sampler
  gets --eta and its settings (--sampler-arg), and what it refuses is one line."""
  monkeypatch.setenv("COLUMNS", "1000")  # help on one line per option: names unbroken
  write_module(folder, "my_samplers", SCALED_DDIM)
  with pytest.raises(SystemExit) as info:
    cli.main(["sample", "--import", "my_samplers", "--help"])
  assert info.value.code == 0
  assert "registered: ddpm, ddim, dpm++2m, scaled-ddim" in " ".join(
      capsys.readouterr().out.split())

  def images(*args):
    out = folder / "s.npz"
    code, _, err = call("sample", "--workdir", generator_dir, "--num", 2, "--steps", 3, "--seed",
                        4, "--out", out, *args)
    assert code == 0, err
    with np.load(out) as npz:
      return npz["images"]

  fresh_registries("my_samplers")
  ddim = images("--sampler", "ddim", "--eta", 0.5).astype(int)
  fresh_registries("my_samplers")
  # scale 1 is DDIM, in a program of its own (XLA may round differently: a level at most)
  same = images("--import", "my_samplers", "--sampler", "scaled-ddim", "--eta", 0.5)
  assert np.abs(same - ddim).max() <= 1
  halved = images("--import", "my_samplers", "--sampler", "scaled-ddim", "--eta", 0.5,
                  "--sampler-arg", "scale=0.5")
  assert np.abs(halved - ddim).max() > 10
  for args, message in [
      (("--sampler", "scaled-ddim", "--sampler-arg", "scale=2"),
       "sampler 'scaled-ddim': scale must lie in (0, 1], got 2.0"),
      (("--sampler", "scaled-ddim", "--sampler-arg", "size=2"),
       "sampler_kwargs.size: sampler 'scaled-ddim' has no setting 'size'; its settings: scale"),
      (("--sampler", "scaled-ddim", "--sampler-arg", "scale"),
       "--sampler-arg wants NAME=VALUE (e.g. s_noise=0.5), got 'scale'"),
      (("--sampler", "dpm++2m", "--eta", "1"),
       "sampler 'dpm++2m': dpm++2m is deterministic: eta must be 0, got 1.0")]:
    code, out, err = call("sample", "--workdir", generator_dir, "--num", 2, "--out",
                          folder / "x.npz", "--import", "my_samplers", *args)
    assert code == 2 and message in error_of(err, "sample"), err
  fresh_registries("my_samplers")
  code, out, err = call("sample", "--workdir", generator_dir, "--num", 2, "--out",
                        folder / "x.npz", "--sampler", "scaled-ddim")
  assert code == 2 and error_of(err, "sample").endswith(
      "--sampler must be one of ddpm, ddim, dpm++2m, got 'scaled-ddim' (one of your own is "
      "registered by importing its module: --import MODULE)")
  assert not (folder / "x.npz").exists()


def fake_distribution(folder, entry_points: str):
  """An installed package as importlib.metadata finds one: a dist-info folder on sys.path."""
  info = folder / "my_plugin-1.0.dist-info"
  info.mkdir()
  (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-plugin\nVersion: 1.0\n")
  (info / "entry_points.txt").write_text(textwrap.dedent(entry_points))


def test_entry_points_register_variants_for_every_command(folder, monkeypatch, capsys):
  """Each names a module (imported) or a function (called); one that cannot be imported is
  one line naming it."""
  write_module(folder, "plugin_samplers", SCALED_DDIM)
  write_module(folder, "plugin_functions", """
      from cifarjax import diffusion

      def register():
        diffusion.SAMPLERS["ddim-again"] = diffusion.ddim_sampler
  """)
  fake_distribution(folder, """
      [cifarjax.plugins]
      samplers = plugin_samplers
      more = plugin_functions:register
  """)
  monkeypatch.syspath_prepend(str(folder))
  monkeypatch.setenv("COLUMNS", "1000")  # help on one line per option: names unbroken
  with pytest.raises(SystemExit):
    cli.main(["sample", "--help"])
  assert "registered: ddpm, ddim, dpm++2m, scaled-ddim, ddim-again" in " ".join(
      capsys.readouterr().out.split())
  assert plugins.registered_by("SAMPLERS", "scaled-ddim",
                               diffusion.SAMPLERS["scaled-ddim"]) == "plugin_samplers"

  (folder / "my_plugin-1.0.dist-info" / "entry_points.txt").write_text(
      "[cifarjax.plugins]\nbroken = plugin_gone\n")
  code, out, err = call("info", "--json")
  assert code == 2 and error_of(err, "info") == (
      "cifarjax info: error: the cifarjax.plugins entry point broken = plugin_gone of my-plugin "
      "cannot be imported: No module named 'plugin_gone'")


# --- What a run records, and later commands on it ------------------------------------------


def untrained_generator(workdir, config):
  """A generator workdir as train-diffusion starts one, holding an untrained checkpoint."""
  from cifarjax import train_diffusion as td
  from cifarjax.kinds import GENERATOR
  run_lib.write_start(workdir, config_lib.validate(config), [f"class_{i}" for i in range(10)])
  tx, _ = td.make_optimizer(config, 1)
  manager = checkpoint.manager(workdir, None)
  checkpoint.save(manager, 0, GENERATOR.init_state(td.make_unet(config, 10), tx, config.seed,
                                                   ema=True))
  manager.close()
  return workdir


@pytest.fixture
def narrow_run(folder):
  """A generator run of a U-Net of one's own (with a setting), registered by my_unets."""
  write_module(folder, "my_unets", MY_UNETS)
  plugins.import_modules(["my_unets"])
  config = DiffusionConfig(data="synthetic", unet="narrow", unet_kwargs={"base_channels": 4},
                           num_timesteps=10)
  return untrained_generator(folder / "run", config)


def sample_from(run, *args):
  return call("sample", "--workdir", run, "--num", 2, "--sampler", "ddim", "--steps", 2,
              "--out", run.parent / "s.npz", *args)


def test_a_run_records_its_entries_and_later_commands_import_them(narrow_run, folder,
                                                                  fresh_registries):
  saved = json.loads((narrow_run / "config.json").read_text())
  assert saved["unet_kwargs"] == {"base_channels": 4} and saved["imports"] == ["my_unets"]
  assert saved["registry"]["unet"] == {
      "name": "narrow", "module": "my_unets",
      "source_sha256": registry.fingerprint(sys.modules["my_unets"].narrow_unet)}
  assert saved["registry"]["schedule"]["module"] == "cifarjax.diffusion.schedules"

  fresh_registries("my_unets")  # a fresh shell: only config.json names my_unets
  code, out, err = sample_from(narrow_run)
  assert code == 0, err
  assert "warning" not in err and "narrow" in models.UNETS


def test_a_missing_module_or_entry_is_one_line_naming_the_import(narrow_run, folder,
                                                                 fresh_registries, monkeypatch,
                                                                 tmp_path_factory):
  fresh_registries("my_unets")
  monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
  code, out, err = sample_from(narrow_run)
  assert code == 2 and error_of(err, "sample") == (
      f"cifarjax sample: error: the run in {narrow_run} imports my_unets (its config.json "
      f"records it), but there is no module my_unets here (the current directory or "
      f"sys.path): run from the folder that holds it, or put it on PYTHONPATH")

  monkeypatch.chdir(folder)
  write_module(folder, "my_unets", MY_UNETS.replace('UNETS["narrow"] = narrow_unet', ""))
  fresh_registries("my_unets")
  code, out, err = sample_from(narrow_run)
  assert code == 2 and error_of(err, "sample") == (
      f"cifarjax sample: error: the run in {narrow_run} uses the U-Net 'narrow', which is not "
      f"registered (registered: paper, tiny); my_unets was imported but no longer registers it")

  # A run saved without a record (or registered from a script) names no module to import.
  config = json.loads((narrow_run / "config.json").read_text())
  for record in ({}, {"registry": {"unet": {"name": "narrow", "module": "__main__"}}}):
    fresh_registries("my_unets")
    text = {k: v for k, v in config.items() if k not in ("imports", "registry")} | record
    (narrow_run / "config.json").write_text(json.dumps(text))
    code, out, err = sample_from(narrow_run)
    assert code == 2 and error_of(err, "sample").endswith(
        "import the module that registers it: --import MODULE" if not record else
        "it was registered by __main__, which cifarjax cannot import: register it in a module "
        "of its own and pass --import MODULE")


def test_an_unregistered_classifier_is_one_line_not_a_traceback(tmp_path, fresh_registries):
  workdir = tmp_path / "fire"
  workdir.mkdir()
  (workdir / "config.json").write_text(json.dumps(
      {"type": "ClassifierConfig", **config_lib.to_dict(ClassifierConfig(model="fire-paper"))}))
  (workdir / "classes.json").write_text('["a", "b"]')
  code, out, err = call("eval-classifier", "--workdir", workdir)
  assert code == 2 and error_of(err, "eval-classifier").startswith(
      f"cifarjax eval-classifier: error: the run in {workdir} uses the classifier 'fire-paper', "
      f"which is not registered (registered: paper); import the module")


def test_a_changed_definition_is_a_notice_on_evaluation_and_resume(narrow_run, folder,
                                                                   fresh_registries):
  write_module(folder, "my_unets", MY_UNETS.replace("embed_hidden=16", "embed_hidden=8 + 8"))
  fresh_registries("my_unets")
  code, out, err = sample_from(narrow_run)
  assert code == 0, err
  (notice,) = [line for line in err.splitlines() if "warning" in line]
  saved = json.loads((narrow_run / "config.json").read_text())["registry"]["unet"]
  now = registry.fingerprint(models.UNETS["narrow"])
  assert notice == (f"cifarjax sample: warning: the U-Net 'narrow' (my_unets) is not the code "
                    f"the run in {narrow_run} started with (source sha256 "
                    f"{saved['source_sha256']} then, {now} now); it runs as it is now")

  config = run_lib.load_run_config(narrow_run, DiffusionConfig, "generator", "x")
  with pytest.warns(Notice, match="the U-Net 'narrow' \\(my_unets\\) is not the code"):
    run_lib.check_resumable(narrow_run, config)
  run_lib.write_start(narrow_run, config, [f"class_{i}" for i in range(10)])  # a resume
  assert json.loads((narrow_run / "config.json").read_text())["registry"]["unet"] == saved


def test_main_changes_no_jax_setting_of_its_process(tmp_path):
  """`cifarjax` (run) keeps each call's buffers by running CPU calls on the main thread; main,
  which a script that registered variants calls, leaves its process's JAX settings alone."""
  script = ("import jax\nfrom cifarjax import cli\n"
            "assert cli.main(['eval-classifier', '--workdir', 'nothing']) == 2\n"
            "print(jax.config.read('jax_cpu_enable_async_dispatch'))\n")
  env = {**__import__("os").environ, "GLIBC_TUNABLES": cli.MALLOC_TUNABLES}
  out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                       capture_output=True, text=True, check=True).stdout
  assert out.split() == ["True"]


def test_run_keeps_call_buffers_before_main(monkeypatch):
  calls = []
  monkeypatch.setattr(cli, "reexec_with_huge_pages", lambda argv: calls.append("restart"))
  monkeypatch.setattr(cli, "keep_call_buffers", lambda: calls.append("keep"))
  monkeypatch.setattr(cli, "main", lambda: calls.append("main") or 0)
  with pytest.raises(SystemExit):
    cli.run()
  assert calls == ["restart", "keep", "main"]
