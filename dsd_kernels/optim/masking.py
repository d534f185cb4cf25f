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

import operator

import torch
from torch import Tensor

from .. import ops
from .._dtensor import local_tensor
from ..masks import Mask, as_mask
from ..ops._plan import apply_masks_plans
from .mask_state import (ENTRY, add_mask_entries, check_can_carry, checked_masks, mask_from_entry,
                         take_mask_entries)


def state_tensors(optimizer: torch.optim.Optimizer, p: Tensor, keys=None) -> list[Tensor]:
    """The optimizer's per-parameter state tensors of p's shape (momentum, Adam's moments, ...),
    only those under `keys` where given."""
    return [v for k, v in optimizer.state.get(p, {}).items()
            if isinstance(v, Tensor) and v.shape == p.shape and (keys is None or k in keys)]


def same_state(state, snapshot: list) -> bool:
    """Whether an optimizer's state holds the very per-parameter dicts of `snapshot`
    (list(state.values()) when a plan was made), in order and no more: compared by identity, no
    parameter hashed."""
    return len(state) == len(snapshot) and all(map(operator.is_, state.values(), snapshot))


@torch.no_grad()
def zero_pruned(optimizer: torch.optim.Optimizer, masks: dict, *, params: bool, keys=None) -> None:
    """Zero the pruned entries of every masked parameter's state tensors (only those under `keys`
    where given; and, with params=True, of the parameters themselves) in one fused apply_masks_
    pass. masks: {param: Mask}."""
    tensors, applied = [], []
    for p, m in masks.items():
        for t in ([p] if params else []) + state_tensors(optimizer, p, keys):
            tensors.append(local_tensor(t).detach())
            applied.append(m)
    ops.apply_masks_(tensors, applied)


def remask_plans(cache: dict, state, masks: dict, keys=None) -> list | None:
    """apply_masks_ plans (one per device, ops/_plan.py) over the masked weights of `masks`
    ({param: Mask}) and their state tensors of the weight's shape in `state` (an optimizer's; only
    those under `keys` where given), for re-masking after a step. Kept in cache["remask"] while
    the state holds the very per-parameter dicts and tensors they were made of and every tensor
    its storage; None where they need the general front end (decided once for that state) or
    under tracing."""
    if torch.compiler.is_compiling():
        return None
    entry = cache.get("remask")
    if entry is not None:
        built, snapshot, (held_dicts, held_keys, held) = entry
        if (same_state(state, snapshot) and all(map(operator.is_, map(dict.get, held_dicts, held_keys), held))
                and (built is None or all(plan.current() for plan in built))):
            return built
    tensors, applied, held_dicts, held_keys, held = [], [], [], [], []
    for p, m in masks.items():
        tensors.append(p)
        applied.append(m)
        sd = state.get(p, {})
        for key, value in sd.items():
            if isinstance(value, Tensor) and value.shape == p.shape and (keys is None or key in keys):
                tensors.append(value)
                applied.append(m)
                held_dicts.append(sd)
                held_keys.append(key)
                held.append(value)
    built = apply_masks_plans(tensors, applied)
    cache["remask"] = (built, list(state.values()), (held_dicts, held_keys, held))
    return built


@torch.no_grad()
def mask_gradients_(masks: dict) -> None:
    """Zero the pruned entries of the masked parameters' gradients in one fused apply_masks_
    pass (sparse gradients are left to the step). masks: {param: Mask}."""
    pairs = [(p.grad, m) for p, m in masks.items() if p.grad is not None and not p.grad.is_sparse]
    ops.apply_masks_([local_tensor(g) for g, _ in pairs], [m for _, m in pairs])


# torch optimizers whose update is elementwise per parameter, with the state tensors a step on
# masked gradients leaves at 0 where pruned (set_masks zeroes every state tensor there, and a zero
# gradient on a zero weight keeps these at 0). For them one pass after the step (the weights and
# these state tensors masked) leaves the very bits of two passes (gradients masked before, weights
# after): a kept entry's update never reads a pruned one (tests/test_one_pass_masking.py checks
# it over torch's own optim_db configurations). Exact classes: a subclass may step otherwise.
ELEMENTWISE_STATE: dict[type, tuple[str, ...]] = {
    torch.optim.SGD: ("momentum_buffer",),
    torch.optim.Adam: ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
    torch.optim.AdamW: ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
    torch.optim.NAdam: ("exp_avg", "exp_avg_sq"),
    torch.optim.RAdam: ("exp_avg", "exp_avg_sq"),
    torch.optim.RMSprop: ("square_avg", "momentum_buffer", "grad_avg"),
    torch.optim.Adagrad: ("sum",),
    torch.optim.Adadelta: ("square_avg", "acc_delta"),
}


