"""FID pieces that need no network: preprocessing, input checks, Fréchet distance, sources, CLI."""

import io
import json
import zipfile

import chex
import numpy as np
import pytest
from PIL import Image

from cifarjax.fid import preprocessing as preprocess_lib
from cifarjax.fid import sources
from cifarjax.fid import stats as stats_lib
from cifarjax.fid.features import extract_features, round_up_batch_size

from _fid_exact import covariance, fid_from_features

# torch's bilinear, align_corners=False, worked by hand: 2 -> 5 source
# coordinates (d + 0.5) * 0.4 - 0.5 = -0.3 (clamped to 0), 0.1, 0.5, 0.9, 1.3
# (upper neighbour clamped to 1); 5 -> 2: (d + 0.5) * 2.5 - 0.5 = 0.75, 3.25.
UP_2_TO_5 = np.array([[1, 0], [0.9, 0.1], [0.5, 0.5], [0.1, 0.9], [0, 1]])
DOWN_5_TO_2 = np.array([[0.25, 0.75, 0, 0, 0], [0, 0, 0, 0.75, 0.25]])


def test_bilinear_matrices_match_hand_computed():
  np.testing.assert_allclose(preprocess_lib.bilinear_matrix(2, 5), UP_2_TO_5, atol=1e-7)
  np.testing.assert_allclose(preprocess_lib.bilinear_matrix(5, 2), DOWN_5_TO_2, atol=1e-7)
  np.testing.assert_allclose(preprocess_lib.bilinear_matrix(7, 7), np.eye(7), atol=1e-7)
  np.testing.assert_allclose(preprocess_lib.bilinear_matrix(32, 299).sum(1), 1, atol=1e-6)


def test_upscale_2x2_to_5x5():
  img = np.array([[0, 255], [102, 51]], np.uint8)
  rgb = np.stack([img, img.T, 255 - img], axis=-1)[None]  # (1, 2, 2, 3)
  got = np.asarray(preprocess_lib.preprocess(rgb, size=5))
  x = rgb[0].astype(np.float64) / 255
  want = 2 * np.einsum("oh,pw,hwc->opc", UP_2_TO_5, UP_2_TO_5, x) - 1
  chex.assert_shape(got, (1, 5, 5, 3))
  np.testing.assert_allclose(got[0], want, atol=1e-6)
  # One value by hand: row 1 (0.9, 0.1), column 2 (0.5, 0.5) of channel 0.
  by_hand = 0.9 * (0.5 * 0 + 0.5 * 255) + 0.1 * (0.5 * 102 + 0.5 * 51)
  np.testing.assert_allclose(got[0, 1, 2, 0], 2 * by_hand / 255 - 1, atol=1e-6)


def test_downscale_does_not_antialias():
  rgb = np.random.default_rng(0).integers(0, 256, (2, 5, 5, 3), dtype=np.uint8)
  got = np.asarray(preprocess_lib.preprocess(rgb, size=2))
  want = 2 * np.einsum("oh,pw,nhwc->nopc", DOWN_5_TO_2, DOWN_5_TO_2, rgb / 255.0) - 1
  np.testing.assert_allclose(got, want, atol=1e-6)


def test_default_size_and_range():
  got = preprocess_lib.preprocess(np.full((1, 32, 32, 3), 255, np.uint8))
  chex.assert_shape(got, (1, 299, 299, 3))
  np.testing.assert_allclose(np.asarray(got), 1.0, atol=1e-6)


@pytest.mark.parametrize("images, match", [
    (np.zeros((2, 8, 8, 3), np.float32), "uint8.*floating point"),
    (np.full((2, 8, 8, 3), 300, np.int16), r"0\.\.255.*\[300, 300\]"),
    (np.full((2, 8, 8, 3), -1, np.int32), r"0\.\.255.*\[-1, -1\]"),
    (np.zeros((2, 8, 8, 3), np.int32), "must be uint8"),
    (np.zeros((2, 8, 8, 1), np.uint8), "3 \\(RGB\\) channels.*got 1"),
    (np.zeros((2, 8, 8, 4), np.uint8), "3 \\(RGB\\) channels.*got 4"),
    (np.zeros((8, 8, 3), np.uint8), r"\(N, H, W, 3\)"),
])
def test_bad_images_are_refused(images, match):
  with pytest.raises(ValueError, match=match):
    preprocess_lib.preprocess(images)
  with pytest.raises(ValueError, match=match):  # before any weights or compilation
    extract_features(images, variables=None)


