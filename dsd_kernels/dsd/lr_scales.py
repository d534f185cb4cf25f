"""A factor on every param group's learning rate, applied around each optimizer step (step
hooks) rather than written into the groups: LR schedulers own group["lr"] (a closed-form one
rewrites it at every step), so only a per-step factor composes with all of them, handed over or
not. DSDScheduler's phase scales use it."""
from __future__ import annotations

import weakref
from typing import Callable

import torch


class StepRateScale:
    """Before each step of `optimizer` its groups' rates are multiplied by `factor()`, after it
    they are put back (a step that raised is undone before the next one). `factor` is held
    weakly when it is a bound method: an owner dropped without remove() leaves hooks that do
    nothing."""

    def __init__(self, optimizer: torch.optim.Optimizer, factor: Callable[[], float]):
        self._factor = weakref.WeakMethod(factor) if hasattr(factor, "__self__") else (lambda: factor)
        self._scaled: list = []  # (group, rate before the step, rate the step ran at)
        self._handles = [optimizer.register_step_pre_hook(self._scale),
                         optimizer.register_step_post_hook(lambda opt, args, kwargs: self.restore())]

    def _scale(self, optimizer, args, kwargs) -> None:
        self.restore()
        factor = self._factor()
        scale = 1.0 if factor is None else factor()
        if scale == 1.0:
            return
        for group in optimizer.param_groups:
            lr = group["lr"]
            if isinstance(lr, torch.Tensor):  # capturable / fused: the same tensor, scaled in place
                self._scaled.append((group, lr.clone(), lr))
                lr.mul_(scale)
            else:
                group["lr"] = lr * scale
                self._scaled.append((group, lr, group["lr"]))

    def restore(self) -> None:
        """Put back the rates a step ran at scaled (a no-op between steps)."""
        for group, before, during in self._scaled:
            if isinstance(during, torch.Tensor):
                during.copy_(before)
            elif group["lr"] is during:  # unless the step itself set a new rate
                group["lr"] = before
        self._scaled = []

    def remove(self) -> None:
        """Detach from the optimizer: its steps run at the groups' own rates again."""
        self.restore()
        for handle in self._handles:
            handle.remove()
        self._handles = []
