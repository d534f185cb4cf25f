"""MaskedLinear: a drop-in nn.Linear computing x @ (W*M)^T + b with dsd_kernels.ops.masked_linear.

The mask lives in the module as a packed int32 buffer (`mask_words`, in the state_dict), so
the effective weight is sparse whatever optimizer trains it: dW is exactly 0 where pruned.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..masks import Mask, packed_shape
from ..ops.masked_linear import mask_words_for_weight


class MaskedLinear(nn.Linear):
    """nn.Linear with an optional binary weight mask (None = dense, plain F.linear)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 dtype=None, mask: Mask | Tensor | None = None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.register_buffer("mask_words", None)
        if mask is not None:
            self.set_mask(mask)

    @classmethod
    def from_linear(cls, linear: nn.Linear, mask: Mask | Tensor | None = None) -> "MaskedLinear":
        """A MaskedLinear sharing `linear`'s parameters (no copy)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        module = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                     device="meta")
        module.weight, module.bias = linear.weight, linear.bias
        if mask is not None:
            module.set_mask(mask)
        return module

    @property
    def mask(self) -> Mask | None:
        """The layer's Mask, or None while it computes dense."""
        return None if self.mask_words is None else Mask(self.mask_words, self.weight.shape)

    @torch.no_grad()
    def set_mask(self, mask: Mask | Tensor | None, *, zero_pruned: bool = True) -> None:
        """Set (or with None drop) the mask; by default the pruned weights are zeroed now, so
        they restart from exactly 0 if the mask is later dropped (DSD's re-dense)."""
        if mask is None:
            self.mask_words = None
            return
        words = mask_words_for_weight(mask.to(self.weight.device), self.weight, "mask")
        self.mask_words = words.clone()
        if zero_pruned:
            self.mask.apply_(self.weight)

    @property
    def sparsity(self) -> float:
        """Fraction of the weight pruned now (0.0 without a mask)."""
        return 0.0 if self.mask_words is None else self.mask.sparsity

    def forward(self, x: Tensor) -> Tensor:
        if self.mask_words is None:
            return F.linear(x, self.weight, self.bias)
        return ops.masked_linear(x, self.weight, self.mask_words, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, sparsity={self.sparsity:.3f}"

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # the mask buffer exists only while a mask is set: create or drop it to match the file
        key = prefix + "mask_words"
        if key in state_dict:
            words = state_dict[key]
            if tuple(words.shape) != packed_shape(self.weight.shape) or words.dtype != torch.int32:
                error_msgs.append(f"{key}: packed mask of shape {tuple(words.shape)} and dtype "
                                  f"{words.dtype} does not fit weight {tuple(self.weight.shape)}")
                return
            self.mask_words = torch.empty_like(words, device=self.weight.device)
        else:
            self.mask_words = None
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


def sparsify(model: nn.Module, sparsity, block: tuple[int, int] | None = None, *, include=None,
             exclude=None) -> nn.Module:
    """Swap the nn.Linear modules of `model` (in place) for MaskedLinear with exact magnitude masks.

    Which: the nn.Linear modules whose weight the pruning scope selects (dsd_kernels.scope:
    by default every Linear but one whose weight is tied to an embedding; `include` /
    `exclude` by module type or name pattern). Other selected weights (Conv, Hugging Face's
    Conv1D) have no tile-skipping matmul: a warning names them (DSDScheduler(model=...) or
    OptimizerMasks prune those). sparsity: one float, one per converted Linear in
    model.named_modules() order, or {regular expression: sparsity} by qualified weight name (as
    DSDScheduler's: the first pattern found in a name gives its sparsity; Linears no pattern
    matches stay plain nn.Linear); block: prune (bh, bw) tiles by L1 norm (see magnitude_masks).
    Parameters are shared, not copied, so an optimizer built before still holds them.
    Returns the model.
    """
    from ..scope import select
    chosen = select(model, sparsity if isinstance(sparsity, dict) else 0.0, include=include, exclude=exclude)
    selected = {id(s.param): s.sparsity for s in chosen}
    linears = [(name, m) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and id(m.weight) in selected]
    if isinstance(sparsity, dict):
        sparsity = [selected[id(m.weight)] for _, m in linears]
    others = sorted({name for name, m in model.named_modules() if not isinstance(m, nn.Linear)
                     for local, p in m.named_parameters(recurse=False) if id(p) in selected})
    if others:
        import warnings
        warnings.warn(f"sparsify converts nn.Linear only; {len(others)} other selected modules keep "
                      f"dense matmuls ({', '.join(others[:3])}{' ...' if len(others) > 3 else ''}): "
                      f"prune them with DSDScheduler(model=...) or dsd_kernels.optim.OptimizerMasks",
                      UserWarning, stacklevel=2)
    if not linears:
        return model
    masks = ops.magnitude_masks([m.weight for _, m in linears], sparsity, block=block)
    for (name, module), mask in zip(linears, masks):
        if isinstance(module, MaskedLinear):
            module.set_mask(mask)
            continue
        replacement = MaskedLinear.from_linear(module, mask)
        if name == "":
            return replacement
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, replacement)
    return model


def strip_masks(model: nn.Module) -> nn.Module:
    """Swap every MaskedLinear of `model` (in place) back for a plain nn.Linear sharing its
    parameters, with the pruned weights zeroed, so code that has never heard of this package
    loads and runs it (its state_dict has exactly nn.Linear's keys). Returns the model."""
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, MaskedLinear)]
    for name, module in found:
        if module.mask is not None:
            with torch.no_grad():
                module.mask.apply_(module.weight)
        plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                          device="meta")
        plain.weight, plain.bias = module.weight, module.bias
        if name == "":
            return plain
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, plain)
    return model
