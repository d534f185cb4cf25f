"""masked_linear on the C++ CPU kernels (csrc/cpu/masked_linear.cpp), tile skipping included (kept
tiles of fp32 multiplied by its AVX-512 kernel where the CPU has AVX-512F); there is no CUDA kernel
(the registry gives CUDA tensors to Triton)."""
from __future__ import annotations

import torch

from .. import _C  # noqa: F401  (registers torch.ops.dsd_kernels_cpp)
from ..tile_structure import blocked_tiles


def _tile_kept(words, weight):
    """The kept-tile flags when tile skipping pays (cached per mask version), else None."""
    s = blocked_tiles(words, weight.shape[0], weight.shape[1])
    return s.kept if s is not None else None


def forward(x2d, weight, words, bias):
    return torch.ops.dsd_kernels_cpp.masked_linear_forward(x2d, weight, words, bias,
                                                           _tile_kept(words, weight))


def backward(grad2d, x2d, weight, words, needs_input: bool, needs_weight: bool):
    dx, dw = torch.ops.dsd_kernels_cpp.masked_linear_backward(grad2d, x2d, weight, words,
                                                              needs_input, needs_weight,
                                                              _tile_kept(words, weight))
    return (dx if needs_input else None), (dw if needs_weight else None)
