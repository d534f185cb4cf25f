"""Batched exact magnitude selection: radix select over all layers in a few launches.

Every tensor of the batch is a segment viewed in the packed-mask layout
(rows, cols) -> (rows, words_per_row) words of 32 elements. The grid walks a tile
table: tile p covers TILE_WORDS consecutive words of one segment, so the same tiles
feed the histograms, the tie counts and the mask words. Per radix pass:
  _histogram_kernel  (one program per tile): digits of the keys that still match the
                     segment's prefix -> tl.histogram -> atomic add into HIST[seg]
  _select_kernel     (one program per segment): find the bin holding the remaining
                     rank, extend the prefix
then _tie_count_kernel (tiles; does work only where ties at T are split) and
_mask_kernel (tiles) write the packed words. The state lives on the device, so there
is no host synchronisation per layer or per pass.

Launches per call (fp32, 31 key bits, 11-bit digits): 3 x 2 passes + tie count +
mask (+ torch's zero-fill, two small cumsums and the threshold bitcast).
Bytes: 3 reads of every weight (4 B each) + one write of the mask (1/8 B each)
+ O(segments x 2048 x 8 B) of histograms.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._floatbits import KEY_SPECS, digit_widths, keys_to_values
from ..masks import mask_rows_cols
from ._tiles import check_tile_words, segment_layout, tile_coords, tile_table

MAX_DIGIT_BITS = 11
LAUNCHES = [0]  # Triton launches issued by this module (tests check the launch budget)
# The kernels index two int64 tables with literal offsets:
#   segment table, 5 columns: values pointer, cols, words per row, words, output words pointer
#   state table, 3 columns: prefix (the k-th key once done), rank still to find, count at the key
_PREFIX, _RANK = 0, 1
STATE_COLS = 3

_TL_TYPES = {
    torch.float16: (tl.float16, tl.int16, tl.int32),
    torch.bfloat16: (tl.bfloat16, tl.int16, tl.int32),
    torch.float32: (tl.float32, tl.int32, tl.int32),
    torch.float64: (tl.float64, tl.int64, tl.int64),
}


@triton.jit
def _tile_keys(SEG_META, TILES, pid, VALUE_TYPE: tl.constexpr, BITS_TYPE: tl.constexpr,
               KEY_TYPE: tl.constexpr, ABS_MASK: tl.constexpr, NAN_KEY: tl.constexpr,
               TILE_WORDS: tl.constexpr):
    """Keys of |w| for one tile: (TILE_WORDS, 32) keys, validity, word index, segment."""
    seg = tl.load(TILES + 2 * pid)
    meta = SEG_META + seg * 5
    values = tl.load(meta + 0).to(tl.pointer_type(VALUE_TYPE))
    offsets, valid, word = tile_coords(TILES, pid, tl.load(meta + 1), tl.load(meta + 2),
                                       tl.load(meta + 3), TILE_WORDS)
    x = tl.load(values + offsets, mask=valid, other=0)
    key = x.to(BITS_TYPE, bitcast=True).to(KEY_TYPE) & ABS_MASK
    key = tl.minimum(key, NAN_KEY)  # every NaN payload ties, just above +inf
    return key, valid, word, seg


@triton.jit
def _histogram_kernel(SEG_META, TILES, STATE, HIST, VALUE_TYPE: tl.constexpr,
                      BITS_TYPE: tl.constexpr, KEY_TYPE: tl.constexpr, ABS_MASK: tl.constexpr,
                      NAN_KEY: tl.constexpr, SHIFT: tl.constexpr, DIGIT_BITS: tl.constexpr,
                      TILE_WORDS: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    seg = tl.load(TILES + 2 * pid)
    rank = tl.load(STATE + seg * 3 + 1)
    if rank > 0:  # rank 0: nothing to prune in this segment
        prefix = tl.load(STATE + seg * 3 + 0)
        key, valid, word, seg = _tile_keys(SEG_META, TILES, pid, VALUE_TYPE, BITS_TYPE, KEY_TYPE,
                                           ABS_MASK, NAN_KEY, TILE_WORDS)
        candidate = valid & ((key >> (SHIFT + DIGIT_BITS)) == prefix)
        digit = ((key >> SHIFT) & ((1 << DIGIT_BITS) - 1)).to(tl.int32)
        digit = tl.reshape(digit, [TILE_WORDS * 32])
        candidate = tl.reshape(candidate, [TILE_WORDS * 32])
        counts = tl.histogram(digit, 1 << DIGIT_BITS, mask=candidate)
        bins = tl.arange(0, 1 << DIGIT_BITS)
        tl.atomic_add(HIST + seg * (1 << DIGIT_BITS) + bins, counts.to(tl.int64),
                      mask=counts > 0)


@triton.jit
def _select_kernel(STATE, HIST, DIGIT_BITS: tl.constexpr):
    seg = tl.program_id(0).to(tl.int64)
    rank = tl.load(STATE + seg * 3 + 1)
    if rank > 0:
        counts = tl.load(HIST + seg * (1 << DIGIT_BITS) + tl.arange(0, 1 << DIGIT_BITS))
        cumulative = tl.cumsum(counts, 0)
        below = cumulative < rank  # bins entirely below the rank-th key
        digit = tl.sum(below.to(tl.int64), 0)
        before = tl.sum(tl.where(below, counts, 0), 0)
        in_bin = tl.sum(tl.where(tl.arange(0, 1 << DIGIT_BITS) == digit, counts, 0), 0)
        prefix = tl.load(STATE + seg * 3 + 0)
        tl.store(STATE + seg * 3 + 0, (prefix << DIGIT_BITS) | digit)
        tl.store(STATE + seg * 3 + 1, rank - before)
        tl.store(STATE + seg * 3 + 2, in_bin)


@triton.jit
def _tie_count_kernel(SEG_META, TILES, STATE, TILE_TIES, VALUE_TYPE: tl.constexpr,
                      BITS_TYPE: tl.constexpr, KEY_TYPE: tl.constexpr, ABS_MASK: tl.constexpr,
                      NAN_KEY: tl.constexpr, TILE_WORDS: tl.constexpr):
    """Elements equal to T per tile, only where some but not all of them are pruned."""
    pid = tl.program_id(0).to(tl.int64)
    seg = tl.load(TILES + 2 * pid)
    rank = tl.load(STATE + seg * 3 + 1)
    count_eq = tl.load(STATE + seg * 3 + 2)
    ties = tl.zeros([], dtype=tl.int64)
    if (rank > 0) & (rank < count_eq):
        key, valid, word, seg = _tile_keys(SEG_META, TILES, pid, VALUE_TYPE, BITS_TYPE, KEY_TYPE,
                                           ABS_MASK, NAN_KEY, TILE_WORDS)
        threshold = tl.load(STATE + seg * 3 + 0)
        ties = tl.sum(tl.sum((valid & (key == threshold)).to(tl.int64), 1), 0)
    tl.store(TILE_TIES + pid, ties)


@triton.jit
def _mask_kernel(SEG_META, TILES, STATE, TIES_BEFORE, VALUE_TYPE: tl.constexpr,
                 BITS_TYPE: tl.constexpr, KEY_TYPE: tl.constexpr, ABS_MASK: tl.constexpr,
                 NAN_KEY: tl.constexpr, TILE_WORDS: tl.constexpr):
    """Packed keep bits: key > T, or key == T with tie rank >= the ties to prune."""
    pid = tl.program_id(0).to(tl.int64)
    key, valid, word, seg = _tile_keys(SEG_META, TILES, pid, VALUE_TYPE, BITS_TYPE, KEY_TYPE,
                                       ABS_MASK, NAN_KEY, TILE_WORDS)
    rank = tl.load(STATE + seg * 3 + 1)  # ties at T still to prune; 0 = prune nothing
    threshold = tl.load(STATE + seg * 3 + 0)
    tied = (valid & (key == threshold)).to(tl.int64)
    # tie rank in flat order: ties in earlier tiles, earlier words, earlier bits
    row_ties = tl.sum(tied, 1)
    tie_rank = (tl.load(TIES_BEFORE + pid) + (tl.cumsum(row_ties, 0) - row_ties)[:, None]
                + tl.cumsum(tied, 1) - tied)
    keep = valid & ((rank == 0) | (key > threshold) | ((tied > 0) & (tie_rank >= rank)))
    bit = tl.arange(0, 32)[None, :]
    words = tl.sum(tl.where(keep, tl.full([1, 32], 1, tl.int32) << bit, 0), 1)
    out = tl.load(SEG_META + seg * 5 + 4).to(tl.pointer_type(tl.int32))
    num_words = tl.load(SEG_META + seg * 5 + 3)
    word_1d = tl.reshape(word, [TILE_WORDS])
    tl.store(out + word_1d, words.to(tl.int32), mask=word_1d < num_words)




def magnitude_select(tensors: list[torch.Tensor], sparsities: list[float], *, want_masks: bool,
                     out_dtype: torch.dtype, tile_words: int | None = None
                     ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Thresholds (out_dtype, one per tensor) and, if want_masks, packed int32 keep-masks.

    tensors: same device, any float dtypes (one batch of launches per dtype), any shapes;
    sparsities: one per tensor, in [0, 1]. Non-contiguous tensors are copied.
    """
    device = tensors[0].device
    if tile_words is None:  # the interpreter pays per program: fewer, larger tiles on CPU
        tile_words = 256 if device.type == "cpu" else 64
    check_tile_words(tile_words)
    thresholds = torch.full((len(tensors),), float("-inf"), dtype=out_dtype, device=device)
    packed: list[torch.Tensor | None] = [None] * len(tensors)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        by_dtype.setdefault(t.dtype, []).append(i)
    for dtype, index in by_dtype.items():
        group = [tensors[i].detach().contiguous() for i in index]
        found, masks = _select_group(group, [sparsities[i] for i in index], want_masks,
                                     tile_words)
        thresholds[torch.tensor(index, device=device)] = found.to(out_dtype)
        for i, m in zip(index, masks):
            packed[i] = m
    return thresholds, packed if want_masks else []


