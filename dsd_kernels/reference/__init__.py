"""Plain-torch ground truth for every op: short, obviously right, slow is fine.

Imports nothing from the rest of the package; tests compare every backend against it.
"""
from .masks import pack_bits, unpack_bits
from .selection import magnitude_keep_masks, magnitude_thresholds, pruned_count

__all__ = ["pack_bits", "unpack_bits", "magnitude_keep_masks", "magnitude_thresholds", "pruned_count"]
from .sgd import masked_sgd_  # noqa: E402

__all__.append("masked_sgd_")
from .linear import masked_linear  # noqa: E402

__all__.append("masked_linear")
