"""masked_linear on the C++ CPU kernels (csrc/cpu/masked_linear.cpp), tile skipping included."""
from __future__ import annotations

import torch

from .. import _C  # noqa: F401  (registers torch.ops.dsd_kernels_cpp)
from ..tile_structure import BLOCKED_MAX_KEPT


def forward(x2d, weight, words, bias):
    return torch.ops.dsd_kernels_cpp.masked_linear_forward(x2d, weight, words, bias, BLOCKED_MAX_KEPT)


def backward(grad2d, x2d, weight, words, needs_input: bool, needs_weight: bool):
    dx, dw = torch.ops.dsd_kernels_cpp.masked_linear_backward(grad2d, x2d, weight, words,
                                                              needs_input, needs_weight,
                                                              BLOCKED_MAX_KEPT)
    return (dx if needs_input else None), (dw if needs_weight else None)
