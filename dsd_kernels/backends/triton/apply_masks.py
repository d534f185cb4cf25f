"""Re-masking of many tensors in one launch per dtype: every tile of every tensor loads its
values and mask words and writes +0 where pruned (NaN and inf included), through the same
tile table as the masked SGD step.

Tiles of FLAT segments load and store 16-byte vectors (see _tiles.segment_flags).

Launches per call: 1 per dtype present. Bytes per element: read and write the value, 1/8 of a
mask byte: 2 x 4 + 1/8 = 8.125 B for fp32 (tiles of words that keep everything are rewritten
too: the kernel does not branch per word).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._tiles import (FLAT, TABLE_NUM_WARPS, TL_FLOAT, flat_tile, launch, planned_tables, segment_tables, segment_tile,
                     tensor_pointers, tile_keep, tile_segment, tile_words_for)

# columns of the int64 segment table (one row per tensor)
SEG_VALUES = tl.constexpr(0)  # pointer to the tensor's values
SEG_MASK = tl.constexpr(1)  # pointer to its mask words
SEG_COLS = tl.constexpr(2)
SEG_WORDS_PER_ROW = tl.constexpr(3)
SEG_WORDS = tl.constexpr(4)
SEG_NUMEL = tl.constexpr(5)
SEG_FLAGS = tl.constexpr(6)  # FLAT (segment_flags)
SEG_COLUMNS = tl.constexpr(7)
# mask words per program on a GPU (benchmarks/sweep_tile_words.py; results/NVIDIA-H200-tile-words.json)
GPU_TILE_WORDS = 64


@triton.jit
def _mask_tile(meta, TILES, pid, W, num_words, VALUE_TYPE: tl.constexpr, TILE_WORDS: tl.constexpr,
               FLAT: tl.constexpr):
    offsets, valid, word = segment_tile(TILES, pid, tl.load(meta + SEG_COLS), tl.load(meta + SEG_WORDS_PER_ROW),
                                        num_words, TILE_WORDS, FLAT)
    X = tensor_pointers(tl.load(meta + SEG_VALUES), offsets, VALUE_TYPE, FLAT)
    x = tl.load(X, mask=valid, other=0)
    tl.store(X, tl.where(tile_keep(W, word, num_words), x, 0.0).to(VALUE_TYPE), mask=valid)


@triton.jit
def _apply_masks_kernel(SEG_META, TILES, VALUE_TYPE: tl.constexpr, TILE_WORDS: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    meta = SEG_META + tile_segment(TILES, pid) * SEG_COLUMNS
    W = tl.load(meta + SEG_MASK).to(tl.pointer_type(tl.int32))
    num_words = tl.load(meta + SEG_WORDS)
    if flat_tile(TILES, pid, (tl.load(meta + SEG_FLAGS) & FLAT) != 0, tl.load(meta + SEG_NUMEL), TILE_WORDS):
        _mask_tile(meta, TILES, pid, W, num_words, VALUE_TYPE, TILE_WORDS, True)  # see tensor_pointers
    else:
        _mask_tile(meta, TILES, pid, W, num_words, VALUE_TYPE, TILE_WORDS, False)


def apply_masks_(tensors, mask_words, *, tile_words: int | None = None, static_key=None) -> None:
    """Contiguous real tensors on one device and their packed int32 words (rows, ceil(cols/32)).
    static_key: see _tiles.planned_tables (the tensors' pointers may change, their layouts not)."""
    if not tensors:
        return
    device = tensors[0].device
    tile_words = tile_words_for(device, tile_words, gpu_default=GPU_TILE_WORDS)

    def tables():
        return segment_tables(tensors, mask_words, lambda i: [tensors[i].data_ptr()], tile_words, device)

    varying = (tuple(t.data_ptr() for t in tensors), tile_words) if static_key is not None else ()
    for dtype, _, tiles, meta in planned_tables(static_key, varying, tables):
        launch(_apply_masks_kernel, (tiles.shape[0],), num_warps=TABLE_NUM_WARPS)(
            meta, tiles, VALUE_TYPE=TL_FLOAT[dtype], TILE_WORDS=tile_words)
