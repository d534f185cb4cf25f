"""N:M masks in Triton: every program takes BLOCK_WORDS mask words of one row (32 weights
each), ranks each weight within its group of M by the selection's order (integer keys of |w|,
NaN above +inf, equal keys: the lower index is the smaller), keeps the N largest and writes the
packed words. A group may straddle two words (M not a power of two); each weight reads its
group's M keys, which the cache serves after the first.

Launches per call: 1 per tensor. Bytes per element: the weight read once (its group's other
reads hit the cache) and 1/8 byte written: 4.125 B for fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...masks import mask_rows_cols, packed_shape
from ._tiles import key_constexprs, launch, magnitude_key

# mask words per program: a GPU program of 4 warps holds 4 words' keys per thread
GPU_BLOCK_WORDS = 16
CPU_BLOCK_WORDS = 64  # the interpreter pays per program
NUM_WARPS = 4


@triton.jit
def _or(a, b):
    return a | b


@triton.jit
def _nm_masks_kernel(X, WORDS, cols, words_per_row, VALUE_TYPE: tl.constexpr, BITS_TYPE: tl.constexpr,
                     KEY_TYPE: tl.constexpr, ABS_MASK: tl.constexpr, NAN_KEY: tl.constexpr, N: tl.constexpr,
                     M: tl.constexpr, BLOCK_WORDS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    words = tl.program_id(1).to(tl.int64) * BLOCK_WORDS + tl.arange(0, BLOCK_WORDS)
    bits = tl.arange(0, 32)
    col = words[:, None] * 32 + bits[None, :]  # [BLOCK_WORDS, 32]
    valid = col < cols  # rows are whole groups: a valid weight's group is valid too
    values = X + row * cols
    key = magnitude_key(tl.load(values + col, mask=valid, other=0), BITS_TYPE, KEY_TYPE, ABS_MASK, NAN_KEY)
    first = col - col % M
    below = tl.zeros([BLOCK_WORDS, 32], dtype=tl.int32)  # group members ranked below this weight
    for j in range(M):  # a loop, not unrolled: M up to 32 unrolled would cost registers
        other = magnitude_key(tl.load(values + first + j, mask=valid, other=0), BITS_TYPE, KEY_TYPE, ABS_MASK,
                               NAN_KEY)
        below += ((other < key) | ((other == key) & (first + j < col))).to(tl.int32)
    keep = valid & (below >= M - N)
    word = tl.reduce(keep.to(tl.int32) << bits[None, :], 1, _or)
    tl.store(WORDS + row * words_per_row + words, word, mask=words < words_per_row)


def nm_masks(tensors, n: int, m: int, *, block_words: int | None = None) -> list[torch.Tensor]:
    """Packed int32 keep-words (rows, ceil(cols / 32)) of every tensor, viewed as (shape[0], -1);
    row lengths are multiples of m (checked by the op), 1 <= n < m <= 32."""
    out = []
    for t in tensors:
        rows, cols = mask_rows_cols(t.shape)
        words = torch.empty(packed_shape(t.shape), dtype=torch.int32, device=t.device)
        out.append(words)
        if t.numel() == 0:
            continue
        block = block_words or (CPU_BLOCK_WORDS if t.device.type == "cpu" else GPU_BLOCK_WORDS)
        launch(_nm_masks_kernel, (rows, triton.cdiv(words.shape[1], block)), num_warps=NUM_WARPS)(
            t.contiguous(), words, cols, words.shape[1], **key_constexprs(t.dtype), N=n, M=m, BLOCK_WORDS=block)
    return out
