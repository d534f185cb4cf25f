"""mask_update's memory passes in torch ops (boolean indexing over the unpacked masks)."""
from __future__ import annotations

import torch

from ...masks import Mask


def mask_subsets(kept_from, pruned_from, mask_words) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(the values of kept_from[i] at mask i's kept entries, those of pruned_from[i] at its pruned
    entries), 1-D, in flat order."""
    kept, pruned = [], []
    for a, b, words in zip(kept_from, pruned_from, mask_words):
        keep = Mask(words, a.shape).to_bool().reshape(-1)
        kept.append(a.reshape(-1)[keep])
        pruned.append(b.reshape(-1)[~keep])
    return kept, pruned


def _stream(words: torch.Tensor, n: int) -> torch.Tensor:
    return Mask(words.reshape(1, -1), (n,)).to_bool()


def merge_mask_update(like, mask_words, kept_choice, pruned_choice) -> list[torch.Tensor]:
    """New packed words: kept bits take kept_choice's bits in order (1: stays), pruned bits
    pruned_choice's (1: grown)."""
    out = []
    for t, words, stays, grows in zip(like, mask_words, kept_choice, pruned_choice):
        keep = Mask(words, t.shape).to_bool().reshape(-1)
        n_kept = int(keep.sum())
        new = torch.empty_like(keep)
        new[keep] = _stream(stays, n_kept)
        new[~keep] = _stream(grows, keep.numel() - n_kept)
        out.append(Mask.from_bool(new.reshape(t.shape)).packed)
    return out
