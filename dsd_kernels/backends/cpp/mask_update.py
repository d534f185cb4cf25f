"""mask_update's memory passes on the C++ CPU kernels (csrc/cpu/mask_update.cpp)."""
from __future__ import annotations

import torch

from ... import _C  # noqa: F401  (registers torch.ops.dsd_kernels_cpp)


def mask_subsets(kept_from, pruned_from, mask_words) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(the values of kept_from[i] at mask i's kept entries, those of pruned_from[i] at its pruned
    entries), 1-D, in flat order."""
    kept, pruned = torch.ops.dsd_kernels_cpp.mask_subsets([t.contiguous() for t in kept_from],
                                                         [t.contiguous() for t in pruned_from], list(mask_words))
    return list(kept), list(pruned)


def merge_mask_update(like, mask_words, kept_choice, pruned_choice) -> list[torch.Tensor]:
    """New packed words: kept bits take kept_choice's bits in order (1: stays), pruned bits
    pruned_choice's (1: grown)."""
    return list(torch.ops.dsd_kernels_cpp.merge_mask_update(list(like), list(mask_words), list(kept_choice),
                                                            list(pruned_choice)))
