"""Exact magnitude selection over sharded weights (DTensor, as FSDP2's fully_shard holds them).

A front end called only from ops/magnitude_select.py, which passes it the backend modules the registry picks
for the device of the local shards: `local` (magnitude_select) for replicated tensors and
`sharded` for the per-shard work of Shard(0) tensors. This module runs the collectives around
those kernels and never sends a weight.

A weight sharded on dim 0 over a 1-D device mesh is never gathered. Every rank finds the same
exact global k-th key, and the tie rule (lower global flat index first) holds across shard
boundaries: rank r's rows all precede rank r+1's, so each rank prunes the ties at the key that
the lower ranks do not. Each rank gets its local masks; gathered along dim 0 they equal the
single-process masks bit for bit. Two paths, for all Shard(0) tensors of a call at once:

- The bracket path (backends with `bracket_pass`: C++ and torch), one collective in all where
  the shards are alike:
  1. one read of each shard: a sample brackets the k-th key, the keys under the bracket are
     counted, those inside gathered (a few percent) and histogrammed in aligned buckets, the
     keys of a window of buckets around the shard's own k-th key copied out, and the mask
     words written as if the bracket's keys were pruned; then one all_gather of the rows
     ((8 + buckets) int64 per tensor, buckets = numel / 2048 rounded to a power of two in
     [32, 1024], and the window: _window_capacity keys of the key's width) gives every rank
     the bucket of the global k-th key;
  2. where every rank's window holds that bucket (shards alike: a shard's k-th key is then
     within a few sqrt(shard size) ranks of the global one), its keys on every rank are at
     hand; else one more all_gather sends each rank's keys in the bucket (int64, padded to
     the largest rank's count: about gathered keys / buckets, a few hundred). Then the exact
     key, its ties per rank and the kept bits of the gathered keys.
  Where the ranks' brackets do not all cover the k-th key, every rank passes over the union
  of their brackets (one more pass and all_gather); where a bracket fills with ties or a
  bucket holds over MAX_BUCKET_KEYS keys, that tensor takes the radix path.
- The radix path (every backend; the only one of the Triton backend): each rank histograms its
  shard per 11-bit digit of the key, one collective per digit (3 for fp32: all_reduces of
  2048, 1024, 1024 int64 per tensor, the last all_gathered when masks are wanted, for the tie
  counts), then a mask pass.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist

from ._dtensor import DTensor, Replicate, Shard, local_tensor
from ._floatbits import KEY_SPECS, digit_widths, keys_to_values
from .masks import Mask

DIGIT_BITS = 11
# every collective this module ran, as (operation, bytes of this rank's input): tests and benchmarks
COLLECTIVES: list[tuple[str, int]] = []


def _placement(t: DTensor, name: str) -> str:
    mesh = t.device_mesh
    if mesh.ndim != 1:
        raise NotImplementedError(f"{name}: DTensor on a {mesh.ndim}-D device mesh; only 1-D meshes "
                                  f"are supported")
    (p,) = t.placements
    if isinstance(p, Replicate):
        return "replicate"
    if isinstance(p, Shard) and p.dim == 0:
        return "shard0"
    raise NotImplementedError(f"{name}: DTensor placement {p!r} is not supported; use Shard(0) "
                              f"(as FSDP2 shards) or Replicate()")


def _all_reduce(t: torch.Tensor, group, op=dist.ReduceOp.SUM) -> None:
    COLLECTIVES.append(("all_reduce", t.numel() * t.element_size()))
    dist.all_reduce(t, op=op, group=group)


def _all_gather(t: torch.Tensor, group) -> list[torch.Tensor]:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    COLLECTIVES.append(("all_gather", t.numel() * t.element_size()))
    dist.all_gather(parts, t, group=group)
    return parts


@torch.no_grad()  # nothing here is differentiated; and DTensor.to_local() skips autograd then
def sharded_select(tensors, sparsities, *, want_masks: bool, local, sharded):
    """Thresholds (float64 tensor on the local device, global, the same on every rank) and,
    if want_masks, the local Masks of DTensors.

    Replicated tensors are selected locally (every rank holds the same values, so the same
    bits). Shard(0) tensors of one call share one process group (the first one's mesh).
    """
    device = local_tensor(tensors[0]).device
    thresholds = torch.full((len(tensors),), float("-inf"), dtype=torch.float64, device=device)
    masks: list[Mask | None] = [None] * len(tensors)
    replicated, split = [], []
    for i, t in enumerate(tensors):
        (replicated if _placement(t, f"tensors[{i}]") == "replicate" else split).append(i)
    if replicated:
        shards = [tensors[i].to_local().detach() for i in replicated]
        found, words = local.magnitude_select(shards, [sparsities[i] for i in replicated],
                                              want_masks=want_masks, out_dtype=torch.float64)
        thresholds[replicated] = found
        for j, i in enumerate(replicated):
            if want_masks:
                masks[i] = Mask(words[j], shards[j].shape)
    if split:
        group = tensors[split[0]].device_mesh.get_group()
        found, local_masks = _select_sharded([tensors[i] for i in split],
                                             [sparsities[i] for i in split], group, want_masks,
                                             sharded)
        thresholds[split] = found
        for j, i in enumerate(split):
            if want_masks:
                masks[i] = local_masks[j]
    return thresholds, masks


def _select_sharded(tensors, sparsities, group, want_masks, kernels):
    shards = [t.to_local().detach().contiguous() for t in tensors]
    device = shards[0].device
    k = [round(s * t.numel()) for t, s in zip(tensors, sparsities)]  # global counts to prune
    found = _Found(len(tensors))
    words: list[torch.Tensor | None] = [None] * len(tensors)  # masks the bracket path finished
    todo = [i for i in range(len(tensors)) if k[i] > 0]
    if hasattr(kernels, "bracket_pass"):
        todo = _bracket_select(shards, tensors, k, todo, group, want_masks, kernels, found, words)
    _radix_select(shards, tensors, k, todo, group, want_masks, kernels, found)
    thresholds = torch.full((len(tensors),), float("-inf"), dtype=torch.float64)
    for dtype in {t.dtype for t in tensors}:  # one conversion per dtype
        index = [i for i, t in enumerate(tensors) if t.dtype == dtype and found.key[i] is not None]
        if index:
            thresholds[index] = keys_to_values(torch.tensor([found.key[i] for i in index]), dtype).double()
    thresholds = thresholds.to(device)
    if not want_masks:
        return thresholds, []
    rest = [i for i in range(len(tensors)) if words[i] is None]
    if rest:
        for i, w in zip(rest, kernels.threshold_masks([shards[i] for i in rest], [found.key[i] for i in rest],
                                                      [found.need[i] for i in rest],
                                                      [found.ties_before[i] for i in rest],
                                                      [found.local_ties[i] for i in rest])):
            words[i] = w
    return thresholds, [Mask(w, x.shape) for w, x in zip(words, shards)]


class _Found:
    """Per tensor: the global k-th key (None: nothing to prune), the ties at it to prune over all
    ranks, and the ties at it held by this rank and by the ranks before it."""

    def __init__(self, count: int):
        self.key: list[int | None] = [None] * count
        self.need = [0] * count
        self.local_ties = [0] * count
        self.ties_before = [0] * count

    def set(self, i: int, key: int, need: int, ranks_ties: list[int] | None, me: int) -> None:
        """ranks_ties: each rank's count of keys equal to `key` (when masks are wanted)."""
        self.key[i], self.need[i] = key, need
        if ranks_ties is not None:
            self.local_ties[i] = ranks_ties[me]
            self.ties_before[i] = sum(ranks_ties[:me])

    def prune_here(self, i: int) -> int:
        """The ties at the key this rank prunes: those the lower ranks do not."""
        return min(max(self.need[i] - self.ties_before[i], 0), self.local_ties[i])


def _locate(hist: torch.Tensor, rank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the bin holding the rank-th smallest key (1-based) and the count below that bin."""
    cum = hist.cumsum(1)
    digit = (cum < rank[:, None]).sum(1)
    below = torch.where(digit > 0, cum.gather(1, (digit - 1).clamp(min=0)[:, None])[:, 0], 0)
    return digit, below


def _sum_or_gather(hist: torch.Tensor, group, gather: bool):
    """The histograms summed over the ranks, and with gather each rank's too (for tie counts)."""
    if not gather:
        _all_reduce(hist, group)
        return hist, None
    parts = _all_gather(hist, group)
    return torch.stack(parts).sum(0), parts


# ---------------------------------------------------------------- the bracket path
# a bracket_pass row: numel, lo, hi, shift, below, flag, window_lo, window_hi, then the bucket
# counts, then the window's keys
ROW_HEADER = 8
MAX_BUCKET_KEYS = 1 << 16  # keys of the threshold's bucket one rank may send; more: radix select
_KEY_VIEWS = {2: np.int16, 4: np.int32, 8: np.int64}  # a window's keys, by the float's width


def _window_capacity(numel: int, world: int) -> int:
    """Keys of a shard's window (the same on every rank). A shard's own k-th key lies, by chance
    alone, about sqrt(p (1 - p) numel / world) <= sqrt(numel / world) / 2 ranks from the global
    k-th key's; the window holds 3 sqrt(numel / world) keys, over 3 such deviations either side,
    and a small tensor's shards whole (at least 64 keys)."""
    return min(numel, max(64, math.ceil(3 * math.sqrt(numel / world))))


def _window_slots(capacity: int, dtype: torch.dtype) -> int:
    """int64 slots of a row holding a window of `capacity` keys of dtype's width."""
    return -(-capacity * dtype.itemsize // 8)


def _bucket_count(numel: int) -> int:
    """Buckets of a tensor's bracket histogram: about numel / 2048, a power of two in [32, 1024]
    (the same on every rank: it depends on the global size only)."""
    return 1 << min(10, max(5, (numel >> 11).bit_length() - 1))


class _Bucket:
    """Where a tensor's k-th key lies after the bracket round: the bucket [lo, hi] of keys, the
    rank of the k-th key among the bucket's keys, and each rank's count of keys in the bucket."""
    __slots__ = ("lo", "hi", "rank", "counts")

    def __init__(self, lo, hi, rank, counts):
        self.lo, self.hi, self.rank, self.counts = lo, hi, rank, counts

    @property
    def width(self) -> int:
        """The keys each rank sends for this bucket: the largest rank's count."""
        return max(self.counts)


def _find_bucket(k: int, rows: list[np.ndarray], buckets: int):
    """From every rank's bracket_pass row of one tensor: a _Bucket, "miss" (the k-th key is not
    inside the keys every rank covered) or "flag" (a rank found ties or too many keys). NumPy:
    per tensor these are a few operations on short arrays, where torch's per-call cost dominates."""
    live = [r for r in rows if r[0] > 0]
    if any(r[5] for r in live):
        return "flag"
    shift = max(int(r[3]) for r in live)
    cover_lo = max(int(r[1]) for r in live)  # keys every rank counted exactly
    cover_hi = min(int(r[2]) for r in live) + 1
    cover_lo = -(-cover_lo >> shift) << shift
    cover_hi = (cover_hi >> shift) << shift
    if cover_lo >= cover_hi:
        return "miss"
    below, counts = 0, []
    for r in live:  # each rank's counts in buckets of 2**shift keys over [cover_lo, cover_hi)
        s, base = int(r[3]), int(r[1]) >> int(r[3])
        hist = r[ROW_HEADER:ROW_HEADER + buckets]
        start, stop = (cover_lo >> s) - base, (cover_hi >> s) - base
        below += int(r[4]) + int(hist[:start].sum())
        counts.append(hist[start:stop].reshape(-1, 1 << (shift - s)).sum(1))
    total = np.sum(counts, axis=0)
    rank = k - below
    if not 0 < rank <= int(total.sum()):
        return "miss"
    cum = np.cumsum(total)
    bucket = int(np.count_nonzero(cum < rank))
    rank -= int(cum[bucket - 1]) if bucket > 0 else 0
    lo = cover_lo + (bucket << shift)
    per_rank = iter(int(c[bucket]) for c in counts)
    return _Bucket(lo, lo + (1 << shift) - 1, rank, [next(per_rank) if r[0] > 0 else 0 for r in rows])


def _bracket_rows(kernels, shards, quantiles, lo, hi, buckets, windows, group, want_masks):
    """One bracket_pass per shard and one all_gather of the rows: per tensor every rank's row, and
    this rank's keys, positions and words."""
    rows, keys, positions, words = kernels.bracket_pass(shards, quantiles, lo, hi, buckets, windows,
                                                        want_masks=want_masks)
    lengths = [ROW_HEADER + b + _window_slots(w, t.dtype) for b, w, t in zip(buckets, windows, shards)]
    flat = torch.cat([rows[j, :n] for j, n in enumerate(lengths)])
    parts = [p.cpu().numpy() for p in _all_gather(flat.to(shards[0].device), group)]
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    return [[p[offsets[j]:offsets[j + 1]] for p in parts] for j in range(len(lengths))], keys, positions, words


def _window_bucket_keys(rows: list[np.ndarray], bucket: _Bucket, buckets: int, capacity: int, dtype):
    """Each rank's keys in the bucket, from the windows of the rows (None where a rank's window
    does not hold the whole bucket)."""
    out = []
    for r, count in zip(rows, bucket.counts):
        if count == 0:
            out.append(np.empty(0, dtype=np.int64))
            continue
        if not r[6] <= bucket.lo <= bucket.hi <= r[7]:  # also no window (-1)
            return None
        keys = r[ROW_HEADER + buckets:].view(_KEY_VIEWS[dtype.itemsize])[:capacity]
        keys = keys[(keys >= bucket.lo) & (keys <= bucket.hi)].astype(np.int64)
        if keys.size != count:  # the histogram and the window disagree: exchange instead
            return None
        out.append(keys)
    return out


def _bracket_select(shards, tensors, k, todo, group, want_masks, kernels, found, words):
    """The selection in one small round trip where the shards are alike, and one read of each
    shard: (1) one pass per shard brackets the k-th key from a sample of the shard, counts the
    keys under the bracket, gathers those inside it (with their positions), copies out the keys
    of a window around the shard's own k-th key and writes the mask words as if the bracket's
    keys were pruned; its histogram of the gathered keys in aligned buckets and its window go to
    every rank in one all_gather, which then knows the bucket of the global k-th key (where the
    ranks' brackets all cover it; else every rank passes over the union of their brackets, one
    more round); (2) the keys of that bucket on every rank come from the windows where they all
    hold it, else from one more all_gather of each rank's keys in it; then each rank finds the
    exact key and its ties and sets the kept bits of its gathered keys. Returns the tensors left
    to the radix select (ties filling a bracket, a bucket of over MAX_BUCKET_KEYS keys on a
    rank), the same on every rank."""
    if not todo:
        return []
    me, world = dist.get_rank(group), dist.get_world_size(group)
    buckets = [_bucket_count(tensors[i].numel()) for i in todo]
    windows = [_window_capacity(tensors[i].numel(), world) for i in todo]
    quantiles = [k[i] / tensors[i].numel() for i in todo]
    rows, keys, positions, written = _bracket_rows(kernels, [shards[i] for i in todo], quantiles, [-1] * len(todo),
                                                   [-1] * len(todo), buckets, windows, group, want_masks)
    where = [_find_bucket(k[i], rows[j], buckets[j]) for j, i in enumerate(todo)]
    retry = [j for j, w in enumerate(where) if w == "miss"]
    if retry:  # the ranks' brackets differ: all of them pass over the union of the brackets
        union = [[r for r in rows[j] if r[0] > 0] for j in retry]
        again = _bracket_rows(kernels, [shards[todo[j]] for j in retry], [quantiles[j] for j in retry],
                              [min(int(r[1]) for r in u) for u in union], [max(int(r[2]) for r in u) for u in union],
                              [buckets[j] for j in retry], [windows[j] for j in retry], group, want_masks)
        for n, j in enumerate(retry):
            rows[j] = again[0][n]
            where[j] = _find_bucket(k[todo[j]], rows[j], buckets[j])
            keys[j], positions[j], written[j] = again[1][n], again[2][n], again[3][n]
    settled = [j for j, w in enumerate(where) if isinstance(w, _Bucket) and w.width <= MAX_BUCKET_KEYS]
    if not settled:
        return todo
    # (2) each settled tensor's bucket keys on every rank: from the windows, or exchanged (padded
    # with -1 to the largest rank's count), after the bits of this rank's gathered keys above
    # the bucket are set
    ranks_keys = {j: _window_bucket_keys(rows[j], where[j], buckets[j], windows[j], tensors[todo[j]].dtype)
                  for j in settled}
    exchanged = [j for j in settled if ranks_keys[j] is None]
    split = settled if want_masks else exchanged  # without masks only an exchange needs this rank's keys
    widths = {j: where[j].width if ranks_keys[j] is None else where[j].counts[me] for j in split}
    payload, bucket_positions = kernels.bucket_split_(
        [shards[todo[j]] for j in split], [written[j] for j in split] if want_masks else [],
        [keys[j] for j in split], [positions[j] for j in split], [where[j].lo for j in split],
        [where[j].hi for j in split], [widths[j] for j in split]) if split else (None, [])
    offsets = dict(zip(split, np.cumsum([0] + [widths[j] for j in split]).tolist()))
    if exchanged:
        sent = torch.cat([payload[offsets[j]:offsets[j] + widths[j]] for j in exchanged])
        parts = [p.cpu().numpy() for p in _all_gather(sent.to(shards[0].device), group)]
        offset = 0
        for j in exchanged:
            ranks_keys[j] = [p[offset:offset + widths[j]] for p in parts]
            offset += widths[j]
    for j in settled:
        b = where[j]
        ordered = np.sort(np.concatenate(ranks_keys[j]))
        ordered = ordered[ordered >= 0]
        key = int(ordered[b.rank - 1])
        need = b.rank - int(np.count_nonzero(ordered < key))
        ties = [int(np.count_nonzero(r == key)) for r in ranks_keys[j]] if want_masks else None
        found.set(todo[j], key, need, ties, me)
    if want_masks:
        index = [todo[j] for j in settled]
        # this rank's bucket keys, in the order of their positions
        mine = [payload[offsets[j]:offsets[j] + where[j].counts[me]] for j in settled]
        kernels.resolve_masks_([shards[i] for i in index], [written[j] for j in settled], mine,
                               bucket_positions, [found.key[i] for i in index], [found.prune_here(i) for i in index])
        for i, j in zip(index, settled):
            words[i] = written[j]
    settled_set = {todo[j] for j in settled}
    return [i for i in todo if i not in settled_set]


def _radix_select(shards, tensors, k, todo, group, want_masks, kernels, found):
    """The radix select over shards: one collective per DIGIT_BITS-bit digit of the key (3 for
    fp32), each pass reading the shards (or the keys an earlier pass gathered)."""
    device = shards[0].device if shards else None
    me = dist.get_rank(group)
    # layers of one key width share digits, hence one collective per pass for all of them
    by_bits: dict[int, list[int]] = {}
    for i in todo:
        by_bits.setdefault(KEY_SPECS[tensors[i].dtype].key_bits, []).append(i)
    for key_bits, index in by_bits.items():
        sources = [shards[i] for i in index]
        quantiles = [k[i] / tensors[i].numel() for i in index]  # where the k-th key sits
        prefix = torch.zeros(len(index), dtype=torch.int64, device=device)
        rank = torch.tensor([k[i] for i in index], dtype=torch.int64, device=device)  # still to find
        widths = digit_widths(key_bits, DIGIT_BITS)
        shift = key_bits
        for p, width in enumerate(widths):
            shift -= width
            last = p == len(widths) - 1
            hist, sources = kernels.digit_histograms(sources, prefix.tolist(), shift, width,
                                                     gather=not last, quantiles=quantiles)
            hist, parts = _sum_or_gather(hist.to(device), group, last and want_masks)
            digit, below = _locate(hist, rank)
            prefix = (prefix << width) | digit
            rank = rank - below
        for j, (key, r) in enumerate(zip(prefix.tolist(), rank.tolist())):
            # the bin of the last digit holds exactly the keys equal to the threshold
            bins = [int(p[j, digit[j]]) for p in parts] if want_masks else None
            found.set(index[j], key, r, bins, me)
