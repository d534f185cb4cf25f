"""dsd-kernels: fast, exact kernels for Dense-Sparse-Dense (DSD) training in PyTorch."""
from ._backend import available_backends, get_backend, set_backend
from .masks import Mask
from .ops import magnitude_masks, magnitude_thresholds, masked_linear, masked_sgd_

__version__ = "0.1.0"

__all__ = ["Mask", "magnitude_masks", "magnitude_thresholds", "masked_linear", "masked_sgd_",
           "available_backends", "get_backend", "set_backend", "__version__"]
