"""pytorch-fid's FID in JAX: the same Inception network, preprocessing and statistics.

  variables = load_inception_params()            # or load_inception_params("weights.npz")
  acts = extract_features(images_uint8, variables)
  mu, sigma = activation_statistics(acts)
  fid = frechet_distance(mu, sigma, *reference_stats("cifar100", "train"))
  fid = fid_from_sources("samples.npz", "cifar100")   # as `python -m pytorch_fid A B`
"""

from cifarjax.fid.features import DEFAULT_BATCH_SIZE, extract_features
from cifarjax.fid.inception import FEATURE_DIM, FIDInception
from cifarjax.fid.preprocessing import preprocess
from cifarjax.fid.sources import (compute_fid, fid_from_sources, read_images, reference_stats,
                                  save_stats, stats_from_images, stats_from_source,
                                  training_reference_stats)
from cifarjax.fid.stats import activation_statistics, frechet_distance
from cifarjax.cache import cache_dir
from cifarjax.fid.weights import (WEIGHTS_ENV, load_inception_params,
                                  resolve_weights_path)

__all__ = [
    "DEFAULT_BATCH_SIZE", "FEATURE_DIM", "FIDInception", "WEIGHTS_ENV", "activation_statistics",
    "cache_dir", "compute_fid", "extract_features", "fid_from_sources", "frechet_distance",
    "load_inception_params", "preprocess", "read_images", "reference_stats",
    "resolve_weights_path", "save_stats", "stats_from_images", "stats_from_source",
    "training_reference_stats",
]
