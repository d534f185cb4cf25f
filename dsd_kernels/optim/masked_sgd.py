"""MaskedSGD: a drop-in torch.optim.SGD whose step is one fused masked multi-tensor update.

Split like torch/optim/sgd.py: `masked_sgd` is the functional form (keyword-only
hyper-parameters) with a fused implementation (`dsd_kernels.ops.masked_sgd_`, backend
chosen there) and the per-tensor reference (`dsd_kernels.reference.masked_sgd_`)
behind the same signature; `MaskedSGD` holds state and masks and calls it.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import ops, reference
from ..masks import Mask, as_mask
from ..ops._common import as_tensor_list
from ..ops.masked_sgd import check_sgd_hyperparameters
from ..ops._plan import KernelPlan
from ._masked_params import MaskedParams, NotReady


def masked_sgd(params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor | None],
               masks: list[Mask | Tensor | None], *, lr: float, momentum: float = 0.0,
               dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False,
               maximize: bool = False, implementation: str = "fused", torch_fused: bool = False) -> None:
    """Functional masked SGD. implementation: "fused" (the op) or "reference" (per tensor);
    torch_fused: match the bits of torch's fused SGD kernel instead of its foreach ops."""
    if implementation == "fused":
        ops.masked_sgd_(params, grads, momentum_buffers, masks, lr=lr, momentum=momentum,
                        dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                        maximize=maximize, torch_fused=torch_fused)
    elif implementation == "reference":
        _reference_masked_sgd_(params, grads, momentum_buffers, masks, lr=lr, momentum=momentum,
                               dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                               maximize=maximize)
    else:
        raise ValueError(f"implementation must be 'fused' or 'reference', got {implementation!r}")


def _reference_masked_sgd_(params, grads, momentum_buffers, masks, *, lr, momentum=0.0,
                           dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False) -> None:
    """masked_sgd_ by the per-tensor reference (reference/masked_sgd.py: torch.optim.SGD's
    `_single_tensor_sgd` arithmetic on masked gradients), same arguments; slow, obviously right."""
    params = as_tensor_list(params, "params")
    grads = as_tensor_list(grads, "grads")
    masks = [None] * len(params) if masks is None else list(masks)
    check_sgd_hyperparameters(lr, momentum, dampening, weight_decay, nesterov)
    keeps = [None if m is None else as_mask(m, p, f"masks[{i}]").to_bool()
             for i, (m, p) in enumerate(zip(masks, params))]
    grads = [g.coalesce().to_dense() if g.is_sparse else g for g in grads]
    # in place on the parameters: traced by autograd when grad mode is on (differentiable SGD)
    reference.masked_sgd_(params, grads, momentum_buffers, keeps, lr=lr, momentum=momentum,
                          dampening=dampening, weight_decay=weight_decay, nesterov=nesterov, maximize=maximize)


