"""Which (TILE x TILE) tiles of a packed mask keep anything: the basis of tile skipping in the
masked matmul of every backend. Recomputed only when the mask tensor changes."""
from __future__ import annotations

import torch
from torch.utils.weak import WeakTensorKeyDictionary

TILE = 64  # tile rows and columns; a multiple of 32 so a tile holds whole mask words
# On CPU, the matmuls over runs of kept tiles win once at most this fraction of tiles keep
# anything (benchmarks/results/cpu-*.json: at 75% kept they still tied with one matmul on W*M for
# a 3072 -> 768 layer); the torch and C++ backends both follow it.
BLOCKED_MAX_KEPT = 0.7


class TileStructure:
    """Flag grid `kept` (tiles_n, tiles_k) of a (N, K) weight's mask, with CSR lists (per
    n-tile, its non-empty k-tiles) and CSC lists (per k-tile, its non-empty n-tiles)."""

    def __init__(self, words: torch.Tensor, N: int, K: int, block_n: int = TILE,
                 block_k: int = TILE):
        tiles_n, tiles_k = -(-N // block_n), -(-K // block_k)
        per_tile = block_k // 32
        padded = torch.zeros(tiles_n * block_n, tiles_k * per_tile, dtype=torch.int32,
                             device=words.device)
        padded[:N, : words.shape[1]] = words
        kept = (padded.view(tiles_n, block_n, tiles_k, per_tile) != 0).any(3).any(1)
        self.block_n, self.block_k = block_n, block_k
        self.kept = kept.to(torch.int32).contiguous()  # (tiles_n, tiles_k)
        self.tiles_n, self.tiles_k = tiles_n, tiles_k
        zero = torch.zeros(1, dtype=torch.int64, device=words.device)
        self.row_ptr = torch.cat([zero, kept.sum(1).cumsum(0)])
        self.col_idx = kept.nonzero()[:, 1].contiguous()
        self.col_ptr = torch.cat([zero, kept.sum(0).cumsum(0)])
        self.row_idx = kept.t().nonzero()[:, 1].contiguous()
        self.kept_fraction = float(kept.float().mean()) if kept.numel() else 0.0
        self._runs = None

    def host_runs(self) -> tuple[list[list[tuple[int, int]]], list[list[tuple[int, int]]]]:
        """(per n-tile the runs of adjacent kept k-tiles, per k-tile the runs of adjacent kept
        n-tiles), each run (first, end) in tiles: one matmul per run on CPU."""
        if self._runs is None:
            kept = self.kept.cpu().bool()
            self._runs = ([_runs(row.tolist()) for row in kept], [_runs(col.tolist()) for col in kept.t()])
        return self._runs


def _runs(flags: list[bool]) -> list[tuple[int, int]]:
    runs, start = [], None
    for i, flag in enumerate(flags + [False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            runs.append((start, i))
            start = None
    return runs


_STRUCTURES = WeakTensorKeyDictionary()  # packed words -> ((version, N, K), TileStructure)


def tile_structure(words: torch.Tensor, N: int, K: int) -> TileStructure:
    """The mask's tile structure, recomputed only when the mask tensor changes."""
    key = (words._version, N, K)
    cached = _STRUCTURES.get(words)
    if cached is None or cached[0] != key:
        cached = (key, TileStructure(words, N, K))
        _STRUCTURES[words] = cached
    return cached[1]


def blocked_tiles(words: torch.Tensor, N: int, K: int) -> TileStructure | None:
    """On CPU, the tile structure when tile-by-tile matmuls pay (at most BLOCKED_MAX_KEPT of the
    tiles keep anything), else None: one dense matmul on W*M is faster. The rule of both CPU
    backends (composite and C++)."""
    if words.device.type != "cpu":
        return None
    s = tile_structure(words, N, K)
    return s if s.kept_fraction <= BLOCKED_MAX_KEPT else None