def test_batch_size_rounds_up_to_devices():
  assert round_up_batch_size(50, 8) == 56
  assert round_up_batch_size(48, 8) == 48
  assert round_up_batch_size(1, 1) == 1
  with pytest.raises(ValueError):
    round_up_batch_size(0, 1)


# --- statistics and the Fréchet distance ----------------------------------------------------

def test_activation_statistics_are_float64_mean_and_cov():
  # By hand: centred rows (-2, -4), (0, -1), (2, 5); covariance = their products / (3 - 1).
  mu, sigma = stats_lib.activation_statistics(np.array([[1, 2], [3, 5], [5, 11]], np.float32))
  assert mu.dtype == sigma.dtype == np.float64
  np.testing.assert_array_equal(mu, [3, 6])
  np.testing.assert_allclose(sigma, [[4, 9], [9, 21]], rtol=1e-15)
  # Against sums and centred products written out here (float64).
  acts = np.random.default_rng(0).normal(size=(50, 6)).astype(np.float32)
  mu, sigma = stats_lib.activation_statistics(acts)
  np.testing.assert_allclose(mu, np.sum(acts, axis=0, dtype=np.float64) / 50, rtol=1e-14)
  np.testing.assert_allclose(sigma, covariance(acts), rtol=1e-12)


def _random_cov(rng, d, n=None):
  a = rng.normal(size=(n or 2 * d, d))
  return np.cov(a, rowvar=False)


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_identical_gaussians_give_zero(method):
  rng = np.random.default_rng(1)
  mu, sigma = rng.normal(size=16), _random_cov(rng, 16)
  assert abs(stats_lib.frechet_distance(mu, sigma, mu, sigma, method=method)) < 1e-9


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_diagonal_covariances_closed_form(method):
  rng = np.random.default_rng(2)
  mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
  s1, s2 = rng.uniform(0.1, 3, 8), rng.uniform(0.1, 3, 8)
  want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
  got = stats_lib.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2), method=method)
  np.testing.assert_allclose(got, want, rtol=1e-10)


def test_scalars_are_one_dimensional_gaussians():
  # pytorch-fid's atleast_1d/atleast_2d: N(0, 4) vs N(1, 1) -> 1 + (2 - 1)^2 = 2.
  np.testing.assert_allclose(stats_lib.frechet_distance(0.0, 4.0, 1.0, 1.0), 2.0, rtol=1e-12)


def test_sqrtm_and_eigh_agree_on_singular_real_features(fid_reference_path):
  # 200 samples in 256 dimensions: rank-deficient covariances, like small FID sets.
  with np.load(fid_reference_path) as ref:
    a, b = ref["acts_set1"][:200, :256], ref["acts_set2"][:200, :256]
  m1, s1 = stats_lib.activation_statistics(a)
  m2, s2 = stats_lib.activation_statistics(b)
  exact = stats_lib.frechet_distance(m1, s1, m2, s2)
  fast = stats_lib.frechet_distance(m1, s1, m2, s2, method="eigh")
  np.testing.assert_allclose(fast, exact, rtol=1e-5)
  # Both against the FID taken from the features without any matrix square root.
  np.testing.assert_allclose(exact, fid_from_features(a, b), rtol=1e-5)


def test_singular_product_retries_with_eps_offset(monkeypatch):
  calls = []
  real = stats_lib._sqrtm

  def flaky(a):
    calls.append(a)
    return np.full_like(a, np.nan) if len(calls) == 1 else real(a)
  monkeypatch.setattr(stats_lib, "_sqrtm", flaky)
  s1, s2 = np.diag([1.0, 2.0]), np.diag([3.0, 4.0])
  with pytest.warns(RuntimeWarning, match="singular product"):
    got = stats_lib.frechet_distance(np.zeros(2), s1, np.zeros(2), s2, eps=1e-3)
  np.testing.assert_allclose(calls[1], (s1 + 1e-3 * np.eye(2)) @ (s2 + 1e-3 * np.eye(2)))
  want = 10 - 2 * (np.sqrt(1.001 * 3.001) + np.sqrt(2.001 * 4.001))
  np.testing.assert_allclose(got, want, rtol=1e-12)


def test_imaginary_component_tolerance(monkeypatch):
  s = np.eye(2)
  monkeypatch.setattr(stats_lib, "_sqrtm", lambda a: np.eye(2) + 1e-4j)
  got = stats_lib.frechet_distance(np.zeros(2), s, np.zeros(2), s)
  np.testing.assert_allclose(got, 0, atol=1e-12)
  monkeypatch.setattr(stats_lib, "_sqrtm", lambda a: np.eye(2) + 1e-2j)
  with pytest.raises(ValueError, match="imaginary component"):
    stats_lib.frechet_distance(np.zeros(2), s, np.zeros(2), s)


