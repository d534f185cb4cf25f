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
               maximize: bool = False, implementation: str = "fused") -> None:
    """Functional masked SGD. implementation: "fused" (the op) or "reference" (per tensor)."""
    if implementation == "fused":
        ops.masked_sgd_(params, grads, momentum_buffers, masks, lr=lr, momentum=momentum,
                        dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                        maximize=maximize)
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

    A param group with ``prune=False`` is never pruned by `prune()`.
    """

    def __init__(self, params, lr: float | Tensor = 1e-3, momentum: float = 0, dampening: float = 0,
                 weight_decay: float = 0, nesterov: bool = False, *, maximize: bool = False):
        super().__init__(params, lr=lr, momentum=momentum, dampening=dampening,
                         weight_decay=weight_decay, nesterov=nesterov, maximize=maximize,
                         foreach=False, differentiable=False, fused=False)
        self.defaults["prune"] = True
        for group in self.param_groups:
            group.setdefault("prune", True)
        self._masks: dict[Tensor, Mask] = {}

    def add_param_group(self, param_group: dict) -> None:
        param_group.setdefault("prune", True)
        super().add_param_group(param_group)

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
        """Parameters of 2 or more dims in groups with prune=True."""
        return [p for g in self.param_groups if g["prune"] for p in g["params"] if p.dim() >= 2]

    def prune(self, sparsity) -> dict[Tensor, Mask]:
        """Magnitude-prune every prunable parameter at `sparsity` (one float or one per param),
        exactly round(s * numel) weights each, in one batched call per device; returns the masks."""
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
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, bufs, masks = [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("MaskedSGD does not support sparse gradients")
                params.append(p)
                grads.append(p.grad)
                bufs.append(self.state[p].get("momentum_buffer") if group["momentum"] != 0 else None)
                masks.append(self._masks.get(p))
            if not params:
                continue
            by_device: dict[torch.device, list[int]] = {}
            for i, p in enumerate(params):
                by_device.setdefault(p.device, []).append(i)
            for index in by_device.values():
                sub_bufs = [bufs[i] for i in index]
                masked_sgd([params[i] for i in index], [grads[i] for i in index], sub_bufs,
                           [masks[i] for i in index], lr=group["lr"], momentum=group["momentum"],
                           dampening=group["dampening"], weight_decay=group["weight_decay"],
                           nesterov=group["nesterov"], maximize=group["maximize"])
                if group["momentum"] != 0:
                    for i, buf in zip(index, sub_bufs):
                        self.state[params[i]]["momentum_buffer"] = buf
        return loss

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
        for group in self.param_groups:
            group.setdefault("prune", True)
        self._masks = loaded
