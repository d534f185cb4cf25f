"""Tile tables shared by the multi-tensor kernels.

Each tensor of a batch (a segment) is viewed in the packed-mask layout: rows = shape[0]
for tensors of 2 or more dims (1 otherwise), cols = numel // rows, and words of 32
consecutive columns. A tile is TILE_WORDS consecutive words of one segment; the grid
has one program per tile of every segment, so one launch covers a whole list of
tensors, and a tile's 32-bit mask words line up with the elements it loads.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..masks import mask_rows_cols


def segment_layout(t: torch.Tensor) -> tuple[int, int, int]:
    """(cols, words_per_row, num_words) of a tensor in the mask layout."""
    rows, cols = mask_rows_cols(t.shape)
    words_per_row = (cols + 31) // 32
    return cols, words_per_row, rows * words_per_row


def check_tile_words(tile_words: int) -> None:
    if tile_words < 1 or tile_words & (tile_words - 1):
        raise ValueError(f"tile_words must be a power of two, got {tile_words}")


def tile_table(num_words: list[int], tile_words: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 (num_tiles, 2) table of (segment, first word), and each segment's first tile."""
    per_seg = torch.tensor([-(-n // tile_words) for n in num_words], dtype=torch.int64)
    num_tiles = int(per_seg.sum())
    seg = torch.repeat_interleave(torch.arange(len(num_words)), per_seg)
    first_tile = torch.cumsum(per_seg, 0) - per_seg
    first_word = (torch.arange(num_tiles) - first_tile[seg]) * tile_words
    return torch.stack([seg, first_word], 1).to(device), first_tile.to(device)


@triton.jit
def tile_coords(TILES, pid, cols, words_per_row, num_words, TILE_WORDS: tl.constexpr):
    """Flat element offsets (TILE_WORDS, 32), validity, and word index (TILE_WORDS, 1) of a tile."""
    first_word = tl.load(TILES + 2 * pid + 1)
    word = first_word + tl.arange(0, TILE_WORDS).to(tl.int64)[:, None]
    bit = tl.arange(0, 32).to(tl.int64)[None, :]
    row = word // words_per_row
    col = (word - row * words_per_row) * 32 + bit
    valid = (word < num_words) & (col < cols)
    return row * cols + col, valid, word


@triton.jit
def keep_bits(WORDS, word, num_words):
    """(TILE_WORDS, 32) keep flags unpacked from one tile's mask words (LSB first)."""
    words = tl.load(WORDS + word, mask=word < num_words, other=0)
    return ((words >> tl.arange(0, 32)[None, :]) & 1) != 0
