"""Reference mask update of dynamic sparse training (RigL, SET): a stable sort of each subset.

Contract (DESIGN.md, "Dynamic sparsity"): per tensor, with k = counts[i], of the entries the
keep-mask keeps, the k with the smallest |weight| are dropped; of the entries it prunes, the k with
the largest |score| are grown (a dense gradient for RigL, random draws for SET). Both follow the
selection's order: ascending |x|, ties by lower flat index, -0.0 == 0.0, NaN above +inf. So the
dropped are the first k of the kept entries in that order and the grown the last k of the pruned
ones (among equal scores the higher flat index grows). A dropped entry is never grown in the same
update: the grown come from the entries pruned before it. The kept count never changes.
"""
from __future__ import annotations

import torch


def _order(values: torch.Tensor) -> torch.Tensor:
    # abs() maps -0.0 to 0.0; a stable sort keeps lower indices first among ties and puts NaN last
    return torch.sort(values.abs().double(), stable=True).indices


def mask_update(weights: list[torch.Tensor], scores: list[torch.Tensor], keeps: list[torch.Tensor],
                counts: list[int]) -> list[torch.Tensor]:
    """New boolean keep-masks (True = kept), one per tensor, of the tensor's shape."""
    out = []
    for w, s, keep, k in zip(weights, scores, keeps, counts):
        flat = keep.reshape(-1).clone()
        kept = flat.nonzero().reshape(-1)
        pruned = (~flat).nonzero().reshape(-1)
        dropped = kept[_order(w.detach().reshape(-1)[kept])[:k]]
        grown = pruned[_order(s.detach().reshape(-1)[pruned])[pruned.numel() - k:]] if k else pruned[:0]
        flat[dropped] = False
        flat[grown] = True
        out.append(flat.reshape(keep.shape))
    return out
