"""The learning rate each optimizer step runs at, as the step itself sees it: a step pre-hook
registered after the DSD scheduler's (hooks run in registration order), so it reads the group's
rate with the phase's scale applied."""
from __future__ import annotations


class StepRates:
    def __init__(self, optimizer):
        self.seen: list[float] = []
        self.handle = optimizer.register_step_pre_hook(
            lambda opt, args, kwargs: self.seen.append(float(opt.param_groups[0]["lr"])))

    @property
    def last(self) -> float:
        return self.seen[-1]