class MaskedSGD(MaskedParams, torch.optim.SGD):
    """torch.optim.SGD with per-parameter binary masks (same constructor, defaults and errors).

    Masked parameters train only their kept weights; pruned weights and their momentum stay
    exactly 0 (momentum cannot revive them). Without masks it steps exactly like SGD.

        opt = MaskedSGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        opt.prune(0.5)                 # magnitude masks for every param of >= 2 dims
        ...train...
        opt.clear_masks()              # re-dense: pruned weights restart from 0

    A param group with ``prune=False`` is never pruned by `prune()` (the key is optional: param
    groups otherwise carry exactly SGD's keys, so SGD's state_dict loads here and ours there).

    foreach / fused: accepted with SGD's defaults, checks and errors; whatever the flags, the step
    (float lr) is one fused masked update per device (one launch per dtype on a GPU), and on CPU its fp32/fp64
    bits are those of torch.optim.SGD with the same flags (torch's three implementations agree
    there). With fused=True a GradScaler's scale and found-inf flag are honoured as SGD's fused
    step does (gradients unscaled in place; the step skipped on inf). differentiable=True steps
    with the per-tensor reference under autograd, as SGD's differentiable mode does. A tensor lr
    takes SGD's own step and then one re-masking pass: the lr stays on its device (with
    fused=True on a GPU no host sync, so a CUDA graph captures the step).
    """

    def __init__(self, params, lr: float | Tensor = 1e-3, momentum: float = 0, dampening: float = 0,
                 weight_decay: float | Tensor = 0, nesterov: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, differentiable: bool = False, fused: bool | None = None):
        super().__init__(params, lr=lr, momentum=momentum, dampening=dampening,
                         weight_decay=weight_decay, nesterov=nesterov, maximize=maximize,
                         foreach=foreach, differentiable=differentiable, fused=fused)
        self._masks: dict[Tensor, Mask] = {}

    # ------------------------------------------------------------ step
    def step(self, closure=None):
        if any(self._lists_a_param_twice(g) or self._takes_sgd_step(g) for g in self.param_groups):
            # SGD's own step on the raw gradients (a parameter listed twice: torch steps it once per
            # listing, its foreach ops applied list-wise), then the pruned entries zeroed
            # (elementwise, the kept ones are those of SGD on the masked gradients)
            loss = self._torch_step(torch.optim.SGD, closure)
            if self._masks:
                self._remask()
            return loss
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # as SGD: the update is traced by autograd only in differentiable mode
        with torch.set_grad_enabled(self.defaults["differentiable"]):
            for group in self.param_groups:
                self._step_group(group)
        return loss

    @staticmethod
    def _takes_sgd_step(group: dict) -> bool:
        """A group with a tensor lr (outside differentiable mode) takes SGD's own step: the op
        would read the lr on the host at every step (on a GPU a sync, which CUDA-graph capture
        forbids), where SGD(fused=True) reads it on the device."""
        return isinstance(group["lr"], Tensor) and not group["differentiable"]

    def _step_group(self, group: dict) -> None:
        if self._planned_step(group):
            return
        params, grads, bufs = [], [], []
        self._init_group(group, params, grads, bufs)  # SGD's own: its fused device/dtype checks
        if not params:
            return
        if group["momentum"] == 0:
            bufs = [None] * len(params)
        if group["fused"]:  # a GradScaler hands fused optimizers the scale, as SGD's fused step
            found_inf = getattr(self, "found_inf", None)
            if found_inf is not None and bool(found_inf.item()):
                return
            grad_scale = getattr(self, "grad_scale", None)
            if grad_scale is not None:
                torch._foreach_div_(grads, grad_scale.to(grads[0].device))
        masked_sgd(params, grads, bufs, [self._masks.get(p) for p in params], lr=group["lr"],
                   momentum=group["momentum"], dampening=group["dampening"],
                   weight_decay=group["weight_decay"], nesterov=group["nesterov"],
                   maximize=group["maximize"], torch_fused=bool(group["fused"]),
                   implementation="reference" if group["differentiable"] else "fused")
        if group["momentum"] != 0:
            for p, buf in zip(params, bufs):
                self.state[p]["momentum_buffer"] = buf

    def _planned_step(self, group: dict) -> bool:
        """The steady-state step: one backend call with the group's plan (ops/_plan.py) and
        this step's gradients; False where the general path must step (the first step, which
        creates the momentum buffers; differentiable mode; tracing; a fused step under a
        GradScaler; a missing or sparse gradient; anything the plan does not cover)."""
        if (group["differentiable"] or torch.compiler.is_compiling()
                or (group["fused"] and (getattr(self, "grad_scale", None) is not None
                                        or getattr(self, "found_inf", None) is not None))):
            return False
        momentum = group["momentum"] != 0
        plan = self._group_plan(group, (bool(group["fused"]), momentum), lambda: self._build_plan(group, momentum))
        if plan is None:
            return False
        grads = self._planned_gradients(plan)
        if grads is None:
            return False
        bufs = plan.state_views[0] if momentum else []
        if momentum and not self._state_holds(plan, ("momentum_buffer",)):
            return False
        lr, weight_decay = group["lr"], group["weight_decay"]
        check_sgd_hyperparameters(lr, group["momentum"], group["dampening"], weight_decay, group["nesterov"])
        plan.impl.masked_sgd_(plan.views, grads, bufs, plan.words, plan.no_first_step if momentum else [],
                              lr=float(lr), momentum=float(group["momentum"]),
                              dampening=float(group["dampening"]), weight_decay=float(weight_decay),
                              nesterov=bool(group["nesterov"]), maximize=bool(group["maximize"]),
                              torch_fused=bool(group["fused"]), static_key=plan)
        return True

    def _build_plan(self, group: dict, momentum: bool) -> KernelPlan:
        params = group["params"]
        state = []
        if momentum:
            state = [[self.state.get(p, {}).get("momentum_buffer") for p in params]]
            if any(b is None for b in state[0]):
                raise NotReady  # the first step creates them, as SGD's does
        plan = KernelPlan("masked_sgd", params, [self._masks.get(p) for p in params], tuple(state),
                          variant="fused" if group["fused"] else "foreach")
        plan.no_first_step = [False] * len(params)
        return plan
