"""Exact magnitude selection over sharded weights (DTensor, as FSDP2's fully_shard holds them).

A front end called only from ops/magnitude_select.py, which passes it the backend modules the registry picks
for the device of the local shards: `local` (magnitude_select) for replicated tensors and
`sharded` (digit_histograms, threshold_masks) for the per-shard work of Shard(0) tensors.
This module runs the collectives around those kernels and never touches a weight itself.

A weight sharded on dim 0 over a 1-D device mesh is never gathered: each rank histograms the
keys of its own shard, the histograms of all layers of the batch are summed with one
collective per radix pass (11-bit digits: 3 passes for fp32), and every rank finds the same
exact global k-th key. The tie rule (lower global flat index first) holds across shard
boundaries: rank r's rows all precede rank r+1's. When masks are wanted the last pass
all_gathers the ranks' histograms instead of summing them, and the bin of the last digit
then tells each rank how many keys equal to the threshold the lower ranks hold, hence how
many of the ties to prune are its own. Each rank gets its local masks; gathered along dim 0
they equal the single-process masks bit for bit.

Collectives per call and key width: one per radix pass, nothing else. Traffic: layers x
(2048 + 1024 + 1024) x 8 bytes for fp32 (all_reduce), the last pass x ranks when masks are
wanted (all_gather); independent of the number of weights.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ._dtensor import DTensor, Replicate, Shard, local_tensor
from ._floatbits import KEY_SPECS, digit_widths, keys_to_values
from .masks import Mask

DIGIT_BITS = 11
COLLECTIVE_BYTES = [0]  # bytes sent through collectives by this module (tests and notes)


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


def _all_reduce(t: torch.Tensor, group) -> None:
    COLLECTIVE_BYTES[0] += t.numel() * t.element_size()
    dist.all_reduce(t, group=group)


def _all_gather(t: torch.Tensor, group) -> list[torch.Tensor]:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    COLLECTIVE_BYTES[0] += t.numel() * t.element_size() * len(parts)
    dist.all_gather(parts, t, group=group)
    return parts


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
    threshold_key: list[int | None] = [None] * len(tensors)  # the global k-th key (k > 0)
    need = [0] * len(tensors)  # ties at the threshold key to prune, over all ranks
    local_ties = [0] * len(tensors)  # ties at the threshold key held by this rank
    ties_before = [0] * len(tensors)  # ... and by the ranks before it
    me = dist.get_rank(group)
    # layers of one key width share digits, hence one collective per pass for all of them
    by_bits: dict[int, list[int]] = {}
    for i, t in enumerate(tensors):
        if k[i] > 0:
            by_bits.setdefault(KEY_SPECS[t.dtype].key_bits, []).append(i)
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
            hist = hist.to(device)
            if last and want_masks:
                ranks_hists = _all_gather(hist, group)
                hist = torch.stack(ranks_hists).sum(0)
            else:
                _all_reduce(hist, group)
            cum = hist.cumsum(1)
            digit = (cum < rank[:, None]).sum(1)  # the bin holding the rank-th smallest key
            below = torch.where(digit > 0, cum.gather(1, (digit - 1).clamp(min=0)[:, None])[:, 0], 0)
            prefix = (prefix << width) | digit
            rank = rank - below
        for j, (key, r) in enumerate(zip(prefix.tolist(), rank.tolist())):
            threshold_key[index[j]], need[index[j]] = key, r
        if want_masks:  # the bin of the last digit holds exactly the keys equal to the threshold
            ties = [h.gather(1, digit[:, None])[:, 0].tolist() for h in ranks_hists]
            for j, i in enumerate(index):
                local_ties[i] = ties[me][j]
                ties_before[i] = sum(t[j] for t in ties[:me])
    thresholds = torch.tensor(
        [float("-inf") if key is None else float(keys_to_values(torch.tensor([key]), t.dtype)[0])
         for key, t in zip(threshold_key, tensors)], dtype=torch.float64, device=device)
    if not want_masks:
        return thresholds, []
    words = kernels.threshold_masks(shards, threshold_key, need, ties_before, local_ties)
    return thresholds, [Mask(w, x.shape) for w, x in zip(words, shards)]
