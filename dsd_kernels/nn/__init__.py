"""Modules whose weights carry a mask in the forward pass."""
from .masked_linear import MaskedLinear, sparsify, strip_masks

__all__ = ["MaskedLinear", "sparsify", "strip_masks"]
