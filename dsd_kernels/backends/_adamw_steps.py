"""AdamW's per-tensor step scalars as torch's non-capturable single-tensor/foreach step computes
them, shared by the compiled backends (C++ and Triton) of masked_adamw_, and as its fused CPU
kernel computes them (the C++ backend's fused bits)."""
from __future__ import annotations

import math
from functools import lru_cache

import torch


@lru_cache(maxsize=None)
def _compiled_steps():
    """The C++ extension's advance_adamw_steps (one call for every count), or None without it."""
    try:
        from .. import _C  # noqa: F401  (registers torch.ops.dsd_kernels_cpp)
        return torch.ops.dsd_kernels_cpp.advance_adamw_steps
    except (ImportError, AttributeError, RuntimeError):
        return None


def _advance_compiled(state_steps, lr, beta1, beta2, fused: bool):
    """(step sizes, sqrt(bias_correction2)s) from the compiled helper, which checks every count
    (one-element float32/float64 CPU tensors) before it changes any; None where it cannot take them."""
    compiled = _compiled_steps()
    if compiled is None or not state_steps:
        return None
    try:
        return compiled(state_steps, float(lr), float(beta1), float(beta2), fused)
    except RuntimeError:
        return None


def advance_steps(state_steps, lr: float, beta1: float, beta2: float) -> tuple[list[float], list[float]]:
    """Increment the step counts (as torch does) and return, per tensor, lr / bias_correction1
    and sqrt(bias_correction2), Python floats from the incremented counts as torch takes them."""
    done = _advance_compiled(state_steps, lr, beta1, beta2, False)
    if done is not None:
        return list(done[0]), list(done[1])
    steps = _incremented_steps(state_steps)
    # once per distinct count (an optimizer steps every tensor alike), the same floats as per tensor
    scalars = {step: (lr / (1 - beta1 ** step), (1 - beta2 ** step) ** 0.5) for step in set(steps)}
    return [scalars[step][0] for step in steps], [scalars[step][1] for step in steps]


def _incremented_steps(state_steps, as_float32: bool = False) -> list[float]:
    """Increment the counts and read them back (as float32 values with as_float32)."""
    torch._foreach_add_(state_steps, 1)
    if len({t.dtype for t in state_steps}) == 1:
        steps = torch.stack(state_steps)  # one read for all (each .item() costs a call)
        return (steps.to(torch.float32) if as_float32 else steps).tolist()
    return [float(t.to(torch.float32)) if as_float32 else t.item() for t in state_steps]


def advance_fused_steps(state_steps, lr: float, beta1: float, beta2: float) -> tuple[list[float], list[float]]:
    """As advance_steps, with the scalars of torch's fused CPU kernel: the count read as float32,
    then in double lr / (1 - beta1^step) and std::sqrt(1 - beta2^step) (not ** 0.5: pow and
    sqrt differ in the last bit at times)."""
    done = _advance_compiled(state_steps, lr, beta1, beta2, True)
    if done is not None:
        return list(done[0]), list(done[1])
    steps = _incremented_steps(state_steps, as_float32=True)
    scalars = {step: (lr / (1 - beta1 ** step), math.sqrt(1 - beta2 ** step)) for step in set(steps)}
    return [scalars[step][0] for step in steps], [scalars[step][1] for step in steps]


# bytes in a vector of ATen's CPU kernels per torch.backends.cpu.get_cpu_capability() (VECTOR_WIDTH)
_ATEN_VECTOR_BYTES = {"AVX512": 64, "AVX2": 32, "DEFAULT": 32}
_FUSED_LAYOUTS: dict = {}


def fused_layout(dtype: torch.dtype) -> tuple[int, int] | None:
    """(vector_lanes, epilogue_lanes) with which the C++ kernel reproduces torch's fused CPU AdamW
    in `dtype` (see csrc/cpu/masked_adamw.cpp), or None where no candidate does.

    The rounding of torch's kernel in the last elements of a tensor follows from how its binary
    was compiled (its vector width, and the width at which the compiler vectorised the scalar loop
    after it), so the candidates are checked, once per dtype and process, against torch's own
    fused step on small tensors of every tail length, NaN gradients and amsgrad included."""
    if dtype not in _FUSED_LAYOUTS:
        width = _ATEN_VECTOR_BYTES.get(torch.backends.cpu.get_cpu_capability())
        size = torch.empty((), dtype=dtype).element_size()
        lanes = [width // size] if width else [64 // size, 32 // size, 16 // size]
        candidates = [(v, e) for v in lanes for e in (v // 2, v // 4, 0) if e < v]
        _FUSED_LAYOUTS[dtype] = next((c for c in candidates if _matches_torch_fused(dtype, *c)), None)
    return _FUSED_LAYOUTS[dtype]


def _matches_torch_fused(dtype: torch.dtype, vector_lanes: int, epilogue_lanes: int) -> bool:
    from torch.optim.adamw import adamw

    gen = torch.Generator().manual_seed(0)
    sizes = list(range(1, 2 * vector_lanes + 2)) + [vector_lanes * 9 + vector_lanes - 1]
    for amsgrad, (beta1, beta2, weight_decay) in ((False, (0.9, 0.999, 0.01)), (True, (0.3, 0.5, 0.0))):
        tensors = []
        for n in sizes:
            grad = torch.randn(n, generator=gen, dtype=dtype)
            grad[torch.randint(n, (1,), generator=gen)] = float("nan")
            max_exp_avg_sq = torch.rand(n, generator=gen, dtype=dtype) * 0.2
            max_exp_avg_sq[torch.randint(n, (1,), generator=gen)] = float("nan")  # the maximum's NaN rule
            tensors.append([torch.randn(n, generator=gen, dtype=dtype), grad,
                            torch.randn(n, generator=gen, dtype=dtype) * 0.1,
                            torch.rand(n, generator=gen, dtype=dtype) * 0.1, max_exp_avg_sq])
        ours = [[t.clone() for t in ts] for ts in tensors]
        steps = [torch.tensor(2.0) for _ in sizes]
        adamw([t[0] for t in tensors], [t[1] for t in tensors], [t[2] for t in tensors], [t[3] for t in tensors],
              [t[4] for t in tensors] if amsgrad else [], steps, fused=True, amsgrad=amsgrad, beta1=beta1,
              beta2=beta2, lr=1e-2, weight_decay=weight_decay, eps=1e-8, maximize=False)
        steps = [torch.tensor(2.0) for _ in sizes]
        step_sizes, bias_correction2_sqrts = advance_fused_steps(steps, 1e-2, beta1, beta2)
        torch.ops.dsd_kernels_cpp.masked_adamw_fused_(
            [t[0] for t in ours], [t[1] for t in ours], [t[2] for t in ours], [t[3] for t in ours],
            [t[4] for t in ours] if amsgrad else [], [None] * len(sizes), step_sizes, bias_correction2_sqrts,
            1e-2, beta1, beta2, 1e-8, weight_decay, amsgrad, False, vector_lanes, epilogue_lanes)
        for theirs, mine in zip(tensors, ours):
            if not all(same_bits(a, b) for a, b in zip(theirs, mine)):
                return False
    return True


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit, except that any NaN equals any NaN (their payloads follow operand order)."""
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return bool(((a.view(bits) == b.view(bits)) | (a.isnan() & b.isnan())).all())
