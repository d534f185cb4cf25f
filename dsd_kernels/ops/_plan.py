"""Kernel plans: what an op hands its kernels for one fixed set of tensors, computed once.

An optimizer steps the same parameters, state tensors and masks at every step; only the
gradients and the hyper-parameters change. `KernelPlan` does the front end's per-tensor work
once for such a set (argument checks, the kernel layout of every tensor, packed and permuted
mask words, the backend module for the device and dtypes) and then, per step, only asks
whether it still holds (`current`) and lays out the step's gradients (`gradients`), so a step
is one backend call with ready lists. It calls the backend module directly, not the custom
op: the custom op's dispatch and checks are the per-call host cost the plan exists to avoid,
and the plan has made those checks already. Where tracing (torch.compile) or anything the plan
does not cover is involved, the callers take the general front end (dsd_kernels.ops), which
raises the same errors as ever.

What a plan covers: real floating tensors on one device, each contiguous or a dense tensor in
another memory order (channels_last: its storage-order view), every state tensor laid out like
its parameter. Anything else (complex, DTensor, sparse, gapped strides, several devices) is
NotPlannable, and the caller keeps the general path.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _backend
from .._dtensor import is_dtensor
from ..masks import as_mask, permuted_mask
from ._common import dtypes_of, storage_order


class NotPlannable(Exception):
    """These tensors need the general front end (see the module docstring)."""


def _kernel_view(t: Tensor) -> tuple[Tensor, tuple[int, ...] | None]:
    """(t as the kernels take it, sharing its storage; the permutation applied, or None)."""
    if is_dtensor(t) or t.layout != torch.strided or not t.is_floating_point():
        raise NotPlannable
    t = t.detach()
    if t.is_contiguous():
        return t, None
    dims = storage_order(t)
    if dims is None:
        raise NotPlannable
    return t.permute(dims), dims


class PlanKey:
    """A key the backends may keep launch tables under (see backends/triton/_tiles.planned_tables)."""


class KernelPlan(PlanKey):
    """One op's kernel-ready lists over tensors on one device.

    tensors: the tensors stepped in place (an optimizer's parameters); masks: one Mask (or
    None) per tensor; state: lists of companion tensors, one per tensor each (momentum
    buffers, AdamW's moments), laid out like their tensor; op, variant: the registry's op and
    variant. Attributes: `views`, `state_views` (per state list), `words` (packed int32 mask
    words or None, in the views' order), `impl` (the backend module).
    """

    def __init__(self, op: str, tensors: list[Tensor], masks: list, state: tuple = (),
                 variant: str = "default"):
        if not tensors:
            raise NotPlannable
        device = tensors[0].device
        self.tensors = list(tensors)
        self.views, self.dims, self.words, self._derived = [], [], [], []
        for i, (t, m) in enumerate(zip(self.tensors, masks)):
            if t.device != device:
                raise NotPlannable
            view, dims = _kernel_view(t)
            self.views.append(view)
            self.dims.append(dims)
            if m is None:
                self.words.append(None)
                continue
            mask = as_mask(m, t, f"masks[{i}]")
            if dims is not None:  # derived words: the plan must see the mask change
                self._derived.append((mask.packed, mask.packed._version))
                mask = permuted_mask(mask, dims)
            self.words.append(mask.packed)
        self.permuted = [i for i, d in enumerate(self.dims) if d is not None]
        self.state_tensors = [list(kind) for kind in state]
        self.state_views = []
        for kind in self.state_tensors:
            views = []
            for t, s, dims in zip(self.tensors, kind, self.dims):
                if (not isinstance(s, Tensor) or is_dtensor(s) or s.layout != torch.strided
                        or s.shape != t.shape or s.dtype != t.dtype or s.device != t.device
                        or s.stride() != t.stride() or s.data_ptr() == t.data_ptr()):
                    raise NotPlannable
                views.append(s.detach() if dims is None else s.detach().permute(dims))
            self.state_views.append(views)
        self.gradient_key = PlanKey()  # the same tensors' gradients (their own launch tables)
        self.backend = _backend.get_backend()
        self.impl = _backend.implementation(op, device, dtypes_of(self.views), variant)
        self._pointers = self._current_pointers()

    def _current_pointers(self) -> list[int]:
        # map over the unbound method: the per-step check runs once per tensor, kept lean
        pointers = list(map(Tensor.data_ptr, self.tensors))
        for kind in self.state_tensors:
            pointers += map(Tensor.data_ptr, kind)
        return pointers

    def current(self) -> bool:
        """Whether every tensor still has the storage the plan was built on, every derived mask
        the version it was derived from, and the backend choice is the one resolved: a few
        comparisons per tensor, no more."""
        return (_backend.get_backend() == self.backend
                and all(w._version == v for w, v in self._derived)
                and self._current_pointers() == self._pointers)

    def gradients(self, grads: list) -> list[Tensor] | None:
        """This step's gradients in the plan's memory order, or None where one does not fit
        (missing, sparse, or in another memory order than its tensor): the caller then takes
        the general front end, which handles (and checks) any gradient."""
        if self.permuted:
            grads = list(grads)
            for i in self.permuted:
                if grads[i] is None:
                    return None
                grads[i] = grads[i].permute(self.dims[i])
        for g in grads:
            if g is None or g.layout != torch.strided or not g.is_contiguous():
                return None
        return grads


def apply_masks_plans(tensors: list[Tensor], masks: list) -> list[KernelPlan] | None:
    """One apply_masks plan per device of `tensors` (masks: one per tensor), or None where they
    need the general front end (NotPlannable)."""
    by_device: dict = {}
    for t, m in zip(tensors, masks):
        on_device = by_device.setdefault(t.device, ([], []))
        on_device[0].append(t)
        on_device[1].append(m)
    try:
        return [KernelPlan("apply_masks", ts, ms) for ts, ms in by_device.values()]
    except NotPlannable:
        return None
