"""The DSD phase plan and the checks of a schedule's arguments: which phase an epoch is in, the
cubic ramp of a gradual prune. One definition for the scheduler, the trainer callbacks, the train
job and its report."""
from __future__ import annotations

import math
from dataclasses import dataclass

PHASES = ("dense", "sparse", "redense")


@dataclass(frozen=True)
class PhasePlan:
    """The DSD epoch plan: `dense` epochs, then `cycles` times `sparse` then `redense` epochs.
    The one definition of which phase an epoch is in (scheduler, train job and report use it)."""
    dense: int
    sparse: int
    redense: int
    cycles: int = 1

    def __post_init__(self):
        for name in ("dense", "sparse", "redense", "cycles"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                label = name if name == "cycles" else f"{name}_epochs"
                raise ValueError(f"{label} must be a positive integer, got {value!r}")

    @property
    def total_epochs(self) -> int:
        return self.dense + self.cycles * (self.sparse + self.redense)

    def phase_at(self, epoch: int) -> str:
        """Phase of 0-based epoch `epoch` ("dense" past the end: training is over)."""
        if epoch < self.dense or epoch >= self.total_epochs:
            return "dense"
        offset = (epoch - self.dense) % (self.sparse + self.redense)
        return "sparse" if offset < self.sparse else "redense"

    def length(self, phase: str) -> int:
        """Epochs in one `phase` ("dense", "sparse" or "redense")."""
        return {"dense": self.dense, "sparse": self.sparse, "redense": self.redense}[phase]

    def lr_scale(self, epoch: int, sparse_scale: float, redense_scale: float) -> float:
        """The learning-rate factor of DSD's ladder in 0-based epoch `epoch`: 1 while dense, then
        sparse_scale until the first re-dense, redense_scale from then on (later cycles keep it)."""
        if epoch < self.dense:
            return 1.0
        return sparse_scale if epoch < self.dense + self.sparse else redense_scale

    def phases(self) -> list[tuple[str, int, int]]:
        """[(phase, first epoch, number of epochs)] in order."""
        plan = [("dense", 0, self.dense)]
        start = self.dense
        for _ in range(self.cycles):
            plan += [("sparse", start, self.sparse), ("redense", start + self.sparse, self.redense)]
            start += self.sparse + self.redense
        return plan


def _positive_finite(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def checked_plan(dense_epochs, sparse_epochs, redense_epochs, cycles, *, unit, scope,
                 redense_lr_scale, sparse_lr_scale=1.0, ramp_epochs=None, ramp_every=None,
                 sparsity=0.5) -> PhasePlan:
    """The schedule's arguments checked (one set of errors for DSDScheduler and the trainer
    callbacks, which check them when built, before any optimizer exists); the PhasePlan."""
    plan = PhasePlan(dense_epochs, sparse_epochs, redense_epochs, cycles)
    if unit not in ("epoch", "step"):
        raise ValueError(f"unit must be 'epoch' or 'step', got {unit!r}")
    if scope not in ("layer", "global"):
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
    _positive_finite(redense_lr_scale, "redense_lr_scale")
    _positive_finite(sparse_lr_scale, "sparse_lr_scale")
    check_ramp(ramp_epochs, ramp_every, sparse_epochs, sparsity, unit)
    return plan


def check_ramp(ramp_epochs, ramp_every, sparse_epochs: int, sparsity, unit: str = "epoch") -> None:
    """A gradual prune's arguments: R = ramp_epochs and E = ramp_every positive integers, R a
    multiple of E, R <= sparse_epochs, and a fractional sparsity (an N:M pattern has no ramp)."""
    if ramp_epochs is None:
        if ramp_every is not None:
            raise ValueError("ramp_every needs ramp_epochs (the length of the gradual prune)")
        return
    every = 1 if ramp_every is None else ramp_every
    for name, value in (("ramp_epochs", ramp_epochs), ("ramp_every", every)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer ({unit}s), got {value!r}")
    if ramp_epochs % every:
        raise ValueError(f"ramp_epochs={ramp_epochs} must be a multiple of ramp_every={every}")
    if ramp_epochs > sparse_epochs:
        raise ValueError(f"ramp_epochs={ramp_epochs} is longer than the sparse phase (sparse_epochs={sparse_epochs})")
    values = sparsity.values() if isinstance(sparsity, dict) else [sparsity]
    patterns = [v for v in values if isinstance(v, str)]
    if patterns:
        raise ValueError(f"a gradual prune (ramp_epochs) needs a fractional sparsity, got the N:M pattern "
                         f"{patterns[0]!r}: an N:M mask is complete at once")


def ramp_fraction(update: int, updates: int) -> float:
    """Zhu & Gupta's cubic schedule: the share of the final sparsity reached at update k of n."""
    return 1.0 - (1.0 - update / updates) ** 3


def checked_block(block, sparsity, ramp_epochs, scope) -> tuple[int, int] | None:
    """block=(bh, bw): two positive ints, with fractional sparsities, no ramp, per-layer scope."""
    if block is None:
        return None
    if (not isinstance(block, (tuple, list)) or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in block)):
        raise ValueError(f"block must be None or two positive ints (tile rows, tile cols), got {block!r}")
    values = sparsity.values() if isinstance(sparsity, dict) else [sparsity]
    if any(isinstance(v, str) for v in values):
        raise ValueError("block= prunes a fraction of whole tiles; an N:M sparsity already fixes its groups")
    if ramp_epochs is not None:
        raise ValueError("block= with a gradual prune (ramp_epochs) is not supported yet: prune the tiles at once")
    if scope != "layer":
        raise ValueError("block= prunes each weight's own tiles: it takes scope='layer'")
    return int(block[0]), int(block[1])
