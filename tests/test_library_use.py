"""The code of README's "Use as a library" section runs as written.

"Variants of your own" shows a module that registers a block, a schedule, a loss weighting
and a sampler, the command lines that train, sample and score them, and the same from
Python; the blocks are read from README.md here, so they cannot drift from what is run.
Each command line runs as in a fresh shell: the registries as cifarjax defines them and
my_variants not imported, so that what brings the variants back is --import or the run's
config.json; `sample` runs in a process of its own, as the `cifarjax` command does.
"""

import json
import pathlib
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest

from cifarjax import cli, diffusion, plugins, registry

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def library_blocks(language: str) -> list[str]:
  text = README.read_text()
  section = text.split("## Use as a library", 1)[1].split("\n## ", 1)[0]
  return re.findall(rf"```{language}\n(.*?)```", section, flags=re.S)


def block_with(language: str, text: str) -> str:
  (found,) = [b for b in library_blocks(language) if text in b]
  return found


def variant_commands() -> list[list[str]]:
  lines = block_with("bash", "--import my_variants").splitlines()
  return [shlex.split(line) for line in lines if line.startswith("cifarjax ")]


@pytest.fixture
def variants(tmp_path, monkeypatch, fresh_registries):
  """A folder holding README's my_variants.py, the current directory; the registries as
  cifarjax defines them, again after the test, and its value makes them so again."""
  (tmp_path / "my_variants.py").write_text(block_with("python", "# my_variants.py"))
  monkeypatch.chdir(tmp_path)
  as_in_a_fresh_process = lambda: fresh_registries("my_variants")
  as_in_a_fresh_process()
  return tmp_path, as_in_a_fresh_process


def imported_variants():
  """my_variants, imported as --import does (from the current directory)."""
  plugins.import_modules(["my_variants"])
  return sys.modules["my_variants"]


def test_readme_shows_a_variant_of_each_kind_and_the_commands_for_them():
  module = block_with("python", "# my_variants.py")
  for registry_name in ("models.CLASSIFIERS", "diffusion.SCHEDULES", "diffusion.LOSS_WEIGHTINGS",
                        "diffusion.SAMPLERS"):
    assert re.search(rf"^{re.escape(registry_name)}\[", module, flags=re.M), registry_name
  assert [argv[1] for argv in variant_commands()] == [
      "train-classifier", "eval-classifier", "train-diffusion", "sample", "eval-diffusion"]


@pytest.mark.integration
def test_variants_train_sample_and_score_from_the_command_line(variants, fake_inception,
                                                                monkeypatch, capsys):
  """README's command lines, each as in a fresh shell: --import brings the variants to the
  train commands, and config.json brings them back to the rest (sample, in a process of
  its own, too); every setting and each entry's code is in config.json."""
  folder, as_in_a_fresh_process = variants
  monkeypatch.setenv("CIFARJAX_FID_WEIGHTS", str(fake_inception[1]))
  for argv in variant_commands():
    as_in_a_fresh_process()
    if argv[1] == "sample":
      done = subprocess.run([sys.executable, "-m", "cifarjax", *argv[1:]], cwd=folder,
                            capture_output=True, text=True)
      code, err = done.returncode, done.stderr
    else:
      code, err = cli.main(argv[1:]), capsys.readouterr().err
    assert code == 0, (argv, err)
    assert "is not the code" not in err, err  # each entry as the run started with it

  my_variants = imported_variants()
  fire = json.loads((folder / "runs/fire/config.json").read_text())
  assert (fire["model"], fire["model_kwargs"], fire["imports"]) == ("fire", {"squeeze": 8},
                                                                     ["my_variants"])
  assert fire["registry"]["model"] == {
      "name": "fire", "module": "my_variants",
      "source_sha256": registry.fingerprint(my_variants.fire_classifier)}
  from cifarjax.train_classifier import load_trained
  _, state, _, _ = load_trained(folder / "runs/fire")
  assert state.params["FireBlock_0"]["Conv_0"]["kernel"].shape == (1, 1, 16, 8)  # squeeze 8

  cosine = json.loads((folder / "runs/cosine/config.json").read_text())
  assert {k: cosine[k] for k in ("prediction", "schedule", "schedule_kwargs", "loss_weighting",
                                 "loss_weighting_kwargs", "imports")} == {
      "prediction": "v", "schedule": "cosine", "schedule_kwargs": {"s": 0.02},
      "loss_weighting": "truncated-snr", "loss_weighting_kwargs": {"floor": 1.0},
      "imports": ["my_variants"]}
  assert cosine["registry"]["schedule"]["source_sha256"] == registry.fingerprint(
      my_variants.cosine_schedule)
  assert cosine["registry"]["loss_weighting"]["module"] == "my_variants"

  with np.load(folder / "runs/cosine/samples.npz") as samples:
    assert samples["images"].shape == (20, 32, 32, 3) and samples["images"].dtype == np.uint8
  summary = json.loads((folder / "runs/cosine/summary.json").read_text())
  assert np.isfinite(summary["fid"])
  assert {k: summary[k] for k in ("fid_num", "fid_sampler", "fid_steps", "fid_eta",
                                  "fid_sampler_kwargs")} == {
      "fid_num": 64, "fid_sampler": "euler-a", "fid_steps": 20, "fid_eta": 1.0,
      "fid_sampler_kwargs": {"s_noise": 1.0}}
  assert summary["fid_sampler_source_sha256"] == registry.fingerprint(my_variants.euler_ancestral)


