"""Exact magnitude selection by radix select in plain torch ops.

Per tensor, on integer keys of |w| (see _floatbits):
1. one bincount over the top 15 key bits, read straight from the high int16 half of
   each float (a strided view: no full-width key array is materialised);
2. the candidates whose top digit matches the k-th key are gathered, and the rest of
   the key is selected among them with 16-bit bincount passes (fp32: one more pass,
   fp64: three, fp16/bf16: none).
Where the k-th key lands among inf/NaN, every NaN payload must tie, so the tensor is
redone on clamped keys (rare, slower, same answer). The k-th smallest key T is exact;
ties at T are pruned lowest flat index first.
"""
from __future__ import annotations

import sys

import torch

from ..._floatbits import KEY_SPECS, digit_widths, keys_to_values, magnitude_keys
from ...masks import pack_bool

DIGIT_BITS = 16
TOP_BITS = 15  # key bits held in the high int16 half of a float
_INT16_PER_FLOAT = {torch.float16: 1, torch.bfloat16: 1, torch.float32: 2, torch.float64: 4}


def kth_key(keys: torch.Tensor, k: int, key_bits: int) -> tuple[int, int, int]:
    """Radix-select the k-th smallest of `keys` (non-negative, < 2**key_bits; 1 <= k <= len).

    Returns (T, need, count_eq): the key value, how many elements equal to T are among
    the k smallest (to be pruned), and how many elements equal T in all.
    """
    candidates = keys
    prefix, rank, shift, count = 0, k, key_bits, len(keys)
    for width in digit_widths(key_bits, DIGIT_BITS) if key_bits else []:
        shift -= width
        digits = (candidates >> shift) & ((1 << width) - 1)
        hist = torch.bincount(digits, minlength=1 << width)
        digit, rank, count = _locate(hist, rank)
        prefix = (prefix << width) | digit
        if shift:
            candidates = candidates[digits == digit]
    return prefix, rank, count


def _locate(hist: torch.Tensor, rank: int) -> tuple[int, int, int]:
    """(bin holding the rank-th smallest, rank within that bin, the bin's count)."""
    cum = hist.cumsum(0)
    digit = int(torch.searchsorted(cum, rank))  # first bin whose cumulative count reaches rank
    if digit:
        rank -= int(cum[digit - 1])
    return digit, rank, int(hist[digit])


CHUNK = 1 << 20  # elements per chunk: the digit array of a chunk stays in cache for bincount


def _high_halves(t: torch.Tensor) -> torch.Tensor | None:
    """The int16 half of each float that holds its top 15 key bits (a strided view), or None."""
    if sys.byteorder != "little" or t.dtype not in _INT16_PER_FLOAT:
        return None
    halves = t.detach().reshape(-1).view(torch.int16)
    step = _INT16_PER_FLOAT[t.dtype]
    return halves[step - 1 :: step]


def kth_key_fast(t: torch.Tensor, k: int) -> tuple[int, int, int] | None:
    """kth_key for one contiguous float tensor via its high halves; None where the k-th is inf/NaN.

    Both full passes run chunk by chunk, so each chunk's digits are counted (or compared)
    while still in cache instead of round-tripping a full-size digit array through memory.
    """
    spec = KEY_SPECS[t.dtype]
    high = _high_halves(t)
    if high is None:
        return None
    n = high.numel()
    hist = torch.zeros(1 << TOP_BITS, dtype=torch.int64, device=t.device)
    top = torch.empty(n, dtype=torch.int16, device=t.device)
    for start in range(0, n, CHUNK):
        chunk = torch.bitwise_and(high[start : start + CHUNK], 0x7FFF, out=top[start : start + CHUNK])
        hist += torch.bincount(chunk, minlength=1 << TOP_BITS)
    digit, rank, count = _locate(hist, k)
    if digit >= spec.inf_key >> (spec.key_bits - TOP_BITS):
        return None  # inf/NaN territory: NaN payloads must be made to tie first
    low_bits = spec.key_bits - TOP_BITS
    if low_bits == 0:
        return digit, rank, count
    flat = t.detach().reshape(-1).view(spec.int_dtype)
    low = torch.cat([flat[start : start + CHUNK][top[start : start + CHUNK] == digit]
                     for start in range(0, n, CHUNK)])
    low_key, rank, count = kth_key(low & ((1 << low_bits) - 1), rank, low_bits)
    return (digit << low_bits) | low_key, rank, count


def keep_mask(keys: torch.Tensor, threshold_key: int, need: int, count_eq: int) -> torch.Tensor:
    """keys > T, plus every tie at T after the first `need` in flat order (count_eq ties in all)."""
    keep = keys > threshold_key
    if need < count_eq:  # only the first `need` ties (lowest flat index) are pruned
        tied = (keys == threshold_key).nonzero().squeeze(1)
        keep[tied[need:]] = True
    return keep


