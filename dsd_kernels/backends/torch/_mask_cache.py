"""Unpacked forms of packed masks, cached per mask tensor for the torch-composite paths.

Keyed weakly on the packed words tensor and checked against its version counter, so a
mask that is replaced or modified in place is unpacked again and a dropped one frees
its cache entry.
"""
from __future__ import annotations

import torch
from torch.utils.weak import WeakTensorKeyDictionary

from ..._floatbits import KEY_SPECS
from ...masks import unpack_bool
_AND_WORDS = WeakTensorKeyDictionary()  # packed words -> {(version, int dtype, shape): words}


def and_words(words: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """0 / all-ones integers of `dtype`'s width, one per weight: AND-ing a tensor's bits with
    them gives exactly +0.0 at pruned positions (whatever the value) and leaves kept ones as
    they are."""
    int_dtype = KEY_SPECS[dtype].int_dtype
    key = (words._version, int_dtype, tuple(shape))
    cached = _AND_WORDS.get(words)
    if cached is None or cached[0] != key:
        cached = (key, unpack_bool(words, shape).to(int_dtype).neg_())  # True -> all ones
        _AND_WORDS[words] = cached
    return cached[1]


def apply_and_(t: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """Zero the pruned entries of t in place (exact +0.0, NaN/inf included)."""
    return t.view(KEY_SPECS[t.dtype].int_dtype).bitwise_and_(and_words(words, t.shape, t.dtype)).view(t.dtype)


def masked_copy(t: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """t with its pruned entries set to +0.0, as a new tensor."""
    bits = torch.bitwise_and(t.contiguous().view(KEY_SPECS[t.dtype].int_dtype), and_words(words, t.shape, t.dtype))
    return bits.view(t.dtype)
