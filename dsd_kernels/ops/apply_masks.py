"""Zero the pruned entries of many tensors in place: `apply_masks_` (custom op
`dsd_kernels::apply_masks_`), the re-masking around any optimizer's step."""
# No `from __future__ import annotations` here: torch.library.custom_op reads the prototypes'
# annotations to build the schemas, and torch 2.4 accepts only evaluated typing forms.
from typing import List

import torch
from torch import Tensor

from .. import _backend
from .._floatbits import KEY_SPECS
from .._dtensor import local_tensor
from ..masks import Mask, as_mask, packed_shape
from ._common import any_dtensor, as_tensor_list, check_kernel_tensors, check_writable, dtypes_of, kernel_layout

__all__ = ["apply_masks_"]


def _check_apply_masks_args(tensors: list[Tensor], mask_words: list[Tensor], *, real: bool) -> None:
    """The checks of the apply_masks_ op's real and fake implementations."""
    torch._check_value(len(tensors) == len(mask_words),
                       lambda: f"apply_masks_: {len(tensors)} tensors but {len(mask_words)} masks")
    for i, (t, w) in enumerate(zip(tensors, mask_words)):
        if not (w.dtype == torch.int32 and tuple(w.shape) == packed_shape(t.shape)
                and w.device == t.device and t.dtype in KEY_SPECS):  # plain test first: see _check_sgd_args
            torch._check_value(False, lambda: f"mask_words[{i}] does not fit tensors[{i}] "
                                              f"({tuple(t.shape)}, {t.dtype})")
    check_kernel_tensors("apply_masks_", (("tensors", tensors), ("mask_words", mask_words)), ("tensors",), real=real)


@torch.library.custom_op("dsd_kernels::apply_masks_", mutates_args=("tensors",))
def _apply_masks_op(tensors: List[Tensor], mask_words: List[Tensor]) -> None:
    _check_apply_masks_args(tensors, mask_words, real=True)
    if tensors:
        impl = _backend.implementation("apply_masks", tensors[0].device, dtypes_of(tensors))
        impl.apply_masks_(tensors, mask_words)


@_apply_masks_op.register_fake
def _(tensors, mask_words):
    _check_apply_masks_args(tensors, mask_words, real=False)
    return None


def _ready_lists(tensors: list[Tensor], masks: list):
    """(kernel views, mask words) of the common call, or None: every masked tensor a contiguous
    tensor of a float dtype the kernels take (fp16, bf16, fp32, fp64) with storage of its own (so
    no two overlap) on one device, its mask a Mask of its shape, nothing traced. These need none of the general front end's per-tensor layout work
    and checks, and go to the backend module directly (as the optimizers' plans do: the custom
    op's dispatch is most of the host cost of a call over many small tensors)."""
    if not tensors or torch.compiler.is_compiling():
        return None
    device = tensors[0].device
    if device.type == "meta":
        return None
    views, words, storages = [], [], set()
    for t, m in zip(tensors, masks):
        if m is None:
            continue
        if type(t) not in (Tensor, torch.nn.Parameter):  # no subclass (DTensor, traced tensors)
            return None
        if (not isinstance(m, Mask) or t.device != device or t.layout != torch.strided or not t.is_contiguous()
                or t.dtype not in KEY_SPECS or m.packed.device != device or tuple(m.shape) != tuple(t.shape)):
            return None
        storages.add(t.untyped_storage().data_ptr())
        views.append(t.detach())
        words.append(m.packed)
    if len(storages) != len(views):  # two tensors of one storage: the general path checks overlap
        return None
    return views, words


def apply_masks_(tensors, masks) -> None:
    """Zero the pruned entries of every tensor in place (exactly +0, NaN and inf included): one
    fused pass per device and dtype over all of them. tensors: tensors or an iterable of them
    (any layout: channels_last in memory order, complex through the real view); masks: one
    per tensor, a Mask, a bool or 0/1 float tensor (True/1 = kept), or None (left as is)."""
    tensors = as_tensor_list(tensors)
    masks = list(masks)
    if len(masks) != len(tensors):
        raise ValueError(f"apply_masks_: {len(tensors)} tensors but {len(masks)} masks")
    ready = _ready_lists(tensors, masks)
    if ready is not None:
        if ready[0]:
            _backend.implementation("apply_masks", ready[0][0].device, dtypes_of(ready[0])).apply_masks_(*ready)
        return
    if any_dtensor(tensors):  # sharded tensors (FSDP2): each rank masks its local shards (local masks)
        tensors = [local_tensor(t) for t in tensors]
    by_device: dict[torch.device, list[int]] = {}
    for i, (t, m) in enumerate(zip(tensors, masks)):
        if m is not None:
            if not (t.is_floating_point() or t.is_complex()):
                raise TypeError(f"tensors[{i}] has dtype {t.dtype}; masks apply to floating tensors")
            by_device.setdefault(t.device, []).append(i)
    for index in by_device.values():
        write_back, views, words = [], [], []
        for i in index:
            check_writable(((f"tensors[{i}]", tensors[i]),))
            view, mask, _ = kernel_layout(tensors[i].detach(), as_mask(masks[i], tensors[i], f"masks[{i}]"),
                                           (), write_back)
            views.append(view)
            words.append(mask.packed)
        torch.ops.dsd_kernels.apply_masks_(views, words)
        for target, done in write_back:
            target.copy_(done)

