"""mask_update on the C++ CPU kernels (csrc/cpu/mask_update.cpp): the whole update in one call
(the split into kept weights and pruned scores, both exact selections, the new words), and the
split alone."""
from __future__ import annotations

import torch

from ... import _C  # noqa: F401  (registers torch.ops.dsd_kernels_cpp)


def update(weights, scores, mask_words, counts) -> list[torch.Tensor]:
    """The packed words of every tensor's updated mask (ops.mask_update's contract); a count
    above what the mask can move is a ValueError naming it."""
    return list(torch.ops.dsd_kernels_cpp.mask_update([t.contiguous() for t in weights],
                                                      [t.contiguous() for t in scores], list(mask_words), list(counts)))


def mask_subsets(kept_from, pruned_from, mask_words) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(the values of kept_from[i] at mask i's kept entries, those of pruned_from[i] at its pruned
    entries), 1-D, in flat order."""
    kept, pruned = torch.ops.dsd_kernels_cpp.mask_subsets([t.contiguous() for t in kept_from],
                                                         [t.contiguous() for t in pruned_from], list(mask_words))
    return list(kept), list(pruned)
