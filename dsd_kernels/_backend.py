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
def _cpp_import_error() -> str | None:
    try:
        importlib.import_module("dsd_kernels._C")
    except ImportError as err:
        return str(err)
    return None


@lru_cache(maxsize=None)
def cpp_status() -> tuple[bool, str]:
    """(usable, why) for the compiled extension dsd_kernels._C."""
    if _cpp_import_error() is not None:
        return False, f"C++ extension not built ({_cpp_import_error()})"
    cuda_ops = [op for op in CPP_CUDA_OPS if cpp_has_cuda_kernel(op)]
    if cuda_ops:
        return True, f"built: CPU kernels, and CUDA kernels for {', '.join(cuda_ops)}"
    why = ("torch is a CPU-only build" if torch.version.cuda is None else
           "built without nvcc or with DSD_KERNELS_BUILD_CUDA=0; reinstall to add them")
    return True, f"built: CPU kernels (no CUDA kernels: {why})"


# The cpp backend's kernels on CUDA tensors (csrc/cuda), by public op -> compiled op. The others
# (masked_linear) have CPU kernels only and use Triton on a GPU.
CPP_CUDA_OPS = {"magnitude_select": "magnitude_select", "masked_sgd_": "masked_sgd_"}


def cpp_has_cuda_kernel(op: str) -> bool:
    """Whether dsd_kernels._C was built with the CUDA kernel of `op`."""
    if op not in CPP_CUDA_OPS or _cpp_import_error() is not None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"dsd_kernels_cpp::{CPP_CUDA_OPS[op]}", "CUDA")


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
# by `dsd-kernels bench` on the project's 2-core x86-64 machine (benchmarks/results/): C++
# radix select 1.7-2.9x the composite; C++ masked SGD (vectorised one-pass loop) ~1.6x torch's
# fused SGD + bitwise AND; C++ masked_linear on a par unstructured, ~1.2x the composite's
# tile loop on 64x64 blocks (its tile matmuls split over threads, W*M formed in kept tiles only).
CPU_AUTO = {"magnitude_select": ("cpp", "torch"), "masked_sgd_": ("cpp", "torch"),
            "masked_linear": ("cpp", "torch")}
# Under auto on CUDA, per op, in order of preference. Not measured yet (no GPU session so far):
# Triton first, as the kernels tested longest; `dsd-kernels bench` on a GPU times both
# (backend "cpp" = csrc/cuda) and this table should follow its results.
GPU_AUTO = {"magnitude_select": ("triton", "cpp"), "masked_sgd_": ("triton", "cpp"),
            "masked_linear": ("triton",)}


def _usable(name: str, op: str, device: torch.device) -> tuple[bool, str]:
    if name == "torch":
        return True, ""
    if name == "triton":
        ok, why = triton_status()
        if ok and device.type == "cpu" and not _interpreting():
            return False, "triton on CPU tensors needs TRITON_INTERPRET=1"
        return ok, why
    ok, why = cpp_status()
    if ok and device.type != "cpu" and not cpp_has_cuda_kernel(op):
        return False, f"dsd_kernels._C has no {device.type} kernel for {op} ({why})"
    return ok, why


def resolve(op: str, device: torch.device, supported: tuple[str, ...]) -> str:
    """The backend that runs `op` on `device`, among the backends `op` implements.

    A forced backend that cannot run raises RuntimeError (the user asked for it);
    under auto, a missing fast backend falls back to torch and warns once.
    """
    if device.type == "cuda" and op not in CPP_CUDA_OPS:
        supported = tuple(b for b in supported if b != "cpp")  # CPU kernels only, by design
    requested = get_backend()
    if requested != "auto" and requested not in supported:
        # a forced backend applies to the ops that have it; the others choose as under auto
        _warn_once(f"{op}:{requested}", f"dsd_kernels: {op} has no {requested!r} backend "
                                        f"on {device.type} (has {supported}); choosing automatically")
        requested = "auto"
    if requested != "auto":
        ok, why = _usable(requested, op, device)
        if not ok:
            raise RuntimeError(f"{op}: backend {requested!r} requested but unavailable: {why}")
        return requested
    preference = {"cpu": CPU_AUTO, "cuda": GPU_AUTO}.get(device.type, {}).get(op, ())
    for name in preference:
        if name in supported and _usable(name, op, device)[0]:
            return name
    if device.type == "cuda" and "triton" in supported:
        _warn_once("triton", f"dsd_kernels: Triton unavailable ({triton_status()[1]}); "
                             f"using the torch composite")
    return "torch"
