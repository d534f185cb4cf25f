"""The argument and layout helpers every op front end shares (private to dsd_kernels.ops and
the layers above it): tensor lists, sparsities, DTensor detection and the kernel layout."""
from __future__ import annotations

import numbers
import re
from collections.abc import Iterable, Mapping
from functools import reduce

import torch
from torch import Tensor

from .._dtensor import is_dtensor
from .._floatbits import KEY_SPECS
from ..masks import Mask, permuted_mask, real_view_mask


def as_tensor_list(tensors, name: str = "tensors") -> list[Tensor]:
    """A tensor or any iterable of tensors (a list, model.parameters(), ...) as a list."""
    if isinstance(tensors, Tensor):
        return [tensors]
    if not isinstance(tensors, Iterable) or isinstance(tensors, (str, bytes, dict)):
        raise TypeError(f"{name} must be a tensor or an iterable of tensors, got {type(tensors).__name__}")
    out = list(tensors)
    for i, t in enumerate(out):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}[{i}] must be a tensor, got {type(t).__name__}")
    return out


def check_float_same_device(tensors: list[Tensor], name: str = "tensors") -> None:
    for i, t in enumerate(tensors):
        if t.dtype not in KEY_SPECS:
            raise TypeError(f"{name}[{i}] has dtype {t.dtype}; magnitude selection needs a "
                            f"floating tensor (float16, bfloat16, float32 or float64)")
        if t.device != tensors[0].device:
            raise ValueError(f"{name}[{i}] is on {t.device} but {name}[0] is on "
                             f"{tensors[0].device}; all tensors must share one device")


_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
MAX_NM_GROUP = 32  # M of an N:M pattern: a group fits in one 32-bit mask word


def nm_pattern(value) -> tuple[int, int] | None:
    """(N, M) of an N:M sparsity as as_sparsity returns it ("2:4"), None for a fraction."""
    if not isinstance(value, str):
        return None
    n, m = _NM.match(value).groups()
    return int(n), int(m)


def _as_nm(value: str, name: str) -> str:
    match = _NM.match(value)
    n, m = (int(g) for g in match.groups()) if match else (None, None)
    if match is None or not 1 <= n < m <= MAX_NM_GROUP:
        raise ValueError(f"{name} {value!r} is not an N:M pattern: N:M keeps the N largest |w| of every M "
                         f"consecutive weights of a row, with 1 <= N < M <= {MAX_NM_GROUP} (e.g. '2:4', '1:4', '4:8')")
    return f"{n}:{m}"


def as_sparsity(value, name: str = "sparsity", *, allow_one: bool = True) -> float | str:
    """One sparsity as a float: a Python or NumPy real, or a 0-d tensor, in [0, 1]
    ([0, 1) with allow_one=False), or an N:M pattern as its normalised string ("2:4");
    anything else is a TypeError/ValueError naming `name`."""
    if isinstance(value, str):
        return _as_nm(value, name)
    if isinstance(value, Tensor) and value.dim() == 0 and not value.dtype.is_complex \
            and value.dtype != torch.bool:
        value = value.item()
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name} must be a float or an 'N:M' pattern, got {type(value).__name__}")
    value = float(value)
    if not (0.0 <= value <= 1.0 if allow_one else 0.0 <= value < 1.0):  # also rejects NaN
        raise ValueError(f"{name} must be in [0, {'1]' if allow_one else '1)'}, got {value}")
    return value


def sparsity_list(sparsity, count: int, *, allow_one: bool = True) -> list[float | str]:
    """One float for every tensor from one sparsity or one per tensor (any iterable but a
    dict: {pattern: sparsity} names weights, which takes a model)."""
    if isinstance(sparsity, Mapping):
        raise TypeError(f"sparsity is a dict ({{pattern: sparsity}}), which picks weights by their names in a "
                        f"model: pass model= (opt.prune(sparsity, model=model), DSDScheduler(..., model=model), "
                        f"OptimizerMasks through DSDScheduler) or, to dk.nn.sparsify, the model itself; without a "
                        f"model give one sparsity, or one per tensor in a list")
    if isinstance(sparsity, Tensor) and sparsity.dim() == 1:
        sparsity = sparsity.tolist()
    if isinstance(sparsity, Iterable) and not isinstance(sparsity, (str, bytes, Tensor)):
        values = list(sparsity)
        if len(values) != count:
            raise ValueError(f"sparsity has {len(values)} values but there are {count} tensors; "
                             f"give one float or one per tensor")
        return [as_sparsity(s, f"sparsity[{i}]", allow_one=allow_one) for i, s in enumerate(values)]
    return [as_sparsity(sparsity, allow_one=allow_one)] * count


def any_dtensor(tensors: list[Tensor]) -> bool:
    """DTensors (sharded weights) take the collective path of distributed.py; all or none."""
    flags = [is_dtensor(t) for t in tensors]
    if any(flags) and not all(flags):
        raise ValueError("tensors mixes DTensors and plain tensors; pass them in separate calls")
    return any(flags)


