"""Shared pieces of the Triton kernels: tile tables, dtype tables and launch counting.

Each tensor of a batch (a segment) is viewed in the packed-mask layout: rows = shape[0]
for tensors of 2 or more dims (1 otherwise), cols = numel // rows, and words of 32
consecutive columns. A tile is TILE_WORDS consecutive words of one segment; the grid
has one program per tile of every segment, so one launch covers a whole list of
tensors, and a tile's 32-bit mask words line up with the elements it loads.
"""
from __future__ import annotations

from collections import Counter

import torch
import triton
import triton.language as tl

from ..masks import mask_rows_cols, packed_shape

# columns of the int64 tile table (one row per tile)
TILE_SEGMENT = tl.constexpr(0)
TILE_FIRST_WORD = tl.constexpr(1)
TILE_COLUMNS = tl.constexpr(2)

TL_FLOAT = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
            torch.float64: tl.float64}
TL_INT = {torch.int16: tl.int16, torch.int32: tl.int32, torch.int64: tl.int64}

LAUNCHES: Counter = Counter()  # Triton launches issued so far, per kernel name (tests read it)
# Warps per program of the multi-tensor (tile table) kernels: with triton's default of 4, the
# momentum SGD step and the fp64 mask kernel spill registers on sm_80 (tests/test_aot.py)
TABLE_NUM_WARPS = 8


def launch(kernel, grid, **options):
    """kernel[grid] with launch `options` (num_warps, ...), counted in LAUNCHES."""
    LAUNCHES[kernel.fn.__name__] += 1
    if not options:
        return kernel[grid]
    return lambda *args, **kwargs: kernel[grid](*args, **kwargs, **options)


def segment_layout(t: torch.Tensor) -> tuple[int, int, int]:
    """(cols, words_per_row, num_words) of a tensor in the mask layout."""
    rows, words_per_row = packed_shape(t.shape)
    return mask_rows_cols(t.shape)[1], words_per_row, rows * words_per_row


def check_tile_words(tile_words: int) -> None:
    if tile_words < 1 or tile_words & (tile_words - 1):
        raise ValueError(f"tile_words must be a power of two, got {tile_words}")


def tile_words_for(device: torch.device, tile_words: int | None, gpu_default: int) -> int:
    """The checked tile size: `tile_words` if given, else gpu_default on a GPU and 256 on CPU
    (the interpreter pays per program: fewer, larger tiles there)."""
    if tile_words is None:
        tile_words = 256 if device.type == "cpu" else gpu_default
    check_tile_words(tile_words)
    return tile_words


def by_dtype(tensors) -> dict[torch.dtype, list[int]]:
    """Indices of the tensors per dtype, in order: one batch of launches per dtype."""
    groups: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault(t.dtype, []).append(i)
    return groups


def tile_table(num_words: list[int], tile_words: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 (num_tiles, TILE_COLUMNS) table of (segment, first word), and each segment's first tile."""
    per_seg = torch.tensor([-(-n // tile_words) for n in num_words], dtype=torch.int64)
    num_tiles = int(per_seg.sum())
    seg = torch.repeat_interleave(torch.arange(len(num_words)), per_seg)
    first_tile = torch.cumsum(per_seg, 0) - per_seg
    first_word = (torch.arange(num_tiles) - first_tile[seg]) * tile_words
    return torch.stack([seg, first_word], 1).to(device), first_tile.to(device)


@triton.jit
def tile_segment(TILES, pid):
    return tl.load(TILES + pid * TILE_COLUMNS + TILE_SEGMENT)


@triton.jit
def tile_coords(TILES, pid, cols, words_per_row, num_words, TILE_WORDS: tl.constexpr):
    """Flat element offsets (TILE_WORDS, 32), validity, and word index (TILE_WORDS, 1) of a tile."""
    first_word = tl.load(TILES + pid * TILE_COLUMNS + TILE_FIRST_WORD)
    word = first_word + tl.arange(0, TILE_WORDS).to(tl.int64)[:, None]
    bit = tl.arange(0, 32).to(tl.int64)[None, :]
    row = word // words_per_row
    col = (word - row * words_per_row) * 32 + bit
    valid = (word < num_words) & (col < cols)
    return row * cols + col, valid, word
