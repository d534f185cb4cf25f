"""The trainer-independent half of the DSD callbacks: arguments checked when the callback is
built, a DSDScheduler on the trainer's optimizer, advancing it by the trainer's own counters,
and the figures the callbacks log."""
from __future__ import annotations

import warnings

import torch

from ..dsd.plan import PHASES, checked_block, checked_plan
from ..dsd.scheduler import DSDScheduler
from ..ops._common import as_sparsity


def unwrap_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside a trainer's wrapper (accelerate's AcceleratedOptimizer,
    Lightning's LightningOptimizer): the object whose step hooks fire and whose state is saved."""
    for _ in range(8):
        inner = getattr(optimizer, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            inner = getattr(optimizer, "_optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer) or inner is optimizer:
            break
        optimizer = inner
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"DSDCallback needs a torch.optim.Optimizer, the trainer has {type(optimizer).__name__}")
    return optimizer


def unwrap_lr_scheduler(scheduler):
    """The torch LR scheduler inside accelerate's AcceleratedScheduler (or the scheduler itself)."""
    inner = getattr(scheduler, "scheduler", None)
    return inner if inner is not None and hasattr(inner, "state_dict") else scheduler


class DSDRun:
    """Holds the callback's arguments and, once training starts, its DSDScheduler. The
    callbacks take DSDScheduler's arguments: sparsity, dense/sparse/redense epochs,
    redense_lr_scale, sparse_lr_scale, cycles, ramp_epochs, ramp_every, unit ("epoch" or
    "step": optimizer steps), include, exclude, scope, block (whole tiles pruned; the model's
    nn.Linear layers skip them while sparse)."""

    def __init__(self, sparsity, dense_epochs: int, sparse_epochs: int, redense_epochs: int,
                 redense_lr_scale: float = 0.1, cycles: int = 1, unit: str = "epoch",
                 include=None, exclude=None, scope: str = "layer", *, sparse_lr_scale: float = 1.0,
                 ramp_epochs: int | None = None, ramp_every: int | None = None,
                 block: tuple[int, int] | None = None):
        # every argument error here, before the trainer starts
        self.plan = checked_plan(dense_epochs, sparse_epochs, redense_epochs, cycles, unit=unit, scope=scope,
                                 redense_lr_scale=redense_lr_scale, sparse_lr_scale=sparse_lr_scale,
                                 ramp_epochs=ramp_epochs, ramp_every=ramp_every, sparsity=sparsity)
        if not isinstance(sparsity, dict):
            sparsity = as_sparsity(sparsity, allow_one=False)
        self.block = checked_block(block, sparsity, ramp_epochs, scope)
        self.sparsity, self.include, self.exclude, self.scope = sparsity, include, exclude, scope
        self.unit, self.redense_lr_scale = unit, float(redense_lr_scale)
        self.sparse_lr_scale, self.ramp_epochs, self.ramp_every = float(sparse_lr_scale), ramp_epochs, ramp_every
        self.scheduler: DSDScheduler | None = None
        self._counted: tuple = (None, 0.0)  # (the masks' identities, their pruned fraction)

    def start(self, optimizer, model: torch.nn.Module, state: dict | None) -> None:
        """Build the DSD schedule over the trainer's optimizer and model; `state`: a saved
        DSDScheduler.state_dict to continue from (a resumed run)."""
        if self.scheduler is not None:  # a second fit: the first one's step hooks go
            self.scheduler.close()
        self.scheduler = DSDScheduler(
            unwrap_optimizer(optimizer), dense_epochs=self.plan.dense, sparse_epochs=self.plan.sparse,
            redense_epochs=self.plan.redense, cycles=self.plan.cycles, sparsity=self.sparsity,
            redense_lr_scale=self.redense_lr_scale, sparse_lr_scale=self.sparse_lr_scale,
            ramp_epochs=self.ramp_epochs, ramp_every=self.ramp_every, model=model, include=self.include,
            exclude=self.exclude, scope=self.scope, unit=self.unit, block=self.block)
        if state:
            self.scheduler.load_state_dict(state)

    def warn_if_short(self, trainer_length: int | None) -> None:
        """Warn when the trainer stops before the plan ends (a run that never re-denses)."""
        total = self.plan.total_epochs
        if trainer_length is not None and 0 < trainer_length < total:
            warnings.warn(f"DSDCallback: the trainer runs {trainer_length} {self.unit}s but the DSD plan "
                          f"takes {total} ({self.plan.phases()}); the run ends in the "
                          f"{self.plan.phase_at(trainer_length)} phase", stacklevel=3)

    def advance_to(self, completed: int) -> list[str]:
        """Step the schedule until it has seen `completed` epochs (or steps) or its plan ends;
        returns the phases entered. Past the plan, training goes on dense at the last LR
        scale."""
        entered = []
        scheduler = self.scheduler
        while scheduler.epoch < min(completed, scheduler.total_epochs):
            phase = scheduler.step()
            if phase is not None:
                entered.append(phase)
        return entered

    def metrics(self) -> dict[str, float]:
        """phase (0 dense, 1 sparse, 2 re-dense), fraction of the selected weights pruned now,
        the learning rate the first param group's steps run at (its rate times the phase's
        scale) and that scale."""
        scheduler = self.scheduler
        lr = scheduler.current_lr()
        phase = scheduler.phase_at(min(scheduler.epoch, scheduler.total_epochs - 1))
        # counting the pruned weights unpacks every mask: done again only when the masks change
        # (metrics are logged every step with unit="step")
        key = tuple((id(m.packed), m.packed._version) for m in scheduler.masks.values())
        if key != self._counted[0]:
            self._counted = (key, scheduler.pruned_fraction())
        return {"dsd/phase": float(PHASES.index(phase)), "dsd/sparsity": self._counted[1], "dsd/lr": float(lr),
                "dsd/lr_scale": scheduler.lr_scale}
