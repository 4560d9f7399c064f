"""cifarjax: JAX/Flax reimplementation of "Efficient CIFAR-100 Modelling"."""

__version__ = "0.1.0"