@pytest.mark.integration
def test_variants_from_python(variants, monkeypatch):
  folder, _ = variants
  monkeypatch.syspath_prepend(str(folder))
  namespace = {"__name__": "readme_python"}
  exec(compile(block_with("python", "import my_variants"), "README.md:python", "exec"), namespace)
  assert namespace["summary"]["model"] == "fire" and namespace["summary"]["steps"] == 4
  assert namespace["config"].model_kwargs == {"squeeze": 8}
  assert namespace["state"].params["FireBlock_0"]["Conv_0"]["kernel"].shape == (1, 1, 16, 8)
  assert namespace["images"].shape == (4, 32, 32, 3)
  assert np.isfinite(np.asarray(namespace["images"])).all()


def test_readme_cosine_schedule_is_nichol_and_dhariwals(variants):
  """alphabar_t = f(t + 1) / f(0) in float64, wherever no beta reached the 0.999 clip."""
  my_variants = imported_variants()
  T, s = 1000, 0.02
  schedule = diffusion.make_schedule("cosine", T, {"s": s})
  f = lambda t: np.cos((t / T + s) / (1 + s) * np.pi / 2) ** 2
  t = np.arange(T)
  unclipped = np.asarray(schedule.betas) < 0.999
  assert unclipped[:-1].all()  # only the last step, where f reaches 0, is clipped
  np.testing.assert_allclose(np.asarray(schedule.alphas_cumprod)[unclipped],
                             (f(t + 1) / f(0))[unclipped], rtol=2e-6)
  with pytest.raises(ValueError, match="s must be positive"):
    my_variants.cosine_schedule(10, s=0.0)


def test_readme_truncated_snr_weighting(variants):
  """The x0 error weighted by max(SNR, floor): in eps's error, max(SNR, floor) / SNR, so floor
  0 is the unweighted loss exactly; in v's, max(SNR, 1) / (SNR + 1), within [1/2, 1]."""
  import jax.numpy as jnp
  my_variants = imported_variants()
  schedule = diffusion.make_schedule("cosine", 1000)
  t = jnp.arange(1000)
  eps_0 = diffusion.loss_weights(schedule, t, loss_weighting="truncated-snr",
                                 loss_weighting_kwargs={"floor": 0.0})
  assert (np.asarray(eps_0) == 1.0).all()
  v_1 = np.asarray(diffusion.loss_weights(schedule, t, prediction="v",
                                          loss_weighting="truncated-snr"))
  assert ((0.5 - 1e-6 <= v_1) & (v_1 <= 1 + 1e-6)).all() and v_1.min() < 0.51
  snr = np.asarray(diffusion.snr(schedule, t), np.float64)
  np.testing.assert_allclose(v_1, np.maximum(snr, 1) / (snr + 1), rtol=1e-5)
  with pytest.raises(ValueError, match="floor must be non-negative"):
    my_variants.truncated_snr_weighting(jnp.ones(2), jnp.ones(2), floor=-1.0)


