"""Shared pieces of the Triton kernels: tile tables, dtype tables and launch counting.

Each tensor of a batch (a segment) is viewed in the packed-mask layout: rows = shape[0]
for tensors of 2 or more dims (1 otherwise), cols = numel // rows, and words of 32
consecutive columns. A tile is TILE_WORDS consecutive words of one segment; the grid
has one program per tile of every segment, so one launch covers a whole list of
tensors, and a tile's 32-bit mask words line up with the elements it loads.

A segment is FLAT when word w holds its elements 32w..32w+31 (one row, or rows of whole
words) and its tensors are 16-byte aligned: its whole-word tiles then take a second path
(flat_tile_coords, vector_pointers) on which the compiler emits 16-byte vector loads and
stores; the host sets the flag (segment_flags), the kernel branches per tile.
"""
from __future__ import annotations

import weakref
from collections import Counter, OrderedDict
from functools import lru_cache

import torch
import triton
import triton.language as tl

from ..._floatbits import KEY_SPECS
from ...masks import mask_rows_cols, packed_shape

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
    """kernel[grid] with launch `options` (num_warps, ...), counted in LAUNCHES. kernel: a
    @triton.jit function or a triton.autotune of one (counted once per call, its trial runs not)."""
    LAUNCHES[getattr(kernel, "base_fn", kernel.fn).__name__] += 1
    if not options:
        return kernel[grid]
    return lambda *args, **kwargs: kernel[grid](*args, **kwargs, **options)


def segment_layout(t: torch.Tensor) -> tuple[int, int, int]:
    """(cols, words_per_row, num_words) of a tensor in the mask layout."""
    return _layout_of_shape(t.shape)


@lru_cache(maxsize=4096)
def _layout_of_shape(shape: torch.Size) -> tuple[int, int, int]:
    # cached: the launchers ask for every tensor of a model at every step
    rows, words_per_row = packed_shape(shape)
    return mask_rows_cols(shape)[1], words_per_row, rows * words_per_row


# Tables that a CUDA graph captured, with the pinned host rows of copies it captured: a graph
# replays the addresses it recorded, so these live as long as the process, out of every cache's
# eviction (keyed by id: a held object's id is never reused).
_HELD_BY_GRAPHS: dict[int, torch.Tensor] = {}


def capturing(device: torch.device) -> bool:
    """Whether a CUDA graph is being captured on the current stream (never on CPU tensors)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def hold_if_capturing(device: torch.device, *tensors: torch.Tensor) -> None:
    """Keep `tensors` for the process's life if a CUDA graph is capturing them now."""
    if capturing(device):
        _hold_for_graphs(tensors)


def _hold_for_graphs(tensors) -> None:
    _HELD_BY_GRAPHS.update((id(t), t) for t in tensors)


