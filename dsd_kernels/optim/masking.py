"""Masks on the parameters of any torch optimizer (Adam, AdamW, RMSprop, third-party ...).

`OptimizerMasks(optimizer)` registers two step hooks on the optimizer: before each step the
gradients of the masked parameters are zeroed where pruned (so no pruned gradient reaches the
optimizer's state), after it the masked parameters themselves (whatever weight decay or
momentum did there), each a fused multi-tensor pass (`ops.apply_masks_`). Pruned weights are
then exactly 0 after every `optimizer.step()`. Setting masks zeroes the pruned weights and
every per-parameter state tensor of the parameter's shape there (momentum, Adam's moments);
clearing them resets that state there to what a fresh optimizer holds (0 for moments, the
initial step size for Rprop, the initial accumulator for Adagrad), so pruned weights restart
from 0 with fresh state.
MaskedSGD needs none of this: its fused step keeps pruned weights and momentum at 0 itself.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import ops
from .._dtensor import local_tensor
from ..masks import Mask, as_mask
from ..ops._plan import apply_masks_plans
from .mask_state import ENTRY, add_mask_entries, take_mask_entries


def state_tensors(optimizer: torch.optim.Optimizer, p: Tensor) -> list[Tensor]:
    """The optimizer's per-parameter state tensors of p's shape (momentum, Adam's moments, ...)."""
    return [v for v in optimizer.state.get(p, {}).values() if isinstance(v, Tensor) and v.shape == p.shape]


@torch.no_grad()
def zero_pruned(optimizer: torch.optim.Optimizer, masks: dict, *, params: bool) -> None:
    """Zero the pruned entries of every masked parameter's state tensors (and, with params=True,
    of the parameters themselves) in one fused apply_masks_ pass. masks: {param: Mask}."""
    tensors, applied = [], []
    for p, m in masks.items():
        for t in ([p] if params else []) + state_tensors(optimizer, p):
            tensors.append(local_tensor(t).detach())
            applied.append(m)
    ops.apply_masks_(tensors, applied)


@torch.no_grad()
def mask_gradients_(masks: dict) -> None:
    """Zero the pruned entries of the masked parameters' gradients in one fused apply_masks_
    pass (sparse gradients are left to the step). masks: {param: Mask}."""
    pairs = [(p.grad, m) for p, m in masks.items() if p.grad is not None and not p.grad.is_sparse]
    ops.apply_masks_([local_tensor(g) for g, _ in pairs], [m for _, m in pairs])


class OptimizerMasks:
    """Masks applied around any optimizer's step (module docstring). In the optimizer's
    state_dict every masked parameter, and every one of `params` (the weights that may be
    pruned), carries a per-parameter "mask" entry (optim/mask_state.py), which
    torch.distributed.checkpoint saves and reshards; loading a state dict restores the masks."""

    def __init__(self, optimizer: torch.optim.Optimizer, params=None):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.optimizer = optimizer
        self._masks: dict[Tensor, Mask] = {}
        self._carried = set() if params is None else {id(p) for p in params}
        self._plans = None  # per device, the kernel plans of the masked parameters (see _planned)
        # "mask" entries the optimizer loaded before these hooks existed (a trainer restoring the
        # optimizer first) were cast to its dtype by torch: not state, dropped
        for entry in optimizer.state.values():
            entry.pop(ENTRY, None)
        self._handles = [optimizer.register_step_pre_hook(self._mask_gradients),
                         optimizer.register_step_post_hook(self._mask_parameters),
                         optimizer.register_state_dict_post_hook(self._add_mask_entries),
                         optimizer.register_load_state_dict_pre_hook(self._take_mask_entries)]

    @property
    def masks(self) -> dict[Tensor, Mask]:
        return dict(self._masks)

    def __getstate__(self) -> dict:  # a copy builds its own plans, over its own tensors
        return {**self.__dict__, "_plans": None}

    def _held(self) -> set[int]:
        return {id(p) for g in self.optimizer.param_groups for p in g["params"]}

    @torch.no_grad()
    def set_masks(self, masks: dict) -> None:
        """{param: Mask, bool or 0/1 tensor}: zero the pruned weights and their optimizer state
        now, and keep them at 0 after every step until clear_masks()."""
        held = self._held()
        checked = {}
        for p, m in masks.items():
            if not isinstance(p, Tensor) or id(p) not in held:
                raise ValueError("set_masks got a mask for a tensor the optimizer does not hold")
            checked[p] = as_mask(m, local_tensor(p))  # a sharded param's mask covers its local shard
        zero_pruned(self.optimizer, checked, params=True)
        self._masks.update(checked)
        self._plans = None

    def _fresh_state(self, p: Tensor) -> dict:
        """The state tensors a fresh optimizer of this class holds for a zero weight after a step
        with a zero gradient (the state a weight that starts training again gets)."""
        import inspect
        group = next(g for g in self.optimizer.param_groups if any(q is p for q in g["params"]))
        accepted = inspect.signature(type(self.optimizer).__init__).parameters
        hyper = {k: (v.clone() if isinstance(v, Tensor) else v) for k, v in group.items()
                 if k != "params" and k in accepted}
        local = local_tensor(p).detach()  # elementwise state: a shard's fresh state is the whole one's
        probe = torch.zeros_like(local, requires_grad=True)
        probe.grad = torch.zeros_like(local)
        try:
            fresh = type(self.optimizer)([probe], **hyper)
            with torch.enable_grad():
                fresh.step()
        except Exception:  # noqa: BLE001 - an optimizer we cannot probe: its state restarts at 0
            return {}
        return {k: v for k, v in fresh.state[probe].items() if isinstance(v, Tensor) and v.shape == local.shape}

    @torch.no_grad()
    def clear_masks(self) -> None:
        """Drop every mask; pruned weights restart from exactly 0 with fresh optimizer state."""
        for p, m in self._masks.items():
            fresh = self._fresh_state(p) if self.optimizer.state.get(p) else {}
            keep = m.to_bool().to(p.device)
            for key, value in self.optimizer.state.get(p, {}).items():
                if isinstance(value, Tensor) and value.shape == p.shape:
                    value = local_tensor(value)
                    value.copy_(torch.where(keep, value, fresh[key].to(value.dtype) if key in fresh
                                            else torch.zeros_like(value)))
        self._masks.clear()
        self._plans = None

    def remove(self) -> None:
        """Detach from the optimizer (the masks stop being applied)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _planned(self) -> list | None:
        """One apply_masks_ kernel plan per device of the masked parameters (ops/_plan.py), built
        once and dropped by set_masks, clear_masks and load_state_dict; None where the masks
        need the general front end (complex or sharded parameters, other layouts: decided once,
        kept as an empty list) or while tracing."""
        if torch.compiler.is_compiling() or not self._masks:
            return None
        if self._plans is None or not all(plan.current() for plan in self._plans):
            self._plans = apply_masks_plans(list(self._masks), list(self._masks.values())) or []
        return self._plans or None

    @torch.no_grad()
    def _mask_gradients(self, optimizer, args, kwargs) -> None:
        plans = self._planned()
        if plans is not None:
            gradients = [plan.gradients([p.grad for p in plan.tensors]) for plan in plans]
            if all(g is not None for g in gradients):
                for plan, grads in zip(plans, gradients):
                    plan.impl.apply_masks_(grads, plan.words, static_key=plan.gradient_key)
                return
        mask_gradients_(self._masks)

    @torch.no_grad()
    def _mask_parameters(self, optimizer, args, kwargs) -> None:
        plans = self._planned()
        if plans is not None:
            for plan in plans:
                plan.impl.apply_masks_(plan.views, plan.words, static_key=plan)
            return
        ops.apply_masks_(list(self._masks), list(self._masks.values()))

    # masks in the optimizer's state dict
    def _params(self) -> list[Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def _add_mask_entries(self, optimizer, state_dict: dict) -> dict:
        return add_mask_entries(state_dict, self._params(), self._masks,
                                self._carried | {id(p) for p in self._masks})

    def _take_mask_entries(self, optimizer, state_dict: dict) -> dict:
        state_dict, entries = take_mask_entries(state_dict, self._params())
        if entries:  # a state dict with our entries: its masks replace ours
            self._masks = {p: m for p, m in entries.items() if m is not None}
            self._plans = None
        return state_dict

    # masks in a checkpoint of their own, by parameter index (DSDScheduler.state_dict keeps them
    # there for one process)
    def state_dict(self) -> dict:
        index = {id(p): i for i, p in enumerate(self._params())}
        return {index[id(p)]: m.state_dict() for p, m in self._masks.items()}

    def load_state_dict(self, state: dict) -> None:
        params = self._params()
        loaded = {}
        for i, m in state.items():
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(params):
                raise ValueError(f"masks state has a mask for parameter {i!r}, but the optimizer "
                                 f"holds parameters 0..{len(params) - 1}")
            loaded[params[i]] = as_mask(Mask.from_state_dict(m), local_tensor(params[i]), f"mask {i}")
        self._masks = loaded
        self._plans = None
