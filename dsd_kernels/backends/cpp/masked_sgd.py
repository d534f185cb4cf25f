"""masked_sgd_ on the compiled kernels: csrc/cpu/masked_sgd.cpp on CPU tensors (torch's
single-tensor/foreach bits), csrc/cuda/masked_sgd.cu on CUDA tensors. The bits of torch's fused
CPU kernel (torch_fused=True) come from that kernel itself, followed by one compiled masking pass
over the weights and momentum buffers (csrc/cpu/apply_masks.cpp)."""
from __future__ import annotations

import weakref
from functools import cached_property

import torch

from ... import _C  # noqa: F401  (registers torch.ops.dsd_kernels_cpp)
from ..torch import masked_sgd as torch_masked_sgd
from ..torch.masked_sgd import sgd_groups, sgd_steps

_HALF = (torch.float16, torch.bfloat16)


class _FusedCalls:
    """What the CPU paths derive from a call's tensors alone: whether any is fp16/bf16, and for
    torch_fused sgd_steps' groups and the masking call's tensors and words."""

    def __init__(self, params, momentum_buffers, mask_words, first_step, momentum):
        self.half = any(p.dtype in _HALF for p in params)
        self._of = (params, momentum_buffers, mask_words, first_step, momentum)

    @cached_property
    def groups(self):
        params, _, _, first_step, momentum = self._of
        return sgd_groups(params, first_step, momentum)

    @cached_property
    def masking(self) -> tuple[list, list]:
        params, momentum_buffers, mask_words, _, momentum = self._of
        masked = [i for i, words in enumerate(mask_words) if words is not None]
        tensors = [params[i] for i in masked] + ([momentum_buffers[i] for i in masked] if momentum != 0 else [])
        return tensors, [mask_words[i] for i in masked] * (2 if momentum != 0 else 1)


# static_key -> (first_step, momentum != 0, _FusedCalls): a plan's steps reuse them (the
# static_key promise of backends/triton/_tiles.planned_tables: the same tensors every call)
_KEPT_CALLS = weakref.WeakKeyDictionary()


def _fused_calls(static_key, params, momentum_buffers, mask_words, first_step, momentum) -> _FusedCalls:
    if static_key is None:
        return _FusedCalls(params, momentum_buffers, mask_words, first_step, momentum)
    entry = _KEPT_CALLS.get(static_key)
    if entry is None or entry[0] is not first_step or entry[1] != (momentum != 0):
        entry = _KEPT_CALLS[static_key] = (first_step, momentum != 0, _FusedCalls(
            params, momentum_buffers, mask_words, first_step, momentum))
    return entry[2]


def masked_sgd_(params, grads, momentum_buffers, mask_words, first_step, *, lr, momentum,
                dampening, weight_decay, nesterov, maximize, torch_fused=False, static_key=None) -> None:
    """torch's single-tensor/foreach SGD arithmetic; with torch_fused=True on CPU, torch's fused
    kernel and then the pruned entries zeroed (exactly +0); on CUDA one arithmetic for both.
    fp16/bf16 on CPU take torch's own ops (the torch backend): torch rounds them op by op with
    scalars in the dtype or in float depending on whether an element falls in its vector loop or
    its scalar tail, which only its own kernels reproduce on every CPU."""
    on_cpu = bool(params) and not params[0].is_cuda
    calls = _fused_calls(static_key, params, momentum_buffers, mask_words, first_step, momentum) if on_cpu else None
    if on_cpu and calls.half:
        half = [i for i, p in enumerate(params) if p.dtype in _HALF]
        rest = [i for i, p in enumerate(params) if p.dtype not in _HALF]
        hyper = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                     nesterov=nesterov, maximize=maximize, torch_fused=torch_fused)
        for index, step in ((half, torch_masked_sgd.masked_sgd_), (rest, masked_sgd_)):
            if index:
                step([params[i] for i in index], [grads[i] for i in index],
                     [momentum_buffers[i] for i in index] if momentum != 0 else [],
                     [mask_words[i] for i in index], [first_step[i] for i in index] if momentum != 0 else [],
                     **hyper)
        return
    if torch_fused and on_cpu:
        with torch.no_grad():
            sgd_steps(params, grads, momentum_buffers, first_step, True, groups=calls.groups, lr=lr,
                      momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                      maximize=maximize)
        tensors, words = calls.masking
        if tensors:
            torch.ops.dsd_kernels_cpp.apply_masks_(tensors, words)
        return
    torch.ops.dsd_kernels_cpp.masked_sgd_(params, grads, momentum_buffers, mask_words,
                                          first_step, float(lr), float(momentum), float(dampening),
                                          float(weight_decay), bool(nesterov), bool(maximize))
