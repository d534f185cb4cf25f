"""Re-masking of many tensors in one launch per dtype: every tile of every tensor loads its
values and mask words and writes +0 where pruned (NaN and inf included), through the same
tile table as the masked SGD step.

Launches per call: 1 per dtype present. Bytes per element: read and write the value, 1/8 of a
mask byte: 2 x 4 + 1/8 = 8.125 B for fp32 (tiles of words that keep everything are rewritten
too: the kernel does not branch per word).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._tiles import (TABLE_NUM_WARPS, TL_FLOAT, by_dtype, launch, segment_layout, tile_coords,
                     tile_segment, tile_table, tile_words_for)

# columns of the int64 segment table (one row per tensor)
SEG_VALUES = tl.constexpr(0)  # pointer to the tensor's values
SEG_MASK = tl.constexpr(1)  # pointer to its mask words
SEG_COLS = tl.constexpr(2)
SEG_WORDS_PER_ROW = tl.constexpr(3)
SEG_WORDS = tl.constexpr(4)
SEG_COLUMNS = tl.constexpr(5)


@triton.jit
def _apply_masks_kernel(SEG_META, TILES, VALUE_TYPE: tl.constexpr, TILE_WORDS: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    meta = SEG_META + tile_segment(TILES, pid) * SEG_COLUMNS
    X = tl.load(meta + SEG_VALUES).to(tl.pointer_type(VALUE_TYPE))
    W = tl.load(meta + SEG_MASK).to(tl.pointer_type(tl.int32))
    num_words = tl.load(meta + SEG_WORDS)
    offsets, valid, word = tile_coords(TILES, pid, tl.load(meta + SEG_COLS),
                                       tl.load(meta + SEG_WORDS_PER_ROW), num_words, TILE_WORDS)
    words = tl.load(W + word, mask=word < num_words, other=0)
    keep = ((words >> tl.arange(0, 32)[None, :]) & 1) != 0
    x = tl.load(X + offsets, mask=valid, other=0)
    tl.store(X + offsets, tl.where(keep, x, 0.0).to(VALUE_TYPE), mask=valid)


def apply_masks_(tensors, mask_words, *, tile_words: int | None = None) -> None:
    """Contiguous real tensors on one device and their packed int32 words (rows, ceil(cols/32))."""
    if not tensors:
        return
    device = tensors[0].device
    tile_words = tile_words_for(device, tile_words, gpu_default=32)
    for dtype, index in by_dtype(tensors).items():
        rows, num_words = [], []
        for i in index:
            cols, words_per_row, n_words = segment_layout(tensors[i])
            rows.append([tensors[i].data_ptr(), mask_words[i].data_ptr(), cols, words_per_row, n_words])
            num_words.append(n_words)
        tiles = tile_table(num_words, tile_words, device)[0]
        if tiles.shape[0]:
            meta = torch.tensor(rows, dtype=torch.int64).to(device)
            launch(_apply_masks_kernel, (tiles.shape[0],), num_warps=TABLE_NUM_WARPS)(meta, tiles, VALUE_TYPE=TL_FLOAT[dtype],
                                                           TILE_WORDS=tile_words)
