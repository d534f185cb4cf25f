"""Plain-torch ground truth for every op: short, obviously right, slow is fine.

Imports nothing from the rest of the package; tests compare every backend against it.
"""
from .apply_masks import apply_masks_
from .masked_linear import masked_linear
from .masks import pack_bits, unpack_bits
from .magnitude_select import magnitude_masks, magnitude_thresholds, nm_masks, pruned_count
from .masked_adamw import masked_adamw_
from .masked_sgd import masked_sgd_

__all__ = ["pack_bits", "unpack_bits", "magnitude_masks", "magnitude_thresholds", "pruned_count", "nm_masks",
           "masked_sgd_", "masked_adamw_", "masked_linear", "apply_masks_"]