def host_table(rows: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host-built table (a list of rows) on `device`. On a GPU it goes through pinned
    memory, copied asynchronously: a plain .to(device) from pageable memory makes the host wait
    for all the work queued on the stream, so the next step's host work could not overlap it."""
    return to_device(torch.tensor(rows, dtype=dtype), device)


def to_device(table: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host-built table on `device`, through pinned memory on a GPU (see host_table); also
    the one way to copy a table while a CUDA graph captures (a pageable copy waits on the
    stream, which capture forbids)."""
    if device.type != "cuda":
        return table.to(device)
    pinned = table.pin_memory()
    on_device = pinned.to(device, non_blocking=True)
    hold_if_capturing(device, pinned, on_device)  # a replay copies from `pinned` again
    return on_device


_TABLES: OrderedDict = OrderedDict()  # (rows, dtype, device) -> the table on the device
_TABLES_KEPT = 32


def cached_table(rows: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """host_table(rows, ...) (a flat list of floats, or rows of ints), kept for the same rows: an optimizer's steady state passes the
    same pointers and layouts at every step (the caching allocator hands the gradients the
    same addresses), so its tables are built and copied once. Keyed on the values themselves
    (pointers included), never on the tensors: a hit is the very table those values make.
    Only for tables the kernels read, never write."""
    if dtype.is_floating_point:  # by their bits: -0.0 and 0.0 (equal as keys) step differently
        values = tuple(float(v).hex() for v in rows)
    else:
        values = tuple(map(tuple, rows)) if rows and isinstance(rows[0], list) else tuple(rows)
    key = (values, dtype, device)
    table = _TABLES.get(key)
    if table is None:
        table = _TABLES[key] = host_table(rows, dtype, device)
        if len(_TABLES) > _TABLES_KEPT:
            _TABLES.popitem(last=False)
    else:
        _TABLES.move_to_end(key)
        hold_if_capturing(device, table)
    return table


_PLANNED = weakref.WeakKeyDictionary()  # static_key -> (varying key, launch tables)


def planned_tables(static_key, varying: tuple, build):
    """build()'s launch tables, kept for `static_key` while `varying` is unchanged. static_key:
    None (build every call), or an object the caller keeps (an optimizer's step plan) with which
    it promises that every tensor it passes is the one it passed before, unchanged, but for
    those whose pointers and flags `varying` lists (the step's gradients): a steady-state step
    then rebuilds nothing on the host."""
    if static_key is None:
        return build()
    entry = _PLANNED.get(static_key)
    if entry is not None and entry[0] == varying:
        tables = entry[1]
        if tables and capturing(tables[0][2].device):  # a graph captured now holds them past any rebuild
            _hold_for_graphs(t for _, _, tiles, meta in tables for t in (tiles, meta))
        return tables
    tables = build()
    _PLANNED[static_key] = (varying, tables)
    return tables


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


def cached_tile_table(num_words: tuple[int, ...], tile_words: int, device: torch.device) -> torch.Tensor:
    """tile_table's tiles, kept per layout: an optimizer steps the same tensors every step."""
    tiles = _cached_tile_table(num_words, tile_words, device)
    hold_if_capturing(device, tiles)
    return tiles


@lru_cache(maxsize=64)
def _cached_tile_table(num_words: tuple[int, ...], tile_words: int, device: torch.device) -> torch.Tensor:
    return tile_table(list(num_words), tile_words, device)[0]


def tile_table(num_words: list[int], tile_words: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 (num_tiles, TILE_COLUMNS) table of (segment, first word), and each segment's first tile."""
    per_seg = torch.tensor([-(-n // tile_words) for n in num_words], dtype=torch.int64)
    num_tiles = int(per_seg.sum())
    seg = torch.repeat_interleave(torch.arange(len(num_words)), per_seg)
    first_tile = torch.cumsum(per_seg, 0) - per_seg
    first_word = (torch.arange(num_tiles) - first_tile[seg]) * tile_words
    return to_device(torch.stack([seg, first_word], 1), device), to_device(first_tile, device)


# segment flags (a column of the multi-tensor kernels' segment tables)
HAS_MASK = tl.constexpr(1)  # the tensor has mask words (else dense: every bit kept)
FLAT = tl.constexpr(2)  # flat_segment: its words cover consecutive elements, pointers 16-byte aligned
VECTOR_BYTES = tl.constexpr(16)


def segment_tables(tensors, mask_words, pointers_of, tile_words: int, device: torch.device, extra_flags=None):
    """The launch tables of a list op, per dtype: [(dtype, index, tiles, meta)], where meta holds
    one row per tensor (pointers_of(i), its mask words' pointer (the first pointer where it has no
    mask), cols, words_per_row, num_words, numel, flags | extra_flags(i)); dtypes with no tile
    are left out."""
    out = []
    for dtype, index in by_dtype(tensors).items():
        rows, num_words = [], []
        for i in index:
            cols, words_per_row, n_words = segment_layout(tensors[i])
            words, pointers = mask_words[i], pointers_of(i)
            flags = segment_flags(words is not None, cols, words_per_row, n_words, pointers)
            rows.append([*pointers, words.data_ptr() if words is not None else pointers[0], cols, words_per_row,
                         n_words, tensors[i].numel(), flags | (extra_flags(i) if extra_flags else 0)])
            num_words.append(n_words)
        tiles = cached_tile_table(tuple(num_words), tile_words, device)
        if tiles.shape[0]:
            out.append((dtype, index, tiles, cached_table(rows, torch.int64, device)))
    return out


def segment_flags(has_mask: bool, cols: int, words_per_row: int, num_words: int, pointers) -> int:
    """HAS_MASK | FLAT for a segment. FLAT: one row, or rows of whole words (cols a multiple of
    32), so word w holds elements 32w..32w+31; and every pointer VECTOR_BYTES-aligned."""
    flat = (num_words == words_per_row or cols % 32 == 0) and all(p % VECTOR_BYTES.value == 0 for p in pointers)
    return (HAS_MASK.value if has_mask else 0) | (FLAT.value if flat else 0)


def key_constexprs(dtype: torch.dtype) -> dict:
    """The constexprs of magnitude_key for values of `dtype` (with VALUE_TYPE)."""
    spec = KEY_SPECS[dtype]
    return dict(VALUE_TYPE=TL_FLOAT[dtype], BITS_TYPE=TL_INT[spec.int_dtype],
                KEY_TYPE=tl.int64 if dtype == torch.float64 else tl.int32, ABS_MASK=spec.abs_mask,
                NAN_KEY=spec.nan_key)


@triton.jit
def magnitude_key(x, BITS_TYPE: tl.constexpr, KEY_TYPE: tl.constexpr, ABS_MASK: tl.constexpr,
                  NAN_KEY: tl.constexpr):
    """The integer key of |x| (_floatbits: float order, -0.0 == 0.0); every NaN payload ties, just
    above +inf."""
    key = x.to(BITS_TYPE, bitcast=True).to(KEY_TYPE) & ABS_MASK
    return tl.minimum(key, NAN_KEY)


@triton.jit
def flat_tile(TILES, pid, is_flat, numel, TILE_WORDS: tl.constexpr):
    """Whether tile pid of a FLAT segment of numel elements holds no partial word."""
    first_word = tl.load(TILES + pid * TILE_COLUMNS + TILE_FIRST_WORD)
    return is_flat & (((numel % 32) == 0) | ((first_word + TILE_WORDS) * 32 <= numel))


@triton.jit
def flat_tile_coords(TILES, pid, num_words, TILE_WORDS: tl.constexpr):
    """tile_coords for a flat_tile: offsets word * 32 + bit, valid by whole words (so the
    compiler sees runs of 32 consecutive elements under one mask bit)."""
    first_word = tl.load(TILES + pid * TILE_COLUMNS + TILE_FIRST_WORD)
    word = first_word + tl.arange(0, TILE_WORDS).to(tl.int64)[:, None]
    offsets = word * 32 + tl.arange(0, 32).to(tl.int64)[None, :]
    valid = tl.broadcast_to(word < num_words, (TILE_WORDS, 32))
    return offsets, valid, word


@triton.jit
def vector_pointers(address, offsets, VALUE_TYPE: tl.constexpr):
    """Pointers to the elements at offsets of a flat_tile of the tensor at address (int64, from
    a table), declared as runs of 32 consecutive elements starting VECTOR_BYTES-aligned
    (segment_flags checked the address): the compiler derives nothing from an address loaded
    from memory, and hints on the offsets alone did not give it vector loads."""
    pointers = address.to(tl.pointer_type(VALUE_TYPE)) + offsets
    return tl.multiple_of(tl.max_contiguous(pointers, [1, 32]), [1, VECTOR_BYTES])


@triton.jit
def element_pointers(address, offsets, VALUE_TYPE: tl.constexpr):
    """Pointers to the elements at offsets of the tensor at address (int64, from a table)."""
    return address.to(tl.pointer_type(VALUE_TYPE)) + offsets


@triton.jit
def segment_tile(TILES, pid, cols, words_per_row, num_words, TILE_WORDS: tl.constexpr, FLAT: tl.constexpr):
    """(offsets, valid, word) of tile pid: flat_tile_coords where FLAT (the caller checked
    flat_tile), else tile_coords."""
    if FLAT:
        return flat_tile_coords(TILES, pid, num_words, TILE_WORDS)
    else:
        return tile_coords(TILES, pid, cols, words_per_row, num_words, TILE_WORDS)


@triton.jit
def tensor_pointers(address, offsets, VALUE_TYPE: tl.constexpr, FLAT: tl.constexpr):
    """vector_pointers where FLAT, else element_pointers. A kernel calls its per-tile step once
    per branch of `if flat_tile(...)` with FLAT=True / False: after an if, the compiler forgets
    what it knew of the pointers inside it (contiguity, alignment), and with it the vector loads."""
    if FLAT:
        return vector_pointers(address, offsets, VALUE_TYPE)
    else:
        return element_pointers(address, offsets, VALUE_TYPE)


@triton.jit
def tile_keep(W, word, mask_words):
    """The (TILE_WORDS, 32) mask bits of a tile; words at or past mask_words read as all kept."""
    words = tl.load(W + word, mask=word < mask_words, other=-1)
    return ((words >> tl.arange(0, 32)[None, :]) & 1) != 0


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
