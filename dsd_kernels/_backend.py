"""Backend selection: which implementation of an op runs for a given device.

`ops.py` is the only caller. The choice comes from `set_backend()` or the
`DSD_KERNELS_BACKEND` environment variable (auto | torch | triton | cpp).
A missing Triton or C++ extension is never an import error: `auto` falls back
to the torch composite and `reasons()` says why (printed by `dsd-kernels info`).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import warnings
from functools import lru_cache

import torch

BACKENDS = ("auto", "torch", "triton", "cpp")
_forced: str | None = None
_warned: set[str] = set()


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_status() -> tuple[bool, str]:
    """(usable, why): Triton is usable on CUDA, or on CPU under TRITON_INTERPRET=1."""
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed"
    if torch.cuda.is_available():
        return True, "CUDA device present"
    if _interpreting():
        return True, "CPU, TRITON_INTERPRET=1 (interpreter: correct but slow)"
    return False, "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU)"


@lru_cache(maxsize=None)
def cpp_status() -> tuple[bool, str]:
    """(usable, why) for the compiled extension dsd_kernels._C."""
    try:
        importlib.import_module("dsd_kernels._C")
    except ImportError as err:
        return False, f"C++ extension not built ({err})"
    return True, "built"


def available_backends() -> list[str]:
    """Backends that can run here, e.g. ["torch", "triton"]."""
    found = ["torch"]
    if cpp_status()[0]:
        found.append("cpp")
    if triton_status()[0]:
        found.append("triton")
    return found


def reasons() -> dict[str, str]:
    return {"torch": "always available", "cpp": cpp_status()[1], "triton": triton_status()[1]}


def set_backend(name: str | None) -> None:
    """Force a backend for every op ("torch", "triton", "cpp"), or None/"auto" to choose."""
    global _forced
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    _forced = None if name in (None, "auto") else name


def get_backend() -> str:
    """The requested backend name: set_backend() first, then DSD_KERNELS_BACKEND, else auto."""
    if _forced is not None:
        return _forced
    name = os.environ.get("DSD_KERNELS_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"DSD_KERNELS_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


# Under auto on CPU, per op, the faster of the C++ kernel and the torch composite as measured
# by `dsd-kernels bench` on the project's 2-core x86-64 machine (benchmarks/results/):
# radix select in C++ is ~1.7x the composite; for masked SGD, torch's own (AVX-dispatched)
# fused SGD kernel plus a bitwise AND beats our baseline-x86-64 C++ loop by ~20%;
# masked_linear is ATen's matmul either way and the composite's dispatch is a little leaner.
CPU_AUTO = {"magnitude_select": ("cpp", "torch"), "masked_sgd_": ("torch", "cpp"),
            "masked_linear": ("torch", "cpp")}


def resolve(op: str, device: torch.device, supported: tuple[str, ...]) -> str:
    """The backend that runs `op` on `device`, among the backends `op` implements.

    A forced backend that cannot run raises RuntimeError (the user asked for it);
    under auto, a missing fast backend falls back to torch and warns once.
    """
    requested = get_backend()
    if requested != "auto" and requested not in supported:
        # a forced backend applies to the ops that have it; the others choose as under auto
        _warn_once(f"{op}:{requested}", f"dsd_kernels: {op} has no {requested!r} backend "
                                        f"(has {supported}); choosing automatically")
        requested = "auto"
    if requested != "auto":
        ok, why = {"torch": (True, ""), "triton": triton_status(), "cpp": cpp_status()}[requested]
        if not ok:
            raise RuntimeError(f"{op}: backend {requested!r} requested but unavailable: {why}")
        if requested == "triton" and device.type == "cpu" and not _interpreting():
            raise RuntimeError(f"{op}: triton on CPU tensors needs TRITON_INTERPRET=1")
        if requested == "cpp" and device.type != "cpu":
            raise RuntimeError(f"{op}: the cpp backend has CPU kernels only; got a {device.type} tensor")
        return requested
    if device.type == "cuda" and "triton" in supported:
        ok, why = triton_status()
        if ok:
            return "triton"
        _warn_once("triton", f"dsd_kernels: Triton unavailable ({why}); using the torch composite")
    if device.type == "cpu":
        for name in CPU_AUTO.get(op, ("cpp", "torch")):
            if name in supported and (name == "torch" or cpp_status()[0]):
                return name
    return "torch"
