"""Masked linear from torch ops (CPU path, and fp64 anywhere): F.linear / matmul on W*M.

On CPU the matmul dominates; W*M costs one bitwise-AND pass over W with the cached
0/-1 words of the mask (see _mask_cache), and dW is masked the same way in place.
"""
from __future__ import annotations

import torch

from ._mask_cache import apply_and_, masked_copy


def forward(x2d, weight, words, bias):
    return torch.nn.functional.linear(x2d, masked_copy(weight, words), bias)


def backward(grad2d, x2d, weight, words, needs_input: bool, needs_weight: bool):
    dx = grad2d @ masked_copy(weight, words) if needs_input else None
    dw = apply_and_(grad2d.t() @ x2d, words) if needs_weight else None
    return dx, dw
