"""Block DSD's sparse phase on the tile-skipping matmul, with no module swapped.

DSDScheduler(block=(bh, bw)) prunes whole tiles; while a selected nn.Linear's weight has a
mask, the layer computes through `ops.masked_linear` (x @ (W*M)^T + b, skipping empty tiles in
forward, grad input and grad weight), and through F.linear again once the mask is dropped.
Hugging Face's Conv1D (GPT-2), whose weight is stored (in, out), computes through it on the
transposed view of its weight and mask (the transposed mask words cached per mask; the kernel
copies the transposed weight per call, so its gain is smaller than an nn.Linear's). The
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
from torch.utils.weak import WeakTensorKeyDictionary

from .. import ops


def tile_skipping_forward(mask_of: Callable[[Tensor], object]):
    """nn.Linear's forward computing through masked_linear while mask_of(weight) is a Mask."""
    def forward(self, x: Tensor) -> Tensor:
        mask = mask_of(self.weight)
        if mask is None:
            return F.linear(x, self.weight, self.bias)
        return ops.masked_linear(x, self.weight, mask.packed, self.bias)
    return forward


# Mask words of the transposed weight, per packed mask tensor (and its version): a Conv1D's
# mask changes at prunes and re-denses, not per call
_TRANSPOSED_WORDS: WeakTensorKeyDictionary = WeakTensorKeyDictionary()


def transposed_words(mask) -> Tensor:
    """The packed words of mask.to_bool().t() (mask: a Mask over a (in, out) Conv1D weight)."""
    from ..masks import Mask
    packed = mask.packed
    cached = _TRANSPOSED_WORDS.get(packed)
    if cached is None or cached[0] != packed._version:
        cached = (packed._version, Mask.from_bool(mask.to_bool().t().contiguous()).packed)
        _TRANSPOSED_WORDS[packed] = cached
    return cached[1]


def conv1d_tile_skipping_forward(mask_of: Callable[[Tensor], object]):
    """Hugging Face Conv1D's forward (y = x @ W + b, W of shape (in, out)) computing through
    masked_linear on W^T while mask_of(weight) is a Mask."""
    def forward(self, x: Tensor) -> Tensor:
        mask = mask_of(self.weight)
        if mask is None:
            return self.__class__.forward(self, x)
        return ops.masked_linear(x, self.weight.t(), transposed_words(mask), self.bias)
    return forward


def is_conv1d(module: nn.Module) -> bool:
    """Hugging Face's transformers.pytorch_utils.Conv1D (by class, without importing transformers)."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


def install(modules: list[nn.Module], mask_of: Callable[[Tensor], object]) -> None:
    """Override the forward of every module (nn.Linear, Conv1D) to compute through its weight's mask."""
    forward = tile_skipping_forward(mask_of)
    conv1d_forward = conv1d_tile_skipping_forward(mask_of)
    for module in modules:
        module.forward = types.MethodType(conv1d_forward if is_conv1d(module) else forward, module)


def remove(modules: list[nn.Module]) -> None:
    """Put back the class's forward of every module install() overrode."""
    for module in modules:
        if isinstance(module.__dict__.get("forward"), types.MethodType):
            del module.forward


def tile_layers(model: nn.Module, params: list[Tensor]) -> tuple[list[nn.Linear], list[str]]:
    """(the nn.Linear and Hugging Face Conv1D modules of `model` whose weight is one of `params`,
    the qualified names of the other modules holding one of `params`: convolutions, embeddings,
    ..., which the tile kernel does not serve). MaskedLinear modules (nn.sparsify) keep their own."""
    from ..nn import MaskedLinear
    wanted = {id(p) for p in params}
    linears, others = [], []
    for name, module in model.named_modules():
        held = [p for local, p in module.named_parameters(recurse=False) if id(p) in wanted]
        if not held:
            continue
        if (isinstance(module, nn.Linear) and not isinstance(module, MaskedLinear) or is_conv1d(module)) and \
                any(p is module.weight for p in held):
            linears.append(module)
        elif not isinstance(module, MaskedLinear):
            others.append(name)
    return linears, others
