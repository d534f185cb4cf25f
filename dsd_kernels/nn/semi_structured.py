"""Export of 2:4-pruned Linear layers to torch's semi-structured sparse tensors (the format
sparse tensor cores run) for inference: `dk.nn.to_semi_structured(model)`.

A Linear weight is 2:4 when every 4 consecutive weights of a row hold at most 2 nonzeros (a
MaskedLinear: its weight times its mask). torch.sparse.to_sparse_semi_structured runs on CUDA
only, for fp16/bf16 weights whose shapes its kernels accept; other 2:4 weights stay dense, with
a warning naming them.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from .masked_linear import MaskedLinear

SEMI_STRUCTURED_DTYPES = (torch.float16, torch.bfloat16)


@torch.no_grad()
def effective_weight(module: nn.Linear) -> torch.Tensor:
    """The weight the module multiplies by: W*M for a MaskedLinear with a mask, W otherwise."""
    if isinstance(module, MaskedLinear) and module.mask is not None:
        return module.weight * module.mask.to_bool()
    return module.weight


@torch.no_grad()
def is_two_four(weight: torch.Tensor) -> bool:
    """Whether every 4 consecutive weights of each row (shape (out, in), in % 4 == 0) hold at
    most 2 nonzeros."""
    if weight.dim() != 2 or weight.shape[1] % 4 or weight.numel() == 0:
        return False
    return bool(((weight != 0).reshape(-1, 4).sum(1) <= 2).all())


def two_four_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """(qualified name, module) of every Linear (MaskedLinear included) whose effective weight is 2:4."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and is_two_four(effective_weight(m))]


def to_semi_structured(model: nn.Module) -> nn.Module:
    """Swap every 2:4 Linear of `model` (in place) for an nn.Linear whose weight is
    torch.sparse.to_sparse_semi_structured(W*M), for inference (the weight no longer trains).
    Needs CUDA (a RuntimeError names the first weight elsewhere); weights that are not fp16/bf16,
    or whose shape torch's kernels refuse, stay dense, named in one warning. Returns the model
    (the new module when `model` itself is a converted Linear)."""
    from torch.sparse import to_sparse_semi_structured

    found = two_four_linears(model)
    if not found:
        warnings.warn("to_semi_structured: no Linear weight of the model is 2:4 sparse (prune with "
                      "sparsity='2:4' first); nothing converted", UserWarning, stacklevel=2)
        return model
    off_cuda = [(name, m) for name, m in found if m.weight.device.type != "cuda"]
    if off_cuda:
        name, m = off_cuda[0]
        raise RuntimeError(f"to_semi_structured needs CUDA (torch's semi-structured sparse kernels run on "
                           f"NVIDIA GPUs of compute capability 8.0 or newer): {name or 'the model'}.weight is on "
                           f"{m.weight.device}; move the model with .cuda() first")
    left_dense = []
    for name, module in found:
        weight = effective_weight(module).detach()
        if weight.dtype not in SEMI_STRUCTURED_DTYPES:
            left_dense.append(f"{name} ({weight.dtype}: fp16 or bf16 only)")
            continue
        try:
            sparse = to_sparse_semi_structured(weight.contiguous())
        except (RuntimeError, ValueError) as err:  # a shape or device torch's kernels refuse
            left_dense.append(f"{name} ({str(err).splitlines()[0]})")
            continue
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        linear.weight = nn.Parameter(sparse, requires_grad=False)
        linear.bias = module.bias
        if name == "":
            model = linear
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, linear)
    if left_dense:
        warnings.warn(f"to_semi_structured left {len(left_dense)} 2:4 weight(s) dense: {'; '.join(left_dense)}",
                      UserWarning, stacklevel=2)
    return model