def magnitude_select(tensors: list[torch.Tensor], sparsities: list[float], *, want_masks: bool,
                     out_dtype: torch.dtype) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Thresholds (out_dtype, one per tensor) and, if want_masks, packed keep-masks."""
    device = tensors[0].device if tensors else torch.device("cpu")
    thresholds = torch.full((len(tensors),), float("-inf"), dtype=out_dtype, device=device)
    packed = []
    for i, (t, s) in enumerate(zip(tensors, sparsities)):
        k = round(s * t.numel())
        if k == 0:
            if want_masks:
                packed.append(pack_bool(torch.ones(t.shape, dtype=torch.bool, device=device)))
            continue
        spec = KEY_SPECS[t.dtype]
        t = t.contiguous()
        fast = kth_key_fast(t, k)
        if fast is not None:
            key, need, count_eq = fast
            keys = None
        else:
            keys = magnitude_keys(t)
            key, need, count_eq = kth_key(keys, k, spec.key_bits)
        thresholds[i] = keys_to_values(torch.tensor([key], device=device), t.dtype)[0].to(out_dtype)
        if want_masks:
            if keys is None:  # T is finite here, so unclamped NaN keys still sort above it
                keys = t.reshape(-1).view(spec.int_dtype) & spec.abs_mask
            packed.append(pack_bool(keep_mask(keys, key, need, count_eq).reshape(t.shape)))
    return thresholds, packed


# ---------------------------------------------------------------- sharded selection
# distributed.py runs the radix passes of a selection over weights sharded across processes:
# per pass each process histograms its shards with these, the histograms are summed across
# processes, and the digit is located from the sum. Every backend has the same two functions.
def digit_histograms(sources: list, prefixes: list[int], shift: int, width: int, *,
                     gather: bool, quantiles: list[float] | None = None
                     ) -> tuple[torch.Tensor, list]:
    """One radix pass: int64 (len(sources), 2**width) counts of the digit
    (key >> shift) & (2**width - 1) over the keys of each source whose higher bits
    (key >> (shift + width)) equal prefixes[i]. sources: float tensors (keys of |w|, NaN
    clamped), or what an earlier call of the same backend returned (opaque to the caller).
    Returns the histograms and the sources for the next pass: with gather, the matching keys
    only (a backend may also return the input). quantiles[i]: k / numel of the global
    selection, a hint where the k-th key lies (this backend does not use it)."""
    device = sources[0].device
    hist = torch.zeros(len(sources), 1 << width, dtype=torch.int64, device=device)
    out = []
    for row, (src, prefix) in enumerate(zip(sources, prefixes)):
        if src.is_floating_point():
            keys = magnitude_keys(src)
            whole = shift + width >= KEY_SPECS[src.dtype].key_bits  # no higher bits to match
        else:
            keys, whole = src, False
        under = keys if whole else keys[(keys >> (shift + width)) == prefix]
        hist[row] = torch.bincount(((under >> shift) & ((1 << width) - 1)).long(), minlength=1 << width)
        out.append(under if gather and not whole else src)
    return hist, out


def threshold_masks(tensors: list[torch.Tensor], keys: list[int | None], need: list[int],
                    ties_before: list[int], local_ties: list[int]) -> list[torch.Tensor]:
    """Packed keep-words from a threshold key found elsewhere: per tensor, |w| above the key
    is kept, below it pruned, and of the elements at the key those whose tie rank counted
    from ties_before[i] (ties held by processes before this one) is below need[i] (the ties
    to prune in all) are pruned; local_ties[i] is the number of ties here. keys[i] None:
    nothing is pruned."""
    out = []
    for t, key, n, before, ties in zip(tensors, keys, need, ties_before, local_ties):
        if key is None:
            out.append(pack_bool(torch.ones(t.shape, dtype=torch.bool, device=t.device)))
            continue
        mine = min(max(n - before, 0), ties)  # the ties pruned here
        keep = keep_mask(magnitude_keys(t), key, mine, ties)
        out.append(pack_bool(keep.reshape(t.shape)))
    return out


# distributed.py's bracket path (the contracts are at the C++ backend's bracket_pass,
# bucket_split_ and resolve_masks_ in csrc/cpu/sharded_resolve.cpp); here every shard is
# "sampled" whole, its bracket the keys 3 sqrt(n) ranks either side of its quantile's rank.
ROW_HEADER = 8  # numel, lo, hi, shift, below, flag, window_lo, window_hi


def _window(hist: list[int], below: int, target: float, capacity: int) -> tuple[int, int] | None:
    """The first and last bucket of a shard's window (as the C++ fill_window chooses them)."""
    centre, through = 0, below + hist[0]
    while centre + 1 < len(hist) and through < target:
        centre += 1
        through += hist[centre]
    first = last = centre
    held = hist[centre]
    if held > capacity:
        return None
    widened = True
    while widened:
        widened = False
        if last + 1 < len(hist) and held + hist[last + 1] <= capacity:
            last += 1
            held += hist[last]
            widened = True
        if first > 0 and held + hist[first - 1] <= capacity:
            first -= 1
            held += hist[first]
            widened = True
    return first, last