class OptimizerMasks:
    """Masks applied around any optimizer's step (module docstring). In the optimizer's
    state_dict every masked parameter, and every one of `params` (the weights that may be
    pruned), carries a per-parameter "mask" entry (optim/mask_state.py), which
    torch.distributed.checkpoint saves and reshards; loading a state dict restores the masks.

    elementwise: None (the default) takes one masking pass after each step for the torch
    optimizers of ELEMENTWISE_STATE (the weights and the listed state tensors, the same bits as
    two passes) and two passes (gradients before the step, weights after) for every other one;
    a tuple of state keys declares a third-party optimizer elementwise, those state tensors being
    0 where pruned after a step on masked gradients; False: always two passes. Gradients are not
    masked in one pass: a trainer that clips or logs them between backward and the step masks them
    then (DSDScheduler.mask_gradients, as the trainer callbacks do)."""

    def __init__(self, optimizer: torch.optim.Optimizer, params=None, *, elementwise=None):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if elementwise is None:
            elementwise = ELEMENTWISE_STATE.get(type(optimizer))
        elif elementwise is False:
            elementwise = None
        elif isinstance(elementwise, str) or not all(isinstance(k, str) for k in elementwise):
            raise TypeError(f"elementwise must be None, False or a tuple of state keys, got {elementwise!r}")
        self.one_pass_state = None if elementwise is None else tuple(elementwise)
        self.optimizer = optimizer
        self._masks: dict[Tensor, Mask] = {}
        self._carried = set() if params is None else {id(p) for p in params}
        self._plans = None  # per device, the kernel plans of the masked parameters (see _planned)
        self._remask_cache: dict = {}  # the one-pass re-masking plans (remask_plans)
        self._loading = None  # the masks of a state dict being loaded, set once torch's load succeeds
        # "mask" entries the optimizer loaded before these hooks existed (a trainer restoring the
        # optimizer first): torch cast them to the parameter's dtype; they are the masks saved
        loaded = {}
        for p, entry in optimizer.state.items():
            if isinstance(entry, dict) and ENTRY in entry:
                loaded[p] = entry.pop(ENTRY)
        if loaded:
            params = self._params()
            index = {id(p): i for i, p in enumerate(params)}
            for p, words in loaded.items():
                try:
                    mask = mask_from_entry(index[id(p)], words, params) if id(p) in index else None
                except ValueError:  # int32 words of the earlier format, which the cast rounded: lost
                    mask = None
                if mask is not None:
                    self._masks[p] = mask
        self._register()

    def _register(self) -> None:
        optimizer = self.optimizer
        self._handles = [optimizer.register_step_pre_hook(self._mask_gradients),
                         optimizer.register_step_post_hook(self._mask_parameters),
                         optimizer.register_state_dict_post_hook(self._add_mask_entries),
                         optimizer.register_load_state_dict_pre_hook(self._take_mask_entries),
                         optimizer.register_load_state_dict_post_hook(self._set_loaded_masks)]

    @property
    def masks(self) -> dict[Tensor, Mask]:
        """The current masks, {parameter: Mask} (a copy of the dict)."""
        return dict(self._masks)

    def mask_of(self, p: Tensor) -> Mask | None:
        """The mask of parameter p now (None: unmasked), without copying the mapping."""
        return self._masks.get(p)

    # a copy (copy.deepcopy, pickle) builds its own plans, over its own tensors, and hooks its own
    # optimizer (torch's Optimizer copies no hooks)
    def __getstate__(self) -> dict:
        return {**self.__dict__, "_plans": None, "_remask_cache": {}, "_loading": None, "_handles": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._register()

    def _held(self) -> set[int]:
        return {id(p) for g in self.optimizer.param_groups for p in g["params"]}

    @torch.no_grad()
    def set_masks(self, masks: dict) -> None:
        """{param: Mask, bool or 0/1 tensor}: zero the pruned weights and their optimizer state
        now, and keep them at 0 after every step until clear_masks(). Parameters of 2 or more
        dims only (the masks a state dict carries: see optim/mask_state.py)."""
        checked = checked_masks(masks, self._params())
        zero_pruned(self.optimizer, checked, params=True)
        self._masks.update(checked)
        self._forget_plans()

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
    def restart_(self, where: dict) -> None:
        """Give the entries `where` marks ({param: bool tensor of its shape, True = restart}) the
        optimizer state a fresh optimizer of this class holds (0 for moments, Adagrad's initial
        accumulator, Rprop's step size): weights that start training again (re-dense, RigL's grown)."""
        for p, restart in where.items():
            state = self.optimizer.state.get(p)
            if not state:
                continue
            fresh = self._fresh_state(p)
            restart = restart.to(p.device)
            for key, value in state.items():
                if isinstance(value, Tensor) and value.shape == p.shape:
                    value = local_tensor(value)
                    value.copy_(torch.where(restart, fresh[key].to(value.dtype) if key in fresh
                                            else torch.zeros_like(value), value))

    @torch.no_grad()
    def clear_masks(self) -> None:
        """Drop every mask; pruned weights restart from exactly 0 with fresh optimizer state."""
        self.restart_({p: ~m.to_bool() for p, m in self._masks.items()})
        self._masks.clear()
        self._forget_plans()

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

    def _forget_plans(self) -> None:
        self._plans = None
        self._remask_cache = {}

    @torch.no_grad()
    def _mask_gradients(self, optimizer, args, kwargs) -> None:
        if self.one_pass_state is not None:  # one pass, after the step
            return
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
        if self.one_pass_state is not None:
            self._mask_parameters_and_state()
            return
        plans = self._planned()
        if plans is not None:
            for plan in plans:
                plan.impl.apply_masks_(plan.views, plan.words, static_key=plan)
            return
        ops.apply_masks_(list(self._masks), list(self._masks.values()))

    def _mask_parameters_and_state(self) -> None:
        """The one pass: the masked weights and their one_pass_state tensors, in one planned
        apply_masks_ call per device where it can."""
        if not self._masks:
            return
        plans = remask_plans(self._remask_cache, self.optimizer.state, self._masks, self.one_pass_state)
        if plans is not None:
            for plan in plans:
                plan.impl.apply_masks_(plan.views, plan.words, static_key=plan)
            return
        zero_pruned(self.optimizer, self._masks, params=True, keys=self.one_pass_state)

    # masks in the optimizer's state dict
    def _params(self) -> list[Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def _add_mask_entries(self, optimizer, state_dict: dict) -> dict:
        return add_mask_entries(state_dict, self._params(), self._masks,
                                self._carried | {id(p) for p in self._masks})

    def _take_mask_entries(self, optimizer, state_dict: dict) -> dict:
        state_dict, entries = take_mask_entries(state_dict, self._params())
        # a state dict with our entries: its masks replace ours once torch's load succeeds (a
        # load torch refuses changes nothing)
        self._loading = {p: m for p, m in entries.items() if m is not None} if entries else None
        return state_dict

    @torch.no_grad()
    def _set_loaded_masks(self, optimizer) -> None:
        loading, self._loading = self._loading, None
        if loading is None:
            return
        self._masks = loading
        self._forget_plans()
        zero_pruned(self.optimizer, loading, params=True)  # the loaded state may predate the masks

    # masks in a checkpoint of their own, by parameter index (DSDScheduler.state_dict keeps them
    # there for one process)
    def state_dict(self) -> dict:
        """The masks by parameter index in the optimizer, {index: Mask.state_dict()}."""
        index = {id(p): i for i, p in enumerate(self._params())}
        return {index[id(p)]: m.state_dict() for p, m in self._masks.items()}

    def load_state_dict(self, state: dict) -> None:
        """Masks by parameter index: {i: Mask.state_dict()} (state_dict()'s form) or {i: packed
        words} (DSDScheduler's, which names every parameter that may be pruned; every bit set:
        unmasked)."""
        params = self._params()
        loaded = {}
        for i, m in state.items():
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(params):
                raise ValueError(f"masks state has a mask for parameter {i!r}, but the optimizer "
                                 f"holds parameters 0..{len(params) - 1}")
            if isinstance(m, Tensor):
                mask = mask_from_entry(i, m, params)
                if mask is not None:
                    loaded[params[i]] = mask
                continue
            check_can_carry(params[i], f"masks state's mask {i}")
            loaded[params[i]] = as_mask(Mask.from_state_dict(m), local_tensor(params[i]), f"mask {i}")
        self._masks = loaded
        self._forget_plans()
