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
mask (+ torch's zero-fill, two small cumsums and the threshold bitcast). The sharded
selection (distributed.py) launches the histogram kernel once per pass and the tie count
and mask kernels once, with the digits located on the host between its all_reduces.
Bytes: 3 reads of every weight (4 B each) + one write of the mask (1/8 B each)
+ O(segments x 2048 x 8 B) of histograms.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._floatbits import KEY_SPECS, digit_widths, keys_to_values
from ...masks import packed_shape
from ._tiles import (TABLE_NUM_WARPS, TILE_SEGMENT, by_dtype, key_constexprs, launch, magnitude_key,
                     segment_layout, tile_coords, tile_segment, tile_table, tile_words_for)

MAX_DIGIT_BITS = 11
# columns of the int64 segment table (one row per tensor)
SEG_VALUES = tl.constexpr(0)  # pointer to the tensor's values
SEG_COLS = tl.constexpr(1)
SEG_WORDS_PER_ROW = tl.constexpr(2)
SEG_WORDS = tl.constexpr(3)
SEG_OUT = tl.constexpr(4)  # pointer to its output mask words
SEG_COLUMNS = tl.constexpr(5)
# columns of the int64 state table (one row per tensor), kept on the device between passes
STATE_PREFIX = tl.constexpr(0)  # key bits found so far (the k-th key once done)
STATE_RANK = tl.constexpr(1)  # rank still to find among keys under the prefix; 0: prune nothing
STATE_COUNT = tl.constexpr(2)  # keys in the bin found last (ties at the k-th key once done)
STATE_COLUMNS = tl.constexpr(3)


@triton.jit
def _tile_keys(SEG_META, TILES, pid, VALUE_TYPE: tl.constexpr, BITS_TYPE: tl.constexpr,
               KEY_TYPE: tl.constexpr, ABS_MASK: tl.constexpr, NAN_KEY: tl.constexpr,
               TILE_WORDS: tl.constexpr):
    """Keys of |w| for one tile: (TILE_WORDS, 32) keys, validity, word index, segment."""
    seg = tile_segment(TILES, pid)
    meta = SEG_META + seg * SEG_COLUMNS
    values = tl.load(meta + SEG_VALUES).to(tl.pointer_type(VALUE_TYPE))
    offsets, valid, word = tile_coords(TILES, pid, tl.load(meta + SEG_COLS),
                                       tl.load(meta + SEG_WORDS_PER_ROW), tl.load(meta + SEG_WORDS),
                                       TILE_WORDS)
    key = magnitude_key(tl.load(values + offsets, mask=valid, other=0), BITS_TYPE, KEY_TYPE, ABS_MASK, NAN_KEY)
    return key, valid, word, seg


@triton.jit
def _histogram_kernel(SEG_META, TILES, STATE, HIST, VALUE_TYPE: tl.constexpr,
                      BITS_TYPE: tl.constexpr, KEY_TYPE: tl.constexpr, ABS_MASK: tl.constexpr,
                      NAN_KEY: tl.constexpr, SHIFT: tl.constexpr, DIGIT_BITS: tl.constexpr,
                      TILE_WORDS: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    seg = tile_segment(TILES, pid)
    rank = tl.load(STATE + seg * STATE_COLUMNS + STATE_RANK)
    if rank > 0:  # rank 0: nothing to prune in this segment
        prefix = tl.load(STATE + seg * STATE_COLUMNS + STATE_PREFIX)
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
    state = STATE + seg * STATE_COLUMNS
    rank = tl.load(state + STATE_RANK)
    if rank > 0:
        counts = tl.load(HIST + seg * (1 << DIGIT_BITS) + tl.arange(0, 1 << DIGIT_BITS))
        cumulative = tl.cumsum(counts, 0)
        below = cumulative < rank  # bins entirely below the rank-th key
        digit = tl.sum(below.to(tl.int64), 0)
        before = tl.sum(tl.where(below, counts, 0), 0)
        in_bin = tl.sum(tl.where(tl.arange(0, 1 << DIGIT_BITS) == digit, counts, 0), 0)
        prefix = tl.load(state + STATE_PREFIX)
        tl.store(state + STATE_PREFIX, (prefix << DIGIT_BITS) | digit)
        tl.store(state + STATE_RANK, rank - before)
        tl.store(state + STATE_COUNT, in_bin)


@triton.jit
def _tie_count_kernel(SEG_META, TILES, STATE, TILE_TIES, VALUE_TYPE: tl.constexpr,
                      BITS_TYPE: tl.constexpr, KEY_TYPE: tl.constexpr, ABS_MASK: tl.constexpr,
                      NAN_KEY: tl.constexpr, TILE_WORDS: tl.constexpr):
    """Elements equal to T per tile, only where some but not all of them are pruned."""
    pid = tl.program_id(0).to(tl.int64)
    seg = tile_segment(TILES, pid)
    rank = tl.load(STATE + seg * STATE_COLUMNS + STATE_RANK)
    count_eq = tl.load(STATE + seg * STATE_COLUMNS + STATE_COUNT)
    ties = tl.zeros([], dtype=tl.int64)
    if (rank > 0) & (rank < count_eq):
        key, valid, word, seg = _tile_keys(SEG_META, TILES, pid, VALUE_TYPE, BITS_TYPE, KEY_TYPE,
                                           ABS_MASK, NAN_KEY, TILE_WORDS)
        threshold = tl.load(STATE + seg * STATE_COLUMNS + STATE_PREFIX)
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
    rank = tl.load(STATE + seg * STATE_COLUMNS + STATE_RANK)  # ties at T to prune; 0 = prune nothing
    threshold = tl.load(STATE + seg * STATE_COLUMNS + STATE_PREFIX)
    tied = (valid & (key == threshold)).to(tl.int64)
    # tie rank in flat order: ties in earlier tiles, earlier words, earlier bits
    row_ties = tl.sum(tied, 1)
    tie_rank = (tl.load(TIES_BEFORE + pid) + (tl.cumsum(row_ties, 0) - row_ties)[:, None]
                + tl.cumsum(tied, 1) - tied)
    keep = valid & ((rank == 0) | (key > threshold) | ((tied > 0) & (tie_rank >= rank)))
    bit = tl.arange(0, 32)[None, :]
    words = tl.sum(tl.where(keep, tl.full([1, 32], 1, tl.int32) << bit, 0), 1)
    out = tl.load(SEG_META + seg * SEG_COLUMNS + SEG_OUT).to(tl.pointer_type(tl.int32))
    num_words = tl.load(SEG_META + seg * SEG_COLUMNS + SEG_WORDS)
    word_1d = tl.reshape(word, [TILE_WORDS])
    tl.store(out + word_1d, words.to(tl.int32), mask=word_1d < num_words)


class _Batch:
    """The device tables of one dtype's tensors: segments, tiles, output words, kernel constants."""

    def __init__(self, tensors: list[torch.Tensor], tile_words: int | None):
        self.device, dtype = tensors[0].device, tensors[0].dtype
        tile_words = tile_words_for(self.device, tile_words, gpu_default=64)
        self.tensors = [t.detach().contiguous() for t in tensors]
        layouts = [segment_layout(t) for t in self.tensors]
        self.outs = [torch.empty(packed_shape(t.shape), dtype=torch.int32, device=self.device)
                     for t in self.tensors]
        self.meta = torch.tensor([[t.data_ptr(), c, w, nw, o.data_ptr()]
                                  for t, (c, w, nw), o in zip(self.tensors, layouts, self.outs)],
                                 dtype=torch.int64).to(self.device)
        self.tiles, self.seg_first_tile = tile_table([nw for _, _, nw in layouts], tile_words,
                                                     self.device)
        self.num_tiles = self.tiles.shape[0]
        self.spec = KEY_SPECS[dtype]
        self.consts = dict(key_constexprs(dtype), TILE_WORDS=tile_words)

    def state(self, prefix, rank, count) -> torch.Tensor:
        state = torch.tensor([list(row) for row in zip(prefix, rank, count)], dtype=torch.int64)
        return state.reshape(len(self.tensors), STATE_COLUMNS.value).to(self.device)

    def histogram(self, state: torch.Tensor, hist: torch.Tensor, shift: int, width: int) -> None:
        """Add the digit counts of this pass to hist (segments x 2**width), per the state's prefixes."""
        if self.num_tiles:
            launch(_histogram_kernel, (self.num_tiles,), num_warps=TABLE_NUM_WARPS)(self.meta, self.tiles, state, hist,
                                                         SHIFT=shift, DIGIT_BITS=width, **self.consts)

    def write_masks(self, state: torch.Tensor, ties_offset: torch.Tensor | None = None):
        """Packed keep-words per the state's thresholds; ties_offset: per segment, ties at its
        threshold that come before this batch's tensors in flat order (other processes' shards)."""
        if not self.num_tiles:
            return self.outs
        tile_ties = torch.empty(self.num_tiles, dtype=torch.int64, device=self.device)
        launch(_tie_count_kernel, (self.num_tiles,), num_warps=TABLE_NUM_WARPS)(self.meta, self.tiles, state, tile_ties,
                                                     **self.consts)
        inclusive = torch.cumsum(tile_ties, 0)
        tile_seg = self.tiles[:, TILE_SEGMENT.value]
        base = (inclusive - tile_ties)[self.seg_first_tile.clamp(max=self.num_tiles - 1)]
        ties_before = (inclusive - tile_ties) - base[tile_seg]
        if ties_offset is not None:
            ties_before += ties_offset[tile_seg]
        launch(_mask_kernel, (self.num_tiles,), num_warps=TABLE_NUM_WARPS)(self.meta, self.tiles, state, ties_before,
                                                **self.consts)
        return self.outs


def magnitude_select(tensors: list[torch.Tensor], sparsities: list[float], *, want_masks: bool,
                     out_dtype: torch.dtype, tile_words: int | None = None
                     ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Thresholds (out_dtype, one per tensor) and, if want_masks, packed int32 keep-masks.

    tensors: same device, any float dtypes (one batch of launches per dtype), any shapes;
    sparsities: one per tensor, in [0, 1]. Non-contiguous tensors are copied.
    """
    device = tensors[0].device
    thresholds = torch.full((len(tensors),), float("-inf"), dtype=out_dtype, device=device)
    packed: list[torch.Tensor | None] = [None] * len(tensors)
    for dtype, index in by_dtype(tensors).items():
        batch = _Batch([tensors[i] for i in index], tile_words)
        ranks = [round(sparsities[i] * tensors[i].numel()) for i in index]
        state = batch.state([0] * len(index), ranks, [0] * len(index))
        widths = digit_widths(batch.spec.key_bits, MAX_DIGIT_BITS)
        hist = torch.zeros(len(widths), len(index), 1 << MAX_DIGIT_BITS, dtype=torch.int64,
                           device=device)
        shift = batch.spec.key_bits
        for p, width in enumerate(widths):
            shift -= width
            batch.histogram(state, hist[p], shift, width)
            if batch.num_tiles:
                launch(_select_kernel, (len(index),), num_warps=TABLE_NUM_WARPS)(state, hist[p], DIGIT_BITS=width)
        has_k = torch.tensor(ranks, device=device) > 0
        found = torch.where(has_k, keys_to_values(state[:, STATE_PREFIX.value], dtype),
                            torch.tensor(float("-inf"), dtype=dtype, device=device))
        thresholds[torch.tensor(index, device=device)] = found.to(out_dtype)
        if want_masks:
            for i, m in zip(index, batch.write_masks(state)):
                packed[i] = m
    return thresholds, packed if want_masks else []


# ---------------------------------------------------------------- sharded selection
def digit_histograms(sources, prefixes, shift: int, width: int, *, gather: bool, quantiles=None):
    """See composite.magnitude_select.digit_histograms. Every pass reads the values (no
    gathering: on a GPU a filtered re-read costs less than compacting the candidates)."""
    hist = torch.zeros(len(sources), 1 << width, dtype=torch.int64, device=sources[0].device)
    for index in by_dtype(sources).values():
        batch = _Batch([sources[i] for i in index], None)
        state = batch.state([prefixes[i] for i in index], [1] * len(index), [0] * len(index))
        part = torch.zeros(len(index), 1 << width, dtype=torch.int64, device=hist.device)
        batch.histogram(state, part, shift, width)
        hist[index] = part
    return hist, list(sources)


def threshold_masks(tensors, keys, need, ties_before, local_ties):
    """See composite.magnitude_select.threshold_masks."""
    packed: list[torch.Tensor | None] = [None] * len(tensors)
    for index in by_dtype(tensors).values():
        batch = _Batch([tensors[i] for i in index], None)
        # rank = ties to prune in all (>= 1 where a key is set, 0 = prune nothing); the count
        # bounds the tie ranks held here, so tiles count their ties only where that can matter
        state = batch.state([0 if keys[i] is None else keys[i] for i in index],
                            [0 if keys[i] is None else need[i] for i in index],
                            [ties_before[i] + local_ties[i] for i in index])
        offset = torch.tensor([ties_before[i] for i in index], dtype=torch.int64, device=batch.device)
        for i, m in zip(index, batch.write_masks(state, offset)):
            packed[i] = m
    return packed
