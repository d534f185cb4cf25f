"""Re-masking from torch ops: one in-place bitwise AND per tensor with the cached 0/-1 words of
its mask (exact +0 at pruned entries, NaN included; kept bits untouched)."""
from __future__ import annotations

from ._mask_cache import apply_and_


def apply_masks_(tensors, mask_words, *, static_key=None) -> None:
    """Contiguous real tensors and their packed int32 words (rows, ceil(cols/32))."""
    for t, words in zip(tensors, mask_words):
        apply_and_(t, words)
