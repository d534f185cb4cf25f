"""MaskedAdamW: torch.optim.AdamW whose pruned weights and moments stay exactly 0.

Split like torch/optim/adamw.py: `masked_adamw` is the functional form (keyword-only
hyper-parameters) with the fused implementation (`dsd_kernels.ops.masked_adamw_`: on CPU one
C++ pass over memory, torch's single-tensor/foreach AdamW bits) and the per-tensor reference
behind one signature; `MaskedAdamW` holds state and masks and calls it.

Which step runs: groups with a float lr and betas, not capturable and not differentiable take
`ops.masked_adamw_` (the kept weights carry AdamW's bits exactly, those of its fused kernel with
fused=True; the pruned weights and moments are written as +0 in the same pass). Every other
configuration (tensor lr, capturable, differentiable, fused=True on CUDA or under a GradScaler)
runs torch.optim.AdamW's own step followed by one fused re-masking pass (`ops.apply_masks_`) over
the masked weights and their moments: AdamW is elementwise, so the kept entries are what AdamW computes on `grad * mask`.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import ops, reference
from ..masks import Mask, as_mask
from ..ops._common import as_tensor_list
from ..ops._plan import KernelPlan, NotPlannable
from ..ops.masked_adamw import check_adamw_hyperparameters
from ._masked_params import MaskedParams, NotReady
from .masking import state_tensors


def masked_adamw(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                 max_exp_avg_sqs: list[Tensor], state_steps: list[Tensor], masks: list[Mask | Tensor | None], *,
                 lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, amsgrad: bool,
                 maximize: bool, implementation: str = "fused", torch_fused: bool = False) -> None:
    """Functional masked AdamW (state_steps incremented here, as torch's functional does).
    implementation: "fused" (the op) or "reference" (per tensor); torch_fused: the bits of torch's
    fused AdamW kernel instead of its single-tensor/foreach ops."""
    hyper = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                 maximize=maximize)
    if implementation == "fused":
        ops.masked_adamw_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, masks,
                          torch_fused=torch_fused, **hyper)
    elif implementation == "reference":
        _reference_masked_adamw_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, masks,
                                 **hyper)
    else:
        raise ValueError(f"implementation must be 'fused' or 'reference', got {implementation!r}")


def _reference_masked_adamw_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, masks, *,
                             lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2, amsgrad=False,
                             maximize=False) -> None:
    """masked_adamw_ by the per-tensor reference (reference/masked_adamw.py); slow, obviously right."""
    params = as_tensor_list(params, "params")
    keeps = [None if m is None else as_mask(m, p, f"masks[{i}]").to_bool().to(p.device)
             for i, (m, p) in enumerate(zip(masks if masks is not None else [None] * len(params), params))]
    reference.masked_adamw_(params, list(grads), list(exp_avgs), list(exp_avg_sqs),
                            list(max_exp_avg_sqs) if max_exp_avg_sqs is not None else [], list(state_steps), keeps,
                            lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                            maximize=maximize)


def _graph_capture_health_check(optimizer: torch.optim.Optimizer) -> None:
    """torch's check that an optimizer being captured in a CUDA graph is capturable (by its newer
    name where torch has it: the older one then warns of deprecation)."""
    check = getattr(optimizer, "_accelerator_graph_capture_health_check", None)
    (check or optimizer._cuda_graph_capture_health_check)()


class MaskedAdamW(MaskedParams, torch.optim.AdamW):
    """torch.optim.AdamW (same constructor, defaults, errors, param groups, hooks, schedulers,
    GradScaler, state_dict) with per-parameter binary masks: set_masks, clear_masks, masks,
    prune(sparsity, model=..., include=..., exclude=..., scope=...)."""

    def __init__(self, params, lr: float | Tensor = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, capturable: bool = False, differentiable: bool = False,
                 fused: bool | None = None):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad, maximize=maximize, foreach=foreach, capturable=capturable,
                         differentiable=differentiable, fused=fused)
        self._masks: dict[Tensor, Mask] = {}

    def _op_arithmetic(self, group: dict) -> str | None:
        """Which arithmetic of the op reproduces the step torch would take for this group:
        "foreach" (torch's single-tensor/foreach bits), "fused" (its fused kernel's, CPU only), or
        None: not for capturable, differentiable or tensor hyper-parameters or a parameter listed
        twice, nor for
        foreach=False on CUDA (torch's single-tensor CUDA kernels round otherwise than its foreach
        ones, which the op follows there; on CPU the two give the same bits, except in fp16:
        single-tensor fp16 on CPU, the default there, is None too), nor for fused=True
        on CUDA or under a GradScaler (which hands the fused step its scale and inf flag)."""
        beta1, beta2 = group["betas"]
        if (group["capturable"] or group["differentiable"] or self._lists_a_param_twice(group)
                or any(isinstance(v, Tensor) for v in (group["lr"], beta1, beta2, group["weight_decay"]))):
            return None
        on_cuda = any(p.is_cuda for p in group["params"])
        if group["fused"]:
            scaled = getattr(self, "grad_scale", None) is not None or getattr(self, "found_inf", None) is not None
            return None if on_cuda or scaled else "fused"
        if group["foreach"] is not True and not on_cuda and any(p.dtype == torch.float16 for p in group["params"]):
            return None  # torch's single-tensor CPU step rounds fp16 otherwise than its foreach one
        return None if group["foreach"] is False and on_cuda else "foreach"

    def _flags(self, group: dict) -> tuple:
        """What _op_arithmetic reads of a group besides its parameters' devices and dtypes."""
        beta1, beta2 = group["betas"]
        return (group["capturable"], group["differentiable"], group["fused"], group["foreach"], group["amsgrad"],
                any(isinstance(v, Tensor) for v in (group["lr"], beta1, beta2, group["weight_decay"])),
                getattr(self, "grad_scale", None) is not None or getattr(self, "found_inf", None) is not None)

    def _plan_for(self, group: dict):
        """The group's step plan (None: the general path), its arithmetic cached with it."""
        if torch.compiler.is_compiling():
            return None
        return self._group_plan(group, self._flags(group), lambda: self._build_plan(group))

    def _build_plan(self, group: dict) -> KernelPlan:
        how = self._op_arithmetic(group)
        if how is None:
            raise NotPlannable  # AdamW's own step; a change of flags asks again
        params = group["params"]
        keys = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if group["amsgrad"] else ())
        states = [self.state.get(p, {}) for p in params]
        if not all(all(k in st for k in keys + ("step",)) for st in states):
            raise NotReady  # the first step creates the state, as AdamW's does
        plan = KernelPlan("masked_adamw", params, [self._masks.get(p) for p in params],
                          tuple([st[k] for st in states] for k in keys), variant=how)
        plan.arithmetic, plan.state_keys = how, keys
        plan.steps = [st["step"] for st in states]
        return plan

    def step(self, closure=None):
        plans = [self._plan_for(g) for g in self.param_groups]
        arithmetic = [self._op_arithmetic(g) if plan is None else plan.arithmetic
                      for g, plan in zip(self.param_groups, plans)]
        if None in arithmetic:
            return self._torch_step_then_mask(closure)
        # the op's step sizes come from step counts read on the host: a CUDA graph would replay
        # the first ones forever, so capture asks for capturable=True, as AdamW's own step does
        _graph_capture_health_check(self)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            for group, how, plan in zip(self.param_groups, arithmetic, plans):
                if plan is not None and self._planned_step(group, plan):
                    continue
                params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = [], [], [], [], [], []
                self._init_group(group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps)
                if not params:
                    continue
                beta1, beta2 = group["betas"]
                masked_adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
                             [self._masks.get(p) for p in params], lr=group["lr"], beta1=beta1, beta2=beta2,
                             eps=group["eps"], weight_decay=group["weight_decay"], amsgrad=group["amsgrad"],
                             maximize=group["maximize"], torch_fused=how == "fused")
        return loss

    def _planned_step(self, group: dict, plan: KernelPlan) -> bool:
        """The steady-state step: one backend call with the plan's lists and this step's
        gradients; False where the general path must step (a missing or sparse gradient, a
        state tensor replaced, anything the plan does not cover)."""
        grads = self._planned_gradients(plan)
        if grads is None or not self._state_holds(plan, plan.state_keys + ("step",), (plan.steps,)):
            return False
        beta1, beta2 = group["betas"]
        lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
        check_adamw_hyperparameters(lr, beta1, beta2, eps, weight_decay)
        views = plan.state_views
        plan.impl.masked_adamw_(plan.views, grads, views[0], views[1], views[2] if group["amsgrad"] else [],
                                plan.steps, plan.words, lr=float(lr), beta1=float(beta1), beta2=float(beta2),
                                eps=float(eps), weight_decay=float(weight_decay), amsgrad=bool(group["amsgrad"]),
                                maximize=bool(group["maximize"]), torch_fused=plan.arithmetic == "fused",
                                static_key=plan)
        return True

    def _torch_step_then_mask(self, closure):
        loss = self._torch_step(torch.optim.AdamW, closure)
        if self._masks:
            if self.defaults["differentiable"]:  # keep the re-masking on the autograd graph
                for p, m in self._masks.items():
                    keep = m.to_bool().to(p.device)
                    p.masked_fill_(~keep, 0)
                    for v in state_tensors(self, p):
                        # the moments too (a leaf that requires grad cannot change in place:
                        # such a state tensor is masked outside the graph)
                        with torch.set_grad_enabled(not (v.is_leaf and v.requires_grad)):
                            v.masked_fill_(~keep, 0)
            else:
                self._remask()
        return loss
