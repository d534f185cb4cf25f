"""Masks on an optimizer's own parameters: the part MaskedSGD and MaskedAdamW share (masks,
set_masks, clear_masks, prune with the pruning scope, masks in state_dict, pickling, and the
step plans of their groups)."""
from __future__ import annotations

import torch
from torch import Tensor

from .. import ops
from .._dtensor import local_tensor
from ..masks import Mask
from ..ops._common import sparsity_list
from ..ops._plan import NotPlannable
from .mask_state import add_mask_entries, check_can_carry, checked_masks, param_at, take_mask_entries
from .masking import remask_plans, same_state, zero_pruned


class NotReady(Exception):
    """A group has no plan yet (state created by the first step, a gradient missing)."""


class MaskedParams:
    """Mixin for a torch.optim.Optimizer subclass holding `self._masks` ({param: Mask}).

    set_masks zeroes the pruned weights and every state tensor of the parameter's shape
    (momentum, Adam's moments) there; the subclass's step keeps them at 0.
    """

    # torch.optim.Optimizer pickles (and deep-copies) only defaults, state and param groups
    def _torch_step(self, torch_cls, closure):
        """torch_cls's own step on this optimizer, without running the step hooks again: torch
        wraps each optimizer class's step in the hook runner once an instance of it exists, and
        this runs inside our own class's wrapper."""
        step = torch_cls.step
        if getattr(step, "hooked", False):
            step = step.__wrapped__
        return step(self, closure)

    @staticmethod
    def _lists_a_param_twice(group: dict) -> bool:
        """A parameter listed twice in a group (torch warns, then steps it once per listing, one
        after the other): the kernels take each tensor once, so such a group takes the per-tensor
        path, which steps as torch's does."""
        params = group["params"]
        return len({id(p) for p in params}) != len(params)

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "_masks": self._masks}

    def __setstate__(self, state: dict) -> None:
        state = dict(state)
        masks = state.pop("_masks", {})
        super().__setstate__(state)
        self._masks = masks
        self._forget_plans()

    # ------------------------------------------------------------ step plans
    # A group's plan (ops/_plan.py) holds what the kernels need for its parameters, state and
    # masks. It is dropped by everything that changes those (set_masks, clear_masks, prune,
    # load_state_dict, add_param_group, unpickling) and checked at every step for what can
    # change behind the optimizer's back (a parameter's or state tensor's storage, a state
    # tensor replaced, a derived mask changed, the backend choice, the group's flags).
    def _forget_plans(self) -> None:
        self.__dict__["_step_plans"] = {}

    def add_param_group(self, param_group: dict) -> None:
        """torch's add_param_group; the step plans are rebuilt for the new group."""
        super().add_param_group(param_group)
        self._forget_plans()

    def _group_plan(self, group: dict, key, build):
        """The group's plan if it still holds for `key` (the group flags it was built for), else
        build()'s; None where the group takes the general path (NotPlannable, kept until
        something drops the plans) or cannot have a plan yet (NotReady, asked again next step)."""
        plans = self.__dict__.setdefault("_step_plans", {})
        params = group["params"]
        entry = plans.get(id(params))
        if entry is not None and entry[0] is params and entry[1] == key and entry[2] == len(params):
            plan = entry[3]
            if plan is None or plan.current():
                return plan
        try:
            plan = build()
        except NotReady:
            return None
        except NotPlannable:
            plan = None
        plans[id(params)] = (params, key, len(params), plan)
        return plan

    def _state_holds(self, plan, keys: tuple[str, ...], extra: tuple = ()) -> bool:
        """Whether the optimizer's state still holds, under `keys`, the very tensors the plan
        steps (plan.state_tensors, then the `extra` lists); drops the plans where it does not (a
        state tensor or a parameter's state replaced: the plan would step the old one). The
        per-parameter state dicts are compared by identity in the state's own order, so no
        parameter is hashed."""
        state = self.state
        snapshot = plan.__dict__.get("state_snapshot")
        if snapshot is None:
            plan.state_snapshot = list(state.values())
            plan.state_dicts = [state.get(p, {}) for p in plan.tensors]
        elif not same_state(state, snapshot):
            self._forget_plans()
            return False
        for key, tensors in zip(keys, (*plan.state_tensors, *extra)):
            if not all(sd.get(key) is t for sd, t in zip(plan.state_dicts, tensors)):
                self._forget_plans()
                return False
        return True

    def _planned_gradients(self, plan) -> list | None:
        """The gradients of a plan's parameters for this step, laid out for its kernels, or
        None where the general path must step (a missing or sparse gradient, another layout)."""
        return plan.gradients([p.grad for p in plan.tensors])

    def _remask(self) -> None:
        """After a step that torch's own optimizer took: the pruned weights and their state
        tensors back to exactly 0, in one planned apply_masks_ call per device where it can."""
        plans = self._remask_plans()
        if plans is None:
            zero_pruned(self, self._masks, params=True)
        else:
            for plan in plans:
                plan.impl.apply_masks_(plan.views, plan.words, static_key=plan)

    def _remask_plans(self) -> list | None:
        """apply_masks_ plans (one per device) over the masked weights and every state tensor of
        their shape, for the steps torch's own optimizer takes; kept while the state holds the
        tensors they were made of (see _state_holds) and every tensor its storage, None where they
        need the general front end (decided once for that state) or under tracing."""
        return remask_plans(self.__dict__.setdefault("_step_plans", {}), self.state, self._masks)

    # ------------------------------------------------------------ masks
    @property
    def masks(self) -> dict[Tensor, Mask]:
        """{param: Mask} for the masked parameters (a copy of the mapping)."""
        return dict(self._masks)

    def mask_of(self, p: Tensor) -> Mask | None:
        """The mask of parameter p now (None: unmasked), without copying the mapping."""
        return self._masks.get(p)

    def _held(self) -> set[int]:
        return {id(p) for g in self.param_groups for p in g["params"]}

    def set_masks(self, masks: dict) -> None:
        """Set masks ({param: Mask, bool or 0/1 tensor, True/1 = kept}); zero the pruned weights
        and their optimizer state (every state tensor of the parameter's shape) now. Parameters
        of 2 or more dims only (the masks a state dict carries: see optim/mask_state.py)."""
        checked = checked_masks(masks, [p for g in self.param_groups for p in g["params"]])
        zero_pruned(self, checked, params=True)
        self._masks.update(checked)
        self._forget_plans()

    def clear_masks(self) -> None:
        """Drop every mask: all weights train again (pruned ones restart from exactly 0)."""
        self._masks.clear()
        self._forget_plans()

    def prunable_params(self) -> list[Tensor]:
        """Real floating parameters of 2 or more dims, in groups without prune=False."""
        return [p for g in self.param_groups if g.get("prune", True) for p in g["params"]
                if p.dim() >= 2 and p.is_floating_point()]

    def prune(self, sparsity, *, model=None, include=None, exclude=None, scope: str = "layer"
              ) -> dict[Tensor, Mask]:
        """Magnitude-prune every prunable parameter at `sparsity` (one float or one per param),
        exactly round(s * numel) weights each, in one batched call per device; returns the masks.

        With `model`, the weights are chosen as dsd_kernels.scope does (embeddings, norms and
        biases out by default; `include`/`exclude` by module type or name pattern; `sparsity`
        a float or {pattern: float}; scope="global": one threshold over all of them)."""
        if model is not None:
            from ..scope import masks_for, select
            new = masks_for(select(model, sparsity, include=include, exclude=exclude), scope=scope)
            self.set_masks(new)
            return new
        if include is not None or exclude is not None or scope != "layer":
            raise TypeError("prune: include, exclude and scope need model= (the module names)")
        from ..scope import warn_without_model
        warn_without_model(f"{type(self).__name__}.prune", stacklevel=2)
        params = self.prunable_params()
        sparsities = sparsity_list(sparsity, len(params), allow_one=False)  # the scope's rule: [0, 1)
        by_device: dict[torch.device, list[int]] = {}
        for i, p in enumerate(params):
            by_device.setdefault(p.device, []).append(i)
        new = {}
        for index in by_device.values():
            found = ops.magnitude_masks([params[i] for i in index], [sparsities[i] for i in index])
            new.update({params[i]: m for i, m in zip(index, found)})
        self.set_masks(new)
        return new

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """torch's state dict, every parameter of 2 or more dims with a per-parameter state entry
        "mask" (its packed keep-words, a DTensor for an FSDP2 parameter: see optim/mask_state.py),
        which torch.distributed.checkpoint saves and reshards with the other state."""
        params = [p for g in self.param_groups for p in g["params"]]
        return add_mask_entries(super().state_dict(), params, self._masks)

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's load_state_dict, with the masks in it (per-parameter "mask" entries, or the
        older "masks" key) checked before anything is loaded and set: a bad state changes nothing."""
        state_dict = dict(state_dict)
        masks = state_dict.pop("masks", {})  # the format before per-parameter "mask" entries
        # the masks are checked before anything is loaded: a bad file changes nothing
        params = [p for g in self.param_groups for p in g["params"]]
        loaded = {}
        for i, m in masks.items():
            check_can_carry(param_at(i, params), f"state_dict mask {i}")
            mask = Mask.from_state_dict(m)
            if mask.shape != local_tensor(params[i]).shape:
                raise ValueError(f"state_dict mask {i} has shape {tuple(mask.shape)} but parameter "
                                 f"{i} has shape {tuple(local_tensor(params[i]).shape)}")
            loaded[params[i]] = mask.to(params[i].device)
        state_dict, entries = take_mask_entries(state_dict, params)
        loaded.update({p: m for p, m in entries.items() if m is not None})
        super().load_state_dict(state_dict)
        self._masks = loaded
        self._forget_plans()