def test_shape_mismatch_is_refused():
  with pytest.raises(ValueError, match="mean vectors"):
    stats_lib.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
  with pytest.raises(ValueError, match="method"):
    stats_lib.frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(2), method="svd")


# --- sources and the CLI --------------------------------------------------------------------

def _png(array):
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format="PNG")
  return buf.getvalue()


def test_read_images_recursively_sorted_rgb(tmp_path):
  rng = np.random.default_rng(0)
  imgs = rng.integers(0, 256, (3, 6, 5, 3), dtype=np.uint8)
  (tmp_path / "d" / "sub").mkdir(parents=True)
  (tmp_path / "d" / "b.png").write_bytes(_png(imgs[1]))
  (tmp_path / "d" / "sub" / "c.png").write_bytes(_png(imgs[2]))
  (tmp_path / "d" / "a.png").write_bytes(_png(imgs[0][..., 0]))  # grayscale -> RGB
  (tmp_path / "d" / "notes.txt").write_text("not an image")
  got = sources.read_images(tmp_path / "d")
  np.testing.assert_array_equal(got[1:], imgs[1:])
  np.testing.assert_array_equal(got[0], np.repeat(imgs[0][..., :1], 3, axis=-1))

  with zipfile.ZipFile(tmp_path / "d.zip", "w") as zf:
    for i, name in enumerate(["x/sub/c.png", "x/a.png", "x/b.png"]):
      zf.writestr(name, _png(imgs[[2, 0, 1][i]]))
  np.testing.assert_array_equal(sources.read_images(tmp_path / "d.zip"), imgs)


def test_read_images_errors(tmp_path):
  with pytest.raises(FileNotFoundError):
    sources.read_images(tmp_path / "absent")
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="no images"):
    sources.read_images(tmp_path / "empty")
  (tmp_path / "mixed").mkdir()
  (tmp_path / "mixed" / "a.png").write_bytes(_png(np.zeros((4, 4, 3), np.uint8)))
  (tmp_path / "mixed" / "b.png").write_bytes(_png(np.zeros((5, 4, 3), np.uint8)))
  with pytest.raises(ValueError, match="differ in size"):
    sources.read_images(tmp_path / "mixed")


def test_load_source_kinds(tmp_path):
  np.savez(tmp_path / "s.npz", mu=np.zeros(3), sigma=np.eye(3))
  np.savez(tmp_path / "i.npz", images=np.zeros((2, 4, 4, 3), np.uint8))
  np.savez(tmp_path / "bad.npz", other=np.zeros(2))
  kind, (mu, sigma) = sources.load_source(str(tmp_path / "s.npz"))
  assert kind == "stats" and mu.shape == (3,) and sigma.shape == (3, 3)
  kind, images = sources.load_source(str(tmp_path / "i.npz"))
  assert kind == "images" and images.shape == (2, 4, 4, 3)
  with pytest.raises(ValueError, match="neither FID statistics"):
    sources.load_source(str(tmp_path / "bad.npz"))
  with pytest.raises(FileNotFoundError, match="not a dataset name"):
    sources.load_source(str(tmp_path / "nothing-here"))


def test_cli_fid_between_stats_files(tmp_path, capsys):
  from cifarjax.cli import main
  np.savez(tmp_path / "a.npz", mu=np.zeros(4), sigma=np.diag([1.0, 1, 4, 4]))
  np.savez(tmp_path / "b.npz", mu=np.ones(4), sigma=np.diag([1.0, 1, 1, 1]))
  assert main(["fid", str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), "--json",
               "--weights", str(tmp_path / "unused.pth")]) == 0
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  np.testing.assert_allclose(result["fid"], 4 + 2, rtol=1e-9)  # |1|^2 * 4 + 2 * (2 - 1)^2


def test_cli_reports_missing_weights(tmp_path, capsys):
  from cifarjax.cli import main
  np.savez(tmp_path / "i.npz", images=np.zeros((2, 4, 4, 3), np.uint8))
  code = main(["fid-stats", str(tmp_path / "i.npz"), "--out", str(tmp_path / "o.npz"),
               "--weights", str(tmp_path / "missing.pth")])
  assert code == 2
  assert "CIFARJAX_FID_WEIGHTS" in capsys.readouterr().err
