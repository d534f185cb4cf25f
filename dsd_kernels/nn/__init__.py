"""Modules whose weights carry a mask in the forward pass."""
from .masked_linear import MaskedLinear, sparsify

__all__ = ["MaskedLinear", "sparsify"]
