"""Modules whose weights carry a mask in the forward pass, and their export to torch's
semi-structured (2:4) sparse format."""
from .masked_linear import MaskedLinear, sparsify, strip_masks
from .semi_structured import to_semi_structured, two_four_linears

__all__ = ["MaskedLinear", "sparsify", "strip_masks", "to_semi_structured", "two_four_linears"]
