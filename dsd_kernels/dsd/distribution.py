"""Per-layer sparsities of dynamic sparse training: uniform, or Erdős–Rényi-Kernel (ERK, Evci
et al., "Rigging the Lottery", ICML 2020), with exact pruned counts.

ERK gives layer l a density proportional to (sum of its dims) / (product of its dims), scaled
so that the whole model keeps (1 - s) of its weights; a layer whose density would exceed 1 is
dense and the rest are rescaled (RigL's sparse_utils, erk_power_scale 1). The counts are then made
integral with the global count exact: round(s * total) pruned over all the layers, each layer's
count the floor of its share, the remainder handed out by the largest fractional parts (ties to
the earlier layer)."""
from __future__ import annotations

import math
from collections.abc import Sequence


def erk_densities(shapes: Sequence[Sequence[int]], sparsity: float) -> list[float]:
    """The ERK density (kept fraction) of each layer, 1.0 for the layers ERK leaves dense."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1) for ERK, got {sparsity}")
    sizes = [math.prod(s) for s in shapes]
    raw = [sum(s) / math.prod(s) for s in shapes]
    dense: set[int] = set()
    while True:
        rhs = divisor = 0.0
        for i, n in enumerate(sizes):
            if i in dense:
                rhs -= n * sparsity  # a dense layer keeps its would-be zeros: the others keep fewer
            else:
                rhs += n * (1.0 - sparsity)
                divisor += raw[i] * n
        if divisor == 0.0:  # every layer dense
            return [1.0] * len(sizes)
        eps = rhs / divisor
        sparse = [i for i in range(len(sizes)) if i not in dense]
        top = max(raw[i] for i in sparse)
        if top * eps <= 1.0:
            return [1.0 if i in dense else eps * raw[i] for i in range(len(sizes))]
        dense.update(i for i in sparse if raw[i] == top)


def exact_pruned_counts(sizes: Sequence[int], densities: Sequence[float], sparsity: float) -> list[int]:
    """Pruned counts per layer from float densities, summing to exactly round(sparsity * total)."""
    total = sum(sizes)
    target = round(sparsity * total)
    shares = [(1.0 - d) * n for d, n in zip(densities, sizes)]
    counts = [min(n, max(0, math.floor(x))) for x, n in zip(shares, sizes)]
    left = target - sum(counts)
    order = sorted(range(len(sizes)), key=lambda i: (-(shares[i] - math.floor(shares[i])), i))
    while left > 0:
        moved = False
        for i in order:
            if left == 0:
                break
            if densities[i] < 1.0 and counts[i] < sizes[i]:
                counts[i] += 1
                left -= 1
                moved = True
        if not moved:
            raise ValueError(f"ERK cannot prune {target} of {total} weights with the layers it leaves dense")
    while left < 0:  # floor of a share above its layer's size never happens; kept for exactness
        i = max(range(len(sizes)), key=lambda j: counts[j])
        counts[i] -= 1
        left += 1
    return counts


def layer_pruned_counts(shapes: Sequence[Sequence[int]], sparsities: Sequence[float], distribution: str) -> list[int]:
    """Pruned weights per layer: "uniform" (round(s_l * N_l) each, as the selection counts) or
    "erk" (one sparsity for all the layers, spread by ERK with the global count exact)."""
    sizes = [math.prod(s) for s in shapes]
    if distribution == "uniform":
        return [round(s * n) for s, n in zip(sparsities, sizes)]
    if distribution != "erk":
        raise ValueError(f"distribution must be 'uniform' or 'erk', got {distribution!r}")
    if len(set(sparsities)) > 1:
        raise ValueError(f"distribution='erk' spreads one sparsity over the layers; got several "
                         f"({sorted(set(sparsities))}): give one float, or use distribution='uniform'")
    sparsity = sparsities[0] if sparsities else 0.0
    return exact_pruned_counts(sizes, erk_densities(shapes, sparsity), sparsity)
