"""dsd-kernels: fast, exact kernels for Dense-Sparse-Dense (DSD) training in PyTorch.

`import dsd_kernels as dk` gives every op (`dk.magnitude_masks`, `dk.magnitude_thresholds`,
`dk.masked_sgd_`, `dk.masked_adamw_`, `dk.apply_masks_`, `dk.masked_linear`) and the `Mask`; the
submodules of _LAZY_SUBMODULES (`dk.optim`, `dk.nn`, `dk.dsd`, ...) are imported on first use, so
importing the ops stays light. The application (`dsd_kernels.app`: the train job, the benchmarks,
the command line) is never imported by the library.
"""
import importlib

from ._backend import available_backends, get_backend, set_backend, use_backend
from .masks import Mask
from .ops import (apply_masks_, magnitude_masks, magnitude_thresholds, mask_update, masked_adamw_, masked_linear,
                  masked_sgd_)

__version__ = "0.1.0"

_LAZY_SUBMODULES = ("optim", "nn", "dsd", "ops", "reference", "distributed", "scope", "integrations")

__all__ = ["Mask", "magnitude_masks", "magnitude_thresholds", "masked_sgd_", "masked_adamw_", "apply_masks_",
           "masked_linear", "mask_update", "available_backends", "get_backend", "set_backend", "use_backend", "__version__",
           "summary", *_LAZY_SUBMODULES]


def __getattr__(name: str):
    if name == "summary":  # dk.summary(model): per-weight sizes, sparsity and mask state
        return importlib.import_module(".scope", __name__).summary
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY_SUBMODULES))