def threshold_dtype(tensors: list[Tensor]) -> torch.dtype:
    # every threshold is exact in the promoted dtype (fp16 and bf16 promote to fp32)
    return reduce(torch.promote_types, (t.dtype for t in tensors), tensors[0].dtype)


def dtypes_of(tensors) -> tuple[torch.dtype, ...]:
    return tuple(dict.fromkeys(t.dtype for t in tensors))



def storage_order(t: Tensor) -> tuple[int, ...] | None:
    """The dims of a non-overlapping, dense tensor from the slowest- to the fastest-moving in
    memory (channels_last (N, C, H, W) -> (0, 2, 3, 1)), so that t.permute(dims) is contiguous;
    None where no permutation is (a strided slice with gaps)."""
    dims = tuple(sorted(range(t.dim()), key=lambda d: (-t.stride(d), d)))
    return dims if t.permute(dims).is_contiguous() else None


def check_writable(named) -> None:
    """A tensor written in place must not have elements that share memory (an expand()ed
    tensor): its result would depend on the order of the writes. named: (name, tensor or None)."""
    for name, t in named:
        # what torch._debug_has_internal_overlap calls certain overlap (a dim of stride 0 and size
        # > 1), read from the strides so that torch.compile traces it without a graph break
        if t is not None and t.layout == torch.strided and \
                any(size > 1 and stride == 0 for size, stride in zip(t.shape, t.stride())):
            raise ValueError(f"{name} has elements that share memory (strides {t.stride()} for shape "
                             f"{tuple(t.shape)}, an expanded tensor?); it is written in place, so give "
                             f"it memory of its own (.clone())")


def kernel_layout(t: Tensor, mask: Mask | None, companions, write_back: list, read_only: int = 0):
    """`t` as the kernels take it, a contiguous real tensor, with its mask and companion tensors
    of t's shape (gradients, buffers; None allowed) transformed alike: a complex tensor as its
    real view (the mask covering both parts), a dense non-contiguous one (channels_last) as its
    storage-order view (no copy; the mask permuted, cached), anything else as a contiguous copy
    registered in write_back as (original, copy) to be copied back after the kernel ran; the
    first `read_only` companions are only read, so their copies are not written back.
    Returns (t, mask, companions)."""
    companions = list(companions)
    if t.is_complex():
        t = torch.view_as_real(t)
        companions = [None if c is None else torch.view_as_real(c) for c in companions]
        mask = None if mask is None else real_view_mask(mask)
    if not t.is_contiguous():
        dims = storage_order(t)
        if dims is not None:
            t = t.permute(dims)
            companions = [None if c is None else c.permute(dims) for c in companions]
            mask = None if mask is None else permuted_mask(mask, dims)
        else:
            write_back.append((t, t.contiguous()))
            t = write_back[-1][1]
    for i, c in enumerate(companions):
        if c is not None and not c.is_contiguous():  # e.g. a buffer in another memory order
            companions[i] = c.contiguous()
            if i >= read_only:
                write_back.append((c, companions[i]))
    return t, mask, companions



def check_kernel_tensors(op: str, named_lists, mutated: tuple[str, ...], *, real: bool) -> None:
    """The layout checks of the list ops (masked_sgd_, masked_adamw_, apply_masks_) on direct
    torch.ops calls, whichever backend runs: every tensor strided and contiguous (so no two of its
    elements share memory, and the kernels may walk it in order), and no tensor of a list in
    `mutated` sharing memory with any other argument. named_lists: (name, list) pairs; None
    entries are skipped; real=False (the fake implementations) checks the layouts only. The
    wrappers (dk.masked_sgd_, ...) take any layout and pass these checks."""
    intervals = []
    for name, tensors in named_lists:
        for i, t in enumerate(tensors):
            if t is None:
                continue
            if t.layout != torch.strided or not t.is_contiguous():
                strides = t.stride() if t.layout == torch.strided else t.layout
                raise ValueError(f"{op}: {name}[{i}] must be a contiguous strided tensor (its elements "
                                 f"apart and in order), got strides {strides} for shape {tuple(t.shape)}; "
                                 f"dk.{op} takes any layout")
            if real and t.numel() and t.device.type != "meta":
                start = t.data_ptr()
                intervals.append((start, start + t.numel() * t.element_size(), name in mutated, name, i))
    intervals.sort()
    # a sweep in address order: the furthest end so far, of any argument and of a mutated one
    furthest = furthest_mutated = None
    for start, end, is_mutated, name, i in intervals:
        for before, needs_mutated in ((furthest_mutated, False), (furthest, True)):
            if before is not None and start < before[0] and (is_mutated or not needs_mutated):
                raise ValueError(f"{op}: {name}[{i}] shares memory with {before[1]}[{before[2]}]; "
                                 f"a tensor the op writes must not overlap another argument")
        if furthest is None or end > furthest[0]:
            furthest = (end, name, i)
        if is_mutated and (furthest_mutated is None or end > furthest_mutated[0]):
            furthest_mutated = (end, name, i)