def _select_group(tensors, sparsities, want_masks, tile_words):
    device, dtype = tensors[0].device, tensors[0].dtype
    spec = KEY_SPECS[dtype]
    value_type, bits_type, key_type = _TL_TYPES[dtype]
    nseg = len(tensors)
    layouts = [segment_layout(t) for t in tensors]
    outs = [torch.empty((mask_rows_cols(t.shape)[0], w), dtype=torch.int32, device=device)
            for t, (_, w, _) in zip(tensors, layouts)]
    ranks = [round(s * t.numel()) for t, s in zip(tensors, sparsities)]
    meta = torch.tensor([[t.data_ptr(), c, w, nw, o.data_ptr()]
                         for t, (c, w, nw), o in zip(tensors, layouts, outs)],
                        dtype=torch.int64).to(device)
    tiles, seg_first_tile = tile_table([nw for _, _, nw in layouts], tile_words, device)
    num_tiles = tiles.shape[0]
    state = torch.zeros((nseg, STATE_COLS), dtype=torch.int64)
    state[:, _RANK] = torch.tensor(ranks, dtype=torch.int64)
    state = state.to(device)

    consts = dict(VALUE_TYPE=value_type, BITS_TYPE=bits_type, KEY_TYPE=key_type,
                  ABS_MASK=spec.abs_mask, NAN_KEY=spec.nan_key, TILE_WORDS=tile_words)
    widths = digit_widths(spec.key_bits, MAX_DIGIT_BITS)
    hist = torch.zeros(len(widths), nseg, 1 << MAX_DIGIT_BITS, dtype=torch.int64, device=device)
    shift = spec.key_bits
    if num_tiles:
        for p, width in enumerate(widths):
            shift -= width
            _counted(_histogram_kernel, (num_tiles,))(meta, tiles, state, hist[p], SHIFT=shift,
                                                      DIGIT_BITS=width, **consts)
            _counted(_select_kernel, (nseg,))(state, hist[p], DIGIT_BITS=width)
    has_k = torch.tensor(ranks, device=device) > 0
    found = torch.where(has_k, keys_to_values(state[:, _PREFIX], dtype),
                        torch.tensor(float("-inf"), dtype=dtype, device=device))
    if not want_masks or not num_tiles:
        return found, outs
    tile_ties = torch.empty(num_tiles, dtype=torch.int64, device=device)
    _counted(_tie_count_kernel, (num_tiles,))(meta, tiles, state, tile_ties, **consts)
    inclusive = torch.cumsum(tile_ties, 0)
    tile_seg = tiles[:, 0]
    base = (inclusive - tile_ties)[seg_first_tile.clamp(max=num_tiles - 1)]
    ties_before = (inclusive - tile_ties) - base[tile_seg]
    _counted(_mask_kernel, (num_tiles,))(meta, tiles, state, ties_before, **consts)
    return found, outs


def _counted(kernel, grid):
    LAUNCHES[0] += 1
    return kernel[grid]