def bracket_pass(shards: list[torch.Tensor], quantiles: list[float], lo: list[int], hi: list[int],
                 buckets: list[int], window_keys: list[int], *, want_masks: bool):
    slots = [-(-w * t.element_size() // 8) for t, w in zip(shards, window_keys)]
    rows = torch.zeros(len(shards), ROW_HEADER + max((b + s for b, s in zip(buckets, slots)), default=1),
                       dtype=torch.int64)
    rows[:, 6:8] = -1
    inside, positions, words = [], [], []
    for i, (t, q, a, b, count) in enumerate(zip(shards, quantiles, lo, hi, buckets)):
        keys = magnitude_keys(t)
        n = keys.numel()
        rows[i, 0] = n
        if n > 0:
            if a < 0:
                ordered = keys.sort().values
                r, margin = int(q * n), int(3 * n ** 0.5)
                a = 0 if r - margin <= 0 else int(ordered[r - margin])
                b = KEY_SPECS[t.dtype].nan_key if r + margin >= n - 1 else int(ordered[r + margin])
            shift = 0
            while (b >> shift) - (a >> shift) >= count:
                shift += 1
            a = (a >> shift) << shift
            b = min(((b >> shift) << shift) + (1 << shift) - 1, KEY_SPECS[t.dtype].nan_key)
            rows[i, 1:5] = torch.tensor([a, b, shift, int((keys < a).sum())])
        in_bracket = (keys >= a) & (keys <= b) if n > 0 else keys.bool()
        kept = keys[in_bracket]
        if n > 0:
            hist = torch.bincount(((kept >> shift) - (a >> shift)).long().cpu(), minlength=count)
            rows[i, ROW_HEADER:ROW_HEADER + count] = hist
            if window_keys[i] > 0:
                rows[i, ROW_HEADER + count:ROW_HEADER + count + slots[i]] = -1
                span = _window(hist.tolist(), int(rows[i, 4]), q * n, window_keys[i])
                if span is not None:
                    w_lo, w_hi = a + (span[0] << shift), min(a + ((span[1] + 1) << shift) - 1, b)
                    held = kept[(kept >= w_lo) & (kept <= w_hi)].to(KEY_SPECS[t.dtype].int_dtype).cpu()
                    area = rows[i, ROW_HEADER + count:ROW_HEADER + count + slots[i]]
                    area.view(held.dtype)[:held.numel()] = held
                    rows[i, 6:8] = torch.tensor([w_lo, w_hi])
        inside.append(kept)
        positions.append(in_bracket.nonzero().reshape(-1) if want_masks else kept.new_empty(0, dtype=torch.int64))
        words.append(pack_bool((keys > b).reshape(t.shape)) if want_masks and n > 0 else
                     pack_bool(torch.zeros(t.shape, dtype=torch.bool, device=t.device)))
    return rows, inside, positions, words


def bucket_split_(tensors: list[torch.Tensor], words: list[torch.Tensor], keys: list[torch.Tensor],
                  positions: list[torch.Tensor], lo: list[int], hi: list[int], widths: list[int]):
    payload, bucket_positions = [], []
    for i, (t, k, pos, a, b, width) in enumerate(zip(tensors, keys, positions, lo, hi, widths)):
        inside = (k >= a) & (k <= b)
        picked = k[inside].long().cpu()
        payload.append(torch.cat([picked, picked.new_full((width - picked.numel(),), -1)]))
        bucket_positions.append(pos[inside].long() if pos.numel() else pos.long())
        if words:
            above = torch.zeros(t.numel(), dtype=torch.bool, device=t.device)
            above[pos[k > b].long()] = True
            words[i] |= pack_bool(above.reshape(t.shape))
    return torch.cat(payload) if payload else torch.zeros(0, dtype=torch.int64), bucket_positions


def resolve_masks_(tensors: list[torch.Tensor], words: list[torch.Tensor], keys: list[torch.Tensor],
                   positions: list[torch.Tensor], thresholds: list[int], prune_ties: list[int]) -> None:
    for t, w, k, pos, key, n in zip(tensors, words, keys, positions, thresholds, prune_ties):
        keep = torch.zeros(t.numel(), dtype=torch.bool, device=t.device)
        order = pos.argsort()  # tie ranks follow the flat order
        keep[pos[order]] = keep_mask(k[order].long(), key, n, int((k == key).sum()))
        w |= pack_bool(keep.reshape(t.shape))
