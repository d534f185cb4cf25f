"""A factor on every param group's learning rate, applied around each optimizer step (step
hooks) rather than written into the groups: LR schedulers own group["lr"] (a closed-form one
rewrites it at every step), so only a per-step factor composes with all of them, handed over or
not. DSDScheduler's phase scales use it."""
from __future__ import annotations

import types
import weakref
from typing import Callable

import torch


class StepRateScale:
    """Before each step of `optimizer` its groups' rates are multiplied by `factor()`, after it
    they are put back, also when the step raises: outside a step a group's rate is always the
    one its owner set. `factor` is held weakly when it is a bound method: an owner dropped
    without remove() leaves hooks that do nothing.

    The post hook restores after a step that returns; a step that raises skips torch's post
    hooks, so the optimizer's `step` is wrapped on the instance (as torch's LR schedulers wrap
    it to count steps) to restore before the exception leaves it."""

    def __init__(self, optimizer: torch.optim.Optimizer, factor: Callable[[], float]):
        self._factor = weakref.WeakMethod(factor) if hasattr(factor, "__self__") else (lambda: factor)
        self._scaled: list = []  # (group, rate before the step, rate the step ran at)
        self._handles = [optimizer.register_step_pre_hook(self._scale),
                         optimizer.register_step_post_hook(lambda opt, args, kwargs: self.restore())]
        _restore_when_step_raises(optimizer, self)

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

    def base_rate(self, group: dict) -> float:
        """A group's own rate (its LR schedule's), also while a step runs it scaled."""
        for scaled_group, before, _ in self._scaled:
            if scaled_group is group:
                return float(before)
        return float(group["lr"])

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


def _restore_when_step_raises(optimizer: torch.optim.Optimizer, scale: StepRateScale) -> None:
    """Wrap optimizer.step (once per optimizer) so that a step that raises puts back the rates
    of every StepRateScale on it before the exception propagates. The wrapper is a method bound
    to the optimizer, as torch's own step is (torch's LR schedulers wrap `step.__func__` in
    turn); it holds the scales weakly and the optimizer only through its call, and is left out
    of pickles and copies (torch's Optimizer pickles only its state and groups)."""
    scales = optimizer.__dict__.get("_dsd_rate_scales")
    if scales is None:
        scales = optimizer.__dict__["_dsd_rate_scales"] = weakref.WeakSet()
        inner = optimizer.step
        # a bound method (torch's step): called on the optimizer it is bound to; an instance-level
        # wrapper already there (an LR scheduler's) is a plain function: called as it is
        call = (lambda self, a, kw: inner.__func__(self, *a, **kw)) if isinstance(inner, types.MethodType) \
            else (lambda self, a, kw: inner(*a, **kw))

        def step_restoring_rates(self, *args, **kwargs):
            try:
                return call(self, args, kwargs)
            except BaseException:
                for held in list(scales):
                    held.restore()
                raise

        step_restoring_rates.__doc__ = inner.__doc__
        if getattr(inner, "_wrapped_by_lr_sched", False):  # the LR scheduler's wrapper is inside
            step_restoring_rates._wrapped_by_lr_sched = True
        optimizer.step = types.MethodType(step_restoring_rates, optimizer)
    scales.add(scale)