def test_readme_euler_ancestral_is_ddim_at_eta_0(variants):
  """Euler's step in sigma = sigma_t / alpha_t is DDIM's step written otherwise: at eta 0 the
  two chains agree up to float32 rounding. The model is the exact eps of Gaussian data
  (mean 0.2, std 0.5), unclipped, whose chain does not amplify errors; both forms divide
  by alpha_t at the first step, 6.4e-3 on the linear schedule, which puts their rounding
  near |x| 2^-24 / 6.4e-3 = 3e-5 (|x| <= 5): atol 1e-4. From the same x_T, with eta > 0 the
  key matters, and s_noise 0 takes the smaller deterministic steps only."""
  import jax
  import jax.numpy as jnp
  imported_variants()  # registers euler-a
  schedule = diffusion.make_schedule("linear", 1000)

  def eps_fn(x, t, labels):
    a = schedule.alphas_cumprod[t][:, None, None, None]
    return jnp.sqrt(1 - a) * (x - jnp.sqrt(a) * 0.2) / (a * 0.25 + 1 - a)

  x_T = jax.random.normal(jax.random.PRNGKey(0), (4, 32, 32, 3))  # the same start for every key
  draw = jax.jit(lambda rng, sampler, eta, s_noise: diffusion.sample(
      eps_fn, schedule, rng, jnp.zeros(4, jnp.int32), sampler=sampler, num_steps=10, eta=eta,
      x_T=x_T, clip="off",
      **({"sampler_kwargs": {"s_noise": s_noise}} if sampler == "euler-a" else {})),
      static_argnums=(1, 2, 3))
  key, other = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
  ddim = draw(key, "ddim", 0.0, 1.0)
  np.testing.assert_allclose(draw(key, "euler-a", 0.0, 1.0), ddim, atol=1e-4)
  ancestral = draw(key, "euler-a", 1.0, 1.0)
  assert np.abs(ancestral - ddim).max() > 0.1
  assert np.abs(draw(other, "euler-a", 1.0, 1.0) - ancestral).max() > 0.1
  np.testing.assert_array_equal(draw(key, "euler-a", 1.0, 0.0), draw(other, "euler-a", 1.0, 0.0))
  assert diffusion.check_sampler("euler-a", schedule, 10, 1.0) == {"s_noise": 1.0}


@pytest.mark.integration
def test_fid_of_arrays(monkeypatch, tmp_path, fid_weights_path, capsys):
  """The block prints the FID of two sets of 16 noise images: the Fréchet distance of the
  features it extracted, which tests/_fid_exact.py computes again without cifarjax.fid.stats."""
  import functools

  from cifarjax.fid import features as features_lib
  from cifarjax.fid import stats as stats_lib
  from _fid_exact import fid_from_features
  monkeypatch.setenv("CIFARJAX_FID_WEIGHTS", str(fid_weights_path))
  # The Fréchet distance's plumbing is what runs here: its eigh form, seconds faster than
  # scipy's sqrtm of a 2048 x 2048 product (test_fid_units.py checks both agree).
  monkeypatch.setattr(stats_lib, "frechet_distance",
                      functools.partial(stats_lib.frechet_distance, method="eigh"))
  extracted = []
  real_extract = features_lib.extract_features

  def extract(images, *args, **kwargs):
    extracted.append((np.asarray(images), real_extract(images, *args, **kwargs)))
    return extracted[-1][1]
  monkeypatch.setattr(features_lib, "extract_features", extract)

  monkeypatch.chdir(tmp_path)
  namespace = {"__name__": "readme_fid"}
  exec(compile(block_with("python", "fid.compute_fid"), "README.md:fid", "exec"), namespace)
  printed = float(capsys.readouterr().out.strip().splitlines()[-1])
  (images_a, feats_a), (images_b, feats_b) = extracted
  np.testing.assert_array_equal(images_a, namespace["a"])
  np.testing.assert_array_equal(images_b, namespace["b"])
  assert feats_a.shape == feats_b.shape == (16, 2048)
  np.testing.assert_allclose(printed, fid_from_features(feats_a, feats_b), rtol=1e-6)
  assert printed > 1  # two different sets; 16 samples in 2048 dimensions sit far apart
  mu, sigma = stats_lib.activation_statistics(feats_a)  # and a set against itself: zero
  assert abs(stats_lib.frechet_distance(mu, sigma, mu, sigma)) < 1e-6 * printed
