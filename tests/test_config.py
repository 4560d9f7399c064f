"""Configs as data: each field says what it may hold, and one check reads it."""

import dataclasses
import math
import subprocess
import sys

import pytest

from cifarjax import config as config_lib, data
from cifarjax.config import (CLASSIFIER_PRESETS, DIFFUSION_PRESETS, AugmentConfig,
                             ClassifierConfig, ConfigError, DiffusionConfig, Range)

CONFIGS = (ClassifierConfig, DiffusionConfig, AugmentConfig)


def leaf_fields(cls, prefix=""):
  """(dotted path, field) of every field of a config and of the configs nested in it."""
  for f in dataclasses.fields(cls):
    kind = config_lib.field_type(f)
    if dataclasses.is_dataclass(kind):
      yield from leaf_fields(kind, f"{prefix}{f.name}.")
    else:
      yield prefix + f.name, f


def with_value(config, path: str, value):
  head, _, rest = path.partition(".")
  inner = with_value(getattr(config, head), rest, value) if rest else value
  return dataclasses.replace(config, **{head: inner})


@pytest.mark.parametrize("cls", CONFIGS)
def test_every_field_says_what_it_may_hold(cls):
  settings = {spec.settings for spec in config_lib.entry_fields(cls).values() if spec.settings}
  for path, f in leaf_fields(cls):
    kind = config_lib.field_type(f)
    if kind is dict:
      assert f.name in settings, f"{path}: a dict that holds no entry's settings"
    elif kind is not bool:
      assert {"range", "choices", "entry", "names"} & set(f.metadata), path
    assert "range" not in f.metadata or kind in (int, float), path


@pytest.mark.parametrize("cls", (ClassifierConfig, DiffusionConfig))
def test_a_value_just_outside_a_field_s_range_is_refused_naming_the_field(cls):
  checked = 0
  for path, f in leaf_fields(cls):
    r = f.metadata.get("range")
    if r is None:
      continue
    step = 1 if config_lib.field_type(f) is int else 0.5
    outside = [r.low if r.low_open else r.low - step]
    if r.high != math.inf:
      outside.append(r.high if r.high_open else r.high + step)
    for value in outside:
      with pytest.raises(ConfigError) as info:
        config_lib.validate(with_value(cls(), path, value))
      assert info.value.fields == (path,)
      assert str(info.value).startswith(f"config field {path} must "), str(info.value)
      checked += 1
  assert checked >= 15


@pytest.mark.parametrize("path,value,message", [
    ("steps", 0, "config field steps must be positive, got 0"),
    ("warmup_steps", -1, "config field warmup_steps must be non-negative, got -1"),
    ("batch_size", 2.0, "config field batch_size must be an integer, got 2.0"),
    ("seed", 2**32, "config field seed must lie in [0, 4294967296), got 4294967296"),
    ("learning_rate", 0, "config field learning_rate must lie in (0, inf), got 0"),
    ("lr_decay", 1.5, "config field lr_decay must lie in (0, 1], got 1.5"),
    ("dropout", float("nan"), "config field dropout must be a number, got nan"),
    ("augment.crop_prob", 2, "config field augment.crop_prob must lie in [0, 1], got 2"),
    ("augment.crop_padding", -1, "config field augment.crop_padding must be non-negative"),
    ("eval_flip", "yes", "config field eval_flip must be true or false, got 'yes'"),
    ("data", " ", "config field data must name a data source, got ' '"),
    ("optimizer", "sgd", "config field optimizer must be one of adam, adamw, got 'sgd'"),
    ("layers", 3, "config field layers must be a string, got 3"),
    ("model", "wide", "config field model must be one of paper, got 'wide' (one of your own"),
])
def test_the_library_names_fields_in_its_own_words(path, value, message):
  with pytest.raises(ConfigError) as info:
    config_lib.validate(with_value(ClassifierConfig(), path, value))
  assert str(info.value).startswith(message), str(info.value)
  assert "--" not in str(info.value).split(" (")[0]


def test_fields_that_must_fit_together_name_each_of_them():
  with pytest.raises(ConfigError) as info:
    config_lib.validate(ClassifierConfig(lr_schedule="cosine", warmup_steps=5, steps=5))
  assert info.value.fields == ("warmup_steps", "steps")
  assert str(info.value) == "config field warmup_steps 5 must be fewer than config field steps 5"
  assert info.value.worded(lambda f: f.upper()) == "WARMUP_STEPS 5 must be fewer than STEPS 5"
  with pytest.raises(ConfigError) as info:
    config_lib.validate(DiffusionConfig(steps_per_call=3))
  assert info.value.fields == ("log_every", "steps_per_call")
  assert str(info.value) == ("config field log_every 100 must be a multiple of config field "
                             "steps_per_call 3, so that fused calls end on it")


def test_ranges_hold_their_ends_as_written():
  assert str(Range(0, 1)) == "[0, 1]" and str(Range(0, 1, high_open=True)) == "[0, 1)"
  assert str(Range(0, low_open=True)) == "(0, inf)"
  assert Range(0, 1).holds(0) and Range(0, 1).holds(1)
  assert not Range(0, 1, low_open=True).holds(0) and not Range(0, 1, high_open=True).holds(1)
  assert Range(2).requirement(integer=True) == "be at least 2"
  assert Range(2).requirement(integer=False) == "lie in [2, inf)"


def test_presets_are_valid_and_the_entries_are_named_in_field_order():
  for preset in (*CLASSIFIER_PRESETS.values(), *DIFFUSION_PRESETS.values()):
    config_lib.validate(preset)
  assert list(config_lib.entry_fields(DiffusionConfig)) == [
      "schedule", "prediction", "loss_weighting", "unet"]
  assert [u.field for u in config_lib.entries_used(ClassifierConfig())] == ["model"]


def test_configs_import_no_jax_and_name_the_data_sets_of_cifarjax_data():
  assert config_lib.DATASET_NAMES is data.DATASET_NAMES
  code = "import sys, cifarjax.config, cifarjax.cli; print('jax' in sys.modules)"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "False"
