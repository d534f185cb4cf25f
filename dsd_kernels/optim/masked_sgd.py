"""MaskedSGD: a drop-in torch.optim.SGD whose step is one fused masked multi-tensor update.

Split like torch/optim/sgd.py: `masked_sgd` is the functional form (keyword-only
hyper-parameters) with a fused implementation (`dsd_kernels.ops.masked_sgd_`, backend
chosen there) and the per-tensor reference (`dsd_kernels.reference.masked_sgd_`)
behind the same signature; `MaskedSGD` holds state and masks and calls it.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import ops
from ..masks import Mask, as_mask


def _local(t: Tensor) -> Tensor:
    """The local shard of a DTensor parameter (FSDP2), else the tensor itself."""
    if not torch.distributed.is_available():
        return t
    from ..distributed import local_tensor
    return local_tensor(t)


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
        ops.masked_sgd_reference_(params, grads, momentum_buffers, masks, lr=lr, momentum=momentum,
                                  dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                                  maximize=maximize)
    else:
        raise ValueError(f"implementation must be 'fused' or 'reference', got {implementation!r}")


class MaskedSGD(torch.optim.SGD):
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
    is one fused masked update per device (one launch per dtype on a GPU), and on CPU its fp32/fp64
    bits are those of torch.optim.SGD with the same flags (torch's three implementations agree
    there). With fused=True a GradScaler's scale and found-inf flag are honoured as SGD's fused
    step does (gradients unscaled in place; the step skipped on inf). differentiable=True steps
    with the per-tensor reference under autograd, as SGD's differentiable mode does.
    """

    def __init__(self, params, lr: float | Tensor = 1e-3, momentum: float = 0, dampening: float = 0,
                 weight_decay: float | Tensor = 0, nesterov: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, differentiable: bool = False, fused: bool | None = None):
        super().__init__(params, lr=lr, momentum=momentum, dampening=dampening,
                         weight_decay=weight_decay, nesterov=nesterov, maximize=maximize,
                         foreach=foreach, differentiable=differentiable, fused=fused)
        self._masks: dict[Tensor, Mask] = {}

    # torch.optim.Optimizer pickles (and deep-copies) only defaults, state and param groups
    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "_masks": self._masks}

    def __setstate__(self, state: dict) -> None:
        state = dict(state)
        masks = state.pop("_masks", {})
        super().__setstate__(state)
        self._masks = masks

    # ------------------------------------------------------------ masks
    @property
    def masks(self) -> dict[Tensor, Mask]:
        """{param: Mask} for the masked parameters (a copy of the mapping)."""
        return dict(self._masks)

    def _held(self) -> set[int]:
        return {id(p) for g in self.param_groups for p in g["params"]}

    def set_masks(self, masks: dict) -> None:
        """Set masks ({param: Mask or bool tensor, True = kept}); zero pruned weights and momentum now."""
        held = self._held()
        checked = {}
        for p, m in masks.items():
            if not isinstance(p, Tensor) or id(p) not in held:
                raise ValueError("set_masks got a mask for a tensor this optimizer does not hold")
            checked[p] = as_mask(m, _local(p))  # a sharded param's mask covers its local shard
        with torch.no_grad():
            for p, m in checked.items():
                m.apply_(_local(p))
                buf = self.state.get(p, {}).get("momentum_buffer")
                if buf is not None:
                    m.apply_(_local(buf))
                self._masks[p] = m

    def clear_masks(self) -> None:
        """Drop every mask: all weights train again (pruned ones restart from exactly 0)."""
        self._masks.clear()

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
        params = self.prunable_params()
        sparsities = ops.sparsity_list(sparsity, len(params))
        by_device: dict[torch.device, list[int]] = {}
        for i, p in enumerate(params):
            by_device.setdefault(p.device, []).append(i)
        new = {}
        for index in by_device.values():
            found = ops.magnitude_masks([params[i] for i in index], [sparsities[i] for i in index])
            new.update({params[i]: m for i, m in zip(index, found)})
        self.set_masks(new)
        return new

    # ------------------------------------------------------------ step
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # as SGD: the update is traced by autograd only in differentiable mode
        with torch.set_grad_enabled(self.defaults["differentiable"]):
            for group in self.param_groups:
                self._step_group(group)
        return loss

    def _step_group(self, group: dict) -> None:
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

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """SGD's state dict plus "masks": {param index: {"packed", "shape"}} (plain tensors/ints)."""
        state = super().state_dict()
        index = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        state["masks"] = {index[id(p)]: m.state_dict() for p, m in self._masks.items()}
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        masks = state_dict.pop("masks", {})
        # the masks are checked before anything is loaded: a bad file changes nothing
        params = [p for g in self.param_groups for p in g["params"]]
        loaded = {}
        for i, m in masks.items():
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(params):
                raise ValueError(f"state_dict has a mask for parameter {i!r}, but this optimizer "
                                 f"holds parameters 0..{len(params) - 1}")
            mask = Mask.from_state_dict(m)
            if mask.shape != _local(params[i]).shape:
                raise ValueError(f"state_dict mask {i} has shape {tuple(mask.shape)} but parameter "
                                 f"{i} has shape {tuple(_local(params[i]).shape)}")
            loaded[params[i]] = mask.to(params[i].device)
        super().load_state_dict(state_dict)
        self._masks = loaded
