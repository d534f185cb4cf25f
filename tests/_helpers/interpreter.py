"""What Triton's CPU interpreter can run, probed once per process (not read off its version).

The Triton tests on CPU run our kernels under TRITON_INTERPRET=1. Older interpreters (Triton
3.6, the one torch 2.11 ships) lack two things our kernels use and that every GPU compile has:
`tl.fma` rounded once (3.6 multiplies, then adds: two roundings) and `range()` over bounds read
with `tl.load` (3.6 raises "only 0-dimensional arrays can be converted to Python scalars"). A
test that needs one skips with that reason where the interpreter lacks it; on a GPU (no
interpreter) nothing skips, and the ahead-of-time compile tests cover those kernels everywhere.
"""
from __future__ import annotations

from functools import lru_cache

import pytest
import torch

from dsd_kernels._backend import _interpreting as interpreting


@lru_cache(maxsize=None)
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def fma_kernel(A, B, C, OUT):
        tl.store(OUT, tl.fma(tl.load(A), tl.load(B), tl.load(C)))

    @triton.jit
    def loaded_range_kernel(BOUNDS, OUT):
        total = 0
        for i in range(tl.load(BOUNDS), tl.load(BOUNDS + 1)):
            total += i
        tl.store(OUT, total)

    return fma_kernel, loaded_range_kernel


@lru_cache(maxsize=None)
def interpreter_lacks(feature: str) -> str | None:
    """Why the interpreter cannot run `feature`, or None where it can."""
    fma_kernel, loaded_range_kernel = _kernels()
    if feature == "fma":
        # (1 + 2^-12)^2 - 1 = 2^-11 + 2^-24, an fp32; rounding the product first loses the 2^-24
        x = torch.tensor([1 + 2.0**-12], dtype=torch.float32)
        out = torch.zeros(1, dtype=torch.float32)
        fma_kernel[(1,)](x, x, torch.tensor([-1.0]), out)
        if out.item() != 2.0**-11 + 2.0**-24:
            return "this Triton's interpreter rounds tl.fma twice (multiply, then add)"
        return None
    if feature == "loaded_range":
        out = torch.zeros(1, dtype=torch.int32)
        try:
            loaded_range_kernel[(1,)](torch.tensor([2, 5], dtype=torch.int32), out)
        except Exception as err:  # noqa: BLE001 - whatever the interpreter raises is the reason
            return f"this Triton's interpreter cannot loop over bounds read by tl.load ({err})"
        return None if out.item() == 2 + 3 + 4 else "this Triton's interpreter loops over loaded bounds wrongly"
    raise ValueError(f"unknown interpreter feature {feature!r}")


def require_interpreter_feature(feature: str) -> None:
    """Skip the test where Triton's kernels run under its interpreter (TRITON_INTERPRET set, as
    tests/conftest.py sets it without a GPU) and that lacks `feature` ("fma" or "loaded_range")."""
    if not interpreting():
        return
    reason = interpreter_lacks(feature)
    if reason is not None:
        import triton
        pytest.skip(f"{reason}; Triton {triton.__version__} (the GPU compile of the same kernels is "
                    f"tested by tests/test_aot.py)")
