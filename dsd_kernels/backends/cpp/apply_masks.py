"""apply_masks_ on the C++ CPU kernel (csrc/cpu/apply_masks.cpp): all tensors of a call in one
parallel pass each over their mask words."""
from __future__ import annotations

import torch

from ... import _C  # noqa: F401  (registers torch.ops.dsd_kernels_cpp)


def apply_masks_(tensors, mask_words, *, static_key=None) -> None:
    torch.ops.dsd_kernels_cpp.apply_masks_(list(tensors), list(mask_words))
