"""The in-memory form of one dataset split that every source returns."""

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Split:
  """A whole split in host memory.

  images: uint8 (N, H, W, 3), NHWC.
  labels: int32 (N,), indices into `class_names`.
  class_names: one name per class, in label order.
  coarse_labels / coarse_class_names: CIFAR-100's 20 superclasses, where the
    source has them.
  """
  images: np.ndarray
  labels: np.ndarray
  class_names: tuple[str, ...]
  coarse_labels: np.ndarray | None = None
  coarse_class_names: tuple[str, ...] | None = None

  def __post_init__(self):
    check_images(self.images, what="Split.images")
    if self.labels.ndim != 1 or len(self.labels) != len(self.images):
      raise ValueError(
          f"Split.labels must have shape ({len(self.images)},), got {self.labels.shape}")
    if not np.issubdtype(self.labels.dtype, np.integer):
      raise ValueError(f"Split.labels must be integers, got {self.labels.dtype}")
    if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(self.class_names)):
      raise ValueError(
          f"Split.labels must lie in [0, {len(self.class_names)}), "
          f"got [{self.labels.min()}, {self.labels.max()}]")

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def __len__(self) -> int:
    return len(self.images)

  def take(self, index) -> "Split":
    """The examples at `index` (an index array or slice), as a new Split."""
    return dataclasses.replace(
        self,
        images=self.images[index],
        labels=self.labels[index],
        coarse_labels=None if self.coarse_labels is None else self.coarse_labels[index])


def check_images(images, what="images", size=None):
  """Raises a ValueError naming `what` unless images is uint8 (N, H, W, 3)."""
  if not isinstance(images, np.ndarray):
    raise TypeError(f"{what} must be a numpy array, got {type(images).__name__}")
  if images.dtype != np.uint8:
    raise ValueError(f"{what} must be uint8 (0..255), got dtype {images.dtype}")
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"{what} must have shape (N, H, W, 3), got {images.shape}")
  if size is not None and images.shape[1:3] != tuple(size):
    raise ValueError(f"{what} must be {size[0]}x{size[1]} images, got {images.shape[1]}x{images.shape[2]}")
