"""One train step on 1 device and on 8 (fake CPU) devices gives the same result.

One subprocess with 8 fake devices per model runs the step on a mesh of its first device
and on a mesh of all 8, from the same state (tests/_sharded_step.py). The comparison and
its float32 tolerances are in tests/_step_agreement.py.
"""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from _step_agreement import assert_steps_agree

pytestmark = pytest.mark.integration

SCRIPT = pathlib.Path(__file__).with_name("_sharded_step.py")
BATCH = 16  # _sharded_step.py's batch of 32x32 images: the longest sums run over 16 * 32 * 32
N = BATCH * 32 * 32


@pytest.fixture(scope="module")
def one_and_eight(tmp_path_factory):
  """model -> the (1-device, 8-device) saved steps; one subprocess per model, run once."""
  done = {}

  def run(model):
    if model not in done:
      out = tmp_path_factory.mktemp(f"sharded-{model}")
      # LLVM's optimisations speed up running, not what is compared here (one step, whose
      # float tolerances hold for any compilation): at level 0 compiling takes ~60% of the time.
      env = {**os.environ, "JAX_PLATFORMS": "cpu",
             "XLA_FLAGS": "--xla_force_host_platform_device_count=8 "
                          "--xla_backend_optimization_level=0"}
      subprocess.run([sys.executable, str(SCRIPT), "--models", model, "--out", str(out)],
                     env=env, check=True, timeout=600)
      done[model] = tuple(dict(np.load(out / f"{model}-{n}.npz")) for n in (1, 8))
    return done[model]
  return run


def test_classifier_step_on_1_device_and_on_8_devices_in_2_chunks_agree(one_and_eight):
  from cifarjax.config import ClassifierConfig
  from cifarjax.models.classifier import BN_MOMENTUM
  one, eight = one_and_eight("classifier")
  report = assert_steps_agree(one, eight, n=N, lr=ClassifierConfig().learning_rate,
                              bn_momentum=BN_MOMENTUM)
  assert report["layers"] == 28  # the paper classifier's BatchNorms
  # No weight of the classifier has an analytically zero gradient (its convs carry no bias).
  assert not report["zero_gradients"], report


def test_diffusion_step_on_1_and_8_devices_agree(one_and_eight):
  from cifarjax import optim
  from cifarjax.config import DiffusionConfig
  one, eight = one_and_eight("diffusion")
  config = DiffusionConfig()
  report = assert_steps_agree(one, eight, n=N, lr=config.learning_rate,
                              ema_decay=float(optim.ema_decay_at(0, config.ema_decay)))
  # The tiny U-Net's 8-channel GroupNorms have one channel per group, so a per-channel
  # offset before one (conv biases, the last block's time encoding) changes nothing
  # downstream: those gradients are zero analytically, rounding noise here.
  assert any("TimeEncoder" in k for k in report["zero_gradients"]), report
