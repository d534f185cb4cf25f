"""Block DSD's sparse phase on the tile-skipping matmul, with no module swapped.

DSDScheduler(block=(bh, bw)) prunes whole tiles; while a selected nn.Linear's weight has a
mask, the layer computes through `ops.masked_linear` (x @ (W*M)^T + b, skipping empty tiles in
forward, grad input and grad weight), and through F.linear again once the mask is dropped. The
layer stays the very nn.Linear it was: its forward is overridden on the instance by a method
that asks the mask holder (MaskedSGD/MaskedAdamW or OptimizerMasks) for the weight's mask at
every call, so state_dict keys, named_parameters(), the optimizer's parameter references and
every phase change, resume or state-dict load follow the masks without another step. The
override is a method bound to the module, named `forward`: a deep copy binds it to the copy
(whose weights the holder does not know, so the copy computes dense), a pickle restores the
class's own forward; removing it (close(), or the scheduler collected) restores nn.Linear's.
"""
from __future__ import annotations

import types
from typing import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops


def tile_skipping_forward(mask_of: Callable[[Tensor], object]):
    """nn.Linear's forward computing through masked_linear while mask_of(weight) is a Mask."""
    def forward(self, x: Tensor) -> Tensor:
        mask = mask_of(self.weight)
        if mask is None:
            return F.linear(x, self.weight, self.bias)
        return ops.masked_linear(x, self.weight, mask.packed, self.bias)
    return forward


def install(modules: list[nn.Module], mask_of: Callable[[Tensor], object]) -> None:
    """Override the forward of every module (nn.Linear) to compute through its weight's mask."""
    forward = tile_skipping_forward(mask_of)
    for module in modules:
        module.forward = types.MethodType(forward, module)


def remove(modules: list[nn.Module]) -> None:
    """Put back the class's forward of every module install() overrode."""
    for module in modules:
        if isinstance(module.__dict__.get("forward"), types.MethodType):
            del module.forward


def tile_layers(model: nn.Module, params: list[Tensor]) -> tuple[list[nn.Linear], list[str]]:
    """(the nn.Linear modules of `model` whose weight is one of `params`, the qualified names
    of the other modules holding one of `params`: convolutions, Hugging Face's Conv1D, ...,
    which the tile kernel does not serve). MaskedLinear modules (nn.sparsify) keep their own."""
    from ..nn import MaskedLinear
    wanted = {id(p) for p in params}
    linears, others = [], []
    for name, module in model.named_modules():
        held = [p for local, p in module.named_parameters(recurse=False) if id(p) in wanted]
        if not held:
            continue
        if isinstance(module, nn.Linear) and not isinstance(module, MaskedLinear) and \
                any(p is module.weight for p in held):
            linears.append(module)
        elif not isinstance(module, MaskedLinear):
            others.append(name)
    return linears, others
