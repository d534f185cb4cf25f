"""The backend registry: per op, which backend serves which device and dtypes, in which order.

`ops/` is the only caller of `implementation()`, and with the backend packages (backends/) the
only module that imports one (`importlib`, from the `module` named in the table). A backend is
declared here by its rows of `REGISTRY`; nothing else branches on backend names.

The choice comes from `use_backend()` / `set_backend()` or the `DSD_KERNELS_BACKEND`
environment variable (auto | torch | triton | cpp). Under auto, per (op, device), the first
row that serves every dtype of the call and can run here wins. A row declared `fallback` is
used only where no preferred row can, and says so once (a RuntimeWarning naming op, dtype,
device and the backend used). A forced backend that has no row for the op, device and dtypes
warns once and chooses as under auto; one that has a row but cannot run here (extension not
built, no Triton) is a RuntimeError. A missing Triton or C++ extension is never an import
error; `dsd-kernels info` prints the table and why each backend is or is not available.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib
import importlib.util
import os
import warnings
from dataclasses import dataclass
from functools import lru_cache

import torch

BACKENDS = ("auto", "torch", "triton", "cpp")
FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
ANY_DEVICE = "any"


@dataclass(frozen=True)
class Implementation:
    """One row of the registry: `backend` serves `op` on `device` for `dtypes`.

    module: the module (relative to this package) holding the backend's functions for the op.
    auto: whether auto may choose it (False: only when forced, e.g. the Triton interpreter).
    fallback: chosen only where no preferred row can serve; reported once when it is.
    variants: the variants of the op it computes (masked_sgd: "foreach", the arithmetic of
    torch's single-tensor and foreach SGD, and "fused", that of torch's fused kernel).
    auto_dtypes: the dtypes auto chooses it for, where that is fewer than it serves (None: all
    of `dtypes`); forced, it serves all of them.
    """
    op: str
    backend: str
    device: str  # a torch device type, or ANY_DEVICE
    dtypes: tuple[torch.dtype, ...]
    module: str
    auto: bool = True
    fallback: bool = False
    variants: tuple[str, ...] = ("default",)
    auto_dtypes: tuple[torch.dtype, ...] | None = None

    def preferred_for(self, dtypes) -> bool:
        """Whether auto may choose it for `dtypes` (given that it serves them)."""
        return self.auto and (self.auto_dtypes is None or all(d in self.auto_dtypes for d in dtypes))

    def serves(self, device_type: str, dtypes, variant: str = "default") -> bool:
        return (self.device in (device_type, ANY_DEVICE) and all(d in self.dtypes for d in dtypes)
                and variant in self.variants)


def _rows(op: str, module: str, *, cuda: tuple[str, ...], cuda_dtypes=FLOATS, cpu=("cpp", "torch"),
          variants=("default",), cpp_cpu_variants=None, cpp_cpu_dtypes=FLOATS,
          cpp_cpu_auto_dtypes=None) -> list[Implementation]:
    """The standard rows of an op: `cpu` in order on CPU, Triton (interpreter) when forced on
    CPU, `cuda` in order on CUDA, and the torch composite as the declared fallback elsewhere."""
    cpu_rows = {"cpp": Implementation(op, "cpp", "cpu", cpp_cpu_dtypes, f".backends.cpp.{module}",
                                      variants=cpp_cpu_variants or variants, auto_dtypes=cpp_cpu_auto_dtypes),
                "torch": Implementation(op, "torch", "cpu", FLOATS, f".backends.torch.{module}",
                                        variants=variants)}
    rows = [cpu_rows[b] for b in cpu] + [
            Implementation(op, "triton", "cpu", cuda_dtypes if "triton" in cuda else (),
                           f".backends.triton.{module}", auto=False, variants=variants)]
    for backend in cuda:
        rows.append(Implementation(op, backend, "cuda", cuda_dtypes,
                                   f".backends.{backend}.{module}", variants=variants))
    rows.append(Implementation(op, "torch", ANY_DEVICE, FLOATS, f".backends.torch.{module}", fallback=True,
                               variants=variants))
    return [r for r in rows if r.dtypes]


def _cpp_masking_vectorised() -> bool:
    """Whether the C++ fp32 re-masking pass runs a vector path here: AVX-512 or AVX2 (what ATen
    detects on this CPU, unless DSD_KERNELS_CPU_CAPABILITY=default asks for the portable loop);
    there it measured faster than the composite (benchmarks/results/cpu-*.json)."""
    if os.environ.get("DSD_KERNELS_CPU_CAPABILITY", "").strip().lower() == "default":
        return False
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


# Order within an (op, device) is the preference under auto. On CPU the C++ kernels measured
# faster than the torch composites for every op (benchmarks/results/cpu-*.json). On CUDA, by an
# H200's figures (benchmarks/results/NVIDIA-H200.json): the csrc/cuda selection first (a tenth
# of the Triton kernels' time); Triton first for the SGD step, whose GPU time was 20% below the
# CUDA kernel's (its wall time per call was higher, by host work that a training loop overlaps
# with the backward pass still running on the GPU).
REGISTRY: tuple[Implementation, ...] = tuple(
    _rows("magnitude_select", "magnitude_select", cuda=("cpp", "triton"))
    # the sharded (DTensor) selection's per-shard histograms and masks (distributed.py):
    # csrc/cuda has no such kernels
    + _rows("magnitude_select_sharded", "magnitude_select", cuda=("triton",))
    # SGD's two arithmetics on CPU (torch's fused kernel rounds the tail of each of its work
    # chunks differently from its single-tensor/foreach ops): "fused" comes from torch's own fused
    # kernel in both CPU rows, followed by the C++ masking pass (one call) or the composite's AND
    # (one per tensor). On a GPU both are served by one kernel (bits not checked on a GPU yet).
    + _rows("masked_sgd", "masked_sgd", cuda=("triton", "cpp"), variants=("foreach", "fused"))
    # AdamW: the C++ row reproduces torch's single-tensor/foreach bits and its fused kernel's in
    # fp32/fp64 (the fused ones where ATen's vector width is known: else it calls torch's step),
    # the composite (torch's own step + an AND pass) every flag and dtype; on CUDA the Triton kernel
    # (measured: torch's foreach bits and 81-84% of copy bandwidth on an H200), then csrc/cuda's
    # (the same arithmetic, not yet run on a GPU); fp32/fp64, half precision takes the composite
    + _rows("masked_adamw", "masked_adamw", cuda=("triton", "cpp"), cuda_dtypes=(torch.float32, torch.float64),
            variants=("foreach", "fused"), cpp_cpu_dtypes=(torch.float32, torch.float64))
    # re-masking around any optimizer's step (csrc/cuda has no such kernel); on CPU the C++
    # AVX-512 or AVX2 pass for fp32 first (each beat the composite on its CPU), else the
    # composite's AND with cached unpacked words, which measured faster than the C++ scalar word
    # loop of other dtypes and CPUs
    + _rows("apply_masks", "apply_masks", cuda=("triton",),
            cpp_cpu_auto_dtypes=(torch.float32,) if _cpp_masking_vectorised() else ())
    # N:M masks: the C++ kernel on CPU, the Triton kernel on CUDA (compiled ahead of time for
    # sm_80/sm_90, not yet run on a GPU)
    + _rows("nm_masks", "nm_masks", cuda=("triton",))
    # RigL/SET's mask update: its memory passes (values at kept and at pruned entries, the new
    # words) in C++ on CPU and in torch ops elsewhere; the selections between them are
    # magnitude_select's, on whichever backend serves that
    + _rows("mask_update", "mask_update", cuda=("torch",))
    # tl.dot has no general fp64: fp64 on CUDA takes the declared torch fallback
    + _rows("masked_linear", "masked_linear", cuda=("triton",),
            cuda_dtypes=(torch.float16, torch.bfloat16, torch.float32))
)
OPS = tuple(dict.fromkeys(r.op for r in REGISTRY))

# the compiled op of csrc/ behind each registry op, where the cpp backend has a CUDA kernel
_CPP_CUDA_KERNELS = {"magnitude_select": "magnitude_select", "masked_sgd": "masked_sgd_",
                     "masked_adamw": "masked_adamw_"}

_forced: str | None = None  # set_backend: the whole process
# use_backend: this thread (and asyncio task) only, so concurrent blocks cannot see each other's choice
_scoped: contextvars.ContextVar[str | None] = contextvars.ContextVar("dsd_kernels_backend", default=None)
_warned: set = set()


# ---------------------------------------------------------------- what can run here
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


def cpp_has_cuda_kernel(op: str) -> bool:
    """Whether dsd_kernels._C was built with a CUDA kernel for registry op `op`."""
    if op not in _CPP_CUDA_KERNELS or _cpp_import_error() is not None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(
        f"dsd_kernels_cpp::{_CPP_CUDA_KERNELS[op]}", "CUDA")


@lru_cache(maxsize=None)
def cpp_status() -> tuple[bool, str]:
    """(usable, why) for the compiled extension dsd_kernels._C."""
    if _cpp_import_error() is not None:
        return False, f"C++ extension not built ({_cpp_import_error()})"
    cuda_ops = [op for op in _CPP_CUDA_KERNELS if cpp_has_cuda_kernel(op)]
    if cuda_ops:
        return True, f"built: CPU kernels, and CUDA kernels for {', '.join(cuda_ops)}"
    why = ("torch is a CPU-only build" if torch.version.cuda is None else
           "built without nvcc or with DSD_KERNELS_BUILD_CUDA=0; reinstall to add them")
    return True, f"built: CPU kernels (no CUDA kernels: {why})"


def cpp_cpu_capability() -> str:
    """The vector ISA the C++ CPU kernels run here, in words (`dsd-kernels info`): the best this
    CPU and build offer, or what DSD_KERNELS_CPU_CAPABILITY asks."""
    if not cpp_status()[0]:
        return "no C++ extension"
    best = torch.ops.dsd_kernels_cpp.best_cpu_capability()
    try:
        running = torch.ops.dsd_kernels_cpp.cpu_capability()
    except RuntimeError as err:  # a bad switch: say so, as every C++ op will
        return f"none: {str(err).splitlines()[0]}"
    if os.environ.get("DSD_KERNELS_CPU_CAPABILITY"):
        return f"{running} (DSD_KERNELS_CPU_CAPABILITY; best here: {best})"
    return f"{running} (the best this CPU and build offer; DSD_KERNELS_CPU_CAPABILITY=default|avx2|avx512 lowers it)"


def cpp_tile_kernel() -> str:
    """What multiplies the kept tiles of fp32 weights in the C++ masked_linear on this CPU, in words
    (`dsd-kernels info`)."""
    if not cpp_status()[0]:
        return "no C++ extension"
    try:
        kernel = torch.ops.dsd_kernels_cpp.masked_linear_tile_kernel()
    except RuntimeError as err:
        return f"none: {str(err).splitlines()[0]}"
    if kernel != "aten":
        return (f"tile_gemm of csrc/cpu/isa, built for {kernel} "
                f"(DSD_KERNELS_TILE_GEMM=0: ATen matmuls)")
    why = ("DSD_KERNELS_TILE_GEMM=0" if os.environ.get("DSD_KERNELS_TILE_GEMM") == "0" else
           "the portable default build, not used unless DSD_KERNELS_TILE_GEMM=1")
    return f"ATen matmuls, one per run of kept tiles ({why})"


def row_status(row: Implementation, device_type: str | None = None) -> tuple[bool, str]:
    """(can run here, why not) for a registry row on `device_type` (default: the row's device)."""
    device_type = device_type or row.device
    if row.backend == "torch":
        return True, ""
    if row.backend == "triton":
        ok, why = triton_status()
        if ok and device_type == "cpu" and not _interpreting():
            return False, "triton on CPU tensors needs TRITON_INTERPRET=1"
        return ok, why
    ok, why = cpp_status()
    if ok and device_type != "cpu" and not cpp_has_cuda_kernel(row.op):
        return False, f"dsd_kernels._C has no {device_type} kernel for {row.op} ({why})"
    return ok, why


def available_backends() -> list[str]:
    """Backends that can run here, e.g. ["torch", "cpp"]."""
    found = ["torch"]
    if cpp_status()[0]:
        found.append("cpp")
    if triton_status()[0]:
        found.append("triton")
    return found


def reasons() -> dict[str, str]:
    return {"torch": "always available", "cpp": cpp_status()[1], "triton": triton_status()[1]}


# ---------------------------------------------------------------- the requested backend
def set_backend(name: str | None) -> None:
    """Force a backend for every op ("torch", "triton", "cpp"), or None/"auto" to choose."""
    global _forced
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    _forced = None if name in (None, "auto") else name


def get_backend() -> str:
    """The requested backend name: an enclosing use_backend() of this thread first, then
    set_backend(), then DSD_KERNELS_BACKEND, else auto."""
    scoped = _scoped.get()
    if scoped is not None and scoped != "auto":
        return scoped
    if _forced is not None and scoped is None:
        return _forced
    name = os.environ.get("DSD_KERNELS_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"DSD_KERNELS_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str | None):
    """Within the block, ops called from this thread use backend `name` ("torch", "triton",
    "cpp", or None/"auto"); the previous choice is restored on exit, exceptions included. Other
    threads keep theirs (a context variable); set_backend() is the process-wide choice."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    token = _scoped.set("auto" if name is None else name)
    try:
        yield
    finally:
        _scoped.reset(token)


def _warn_once(key, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def _dtype_names(dtypes) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


_SHORT = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


# ---------------------------------------------------------------- lookup
def rows_for(op: str, device_type: str) -> list[Implementation]:
    if op not in OPS:
        raise KeyError(f"unknown op {op!r}; the registry has {OPS}")
    return [r for r in REGISTRY if r.op == op and r.device in (device_type, ANY_DEVICE)]


def resolve(op: str, device: torch.device, dtypes, variant: str = "default") -> Implementation:
    """The registry row that runs `variant` of `op` on `device` for tensors of `dtypes`."""
    dtypes = tuple(dict.fromkeys(dtypes))
    rows = rows_for(op, device.type)
    if variant == "default":
        variant = rows[0].variants[0]
    requested = get_backend()
    if requested != "auto":
        forced = [r for r in rows if r.backend == requested and r.serves(device.type, dtypes, variant)]
        if forced:
            ok, why = row_status(forced[0], device.type)
            if not ok:
                raise RuntimeError(f"{op}: backend {requested!r} requested but unavailable: {why}")
            return forced[0]
        what = _dtype_names(dtypes) + ("" if variant == rows[0].variants[0] else f" ({variant})")
        _warn_once(("forced", op, requested, device.type, dtypes, variant),
                   f"dsd_kernels: {op} has no {requested!r} backend for {what} on {device.type}; "
                   f"choosing automatically")
    skipped = []
    for row in rows:
        if not row.preferred_for(dtypes) or not row.serves(device.type, dtypes, variant):
            if row.auto and not row.serves(device.type, dtypes, variant):
                skipped.append(f"{row.backend} does not serve {_dtype_names(dtypes)}"
                               + ("" if variant in row.variants else f" ({variant})"))
            continue
        ok, why = row_status(row, device.type)
        if not ok:
            skipped.append(f"{row.backend}: {why}")
            continue
        if row.fallback and skipped:
            _warn_once(("fallback", op, row.backend, device.type, dtypes),
                       f"dsd_kernels: {op} on {device.type} {_dtype_names(dtypes)} uses the "
                       f"{row.backend} backend (fallback; {'; '.join(skipped)})")
        return row
    raise RuntimeError(f"dsd_kernels: no backend serves {op} for {_dtype_names(dtypes)} on "
                       f"{device.type}")


@lru_cache(maxsize=None)
def _module(name: str):
    return importlib.import_module(name, __package__)


def implementation(op: str, device: torch.device, dtypes, variant: str = "default"):
    """The backend module that runs `op` on `device` for `dtypes` (imported on first use)."""
    return _module(resolve(op, device, dtypes, variant).module)


def table() -> list[dict]:
    """The registry as rows for `dsd-kernels info`: op, backend, device, dtypes, role, available."""
    out, rank = [], {}
    for row in REGISTRY:
        ok, why = row_status(row) if row.device != ANY_DEVICE else (True, "")
        if not row.auto or row.auto_dtypes == ():
            role = "forced only"
        elif row.fallback:
            role = "fallback"
        else:
            rank[(row.op, row.device)] = rank.get((row.op, row.device), 0) + 1
            role = f"auto #{rank[(row.op, row.device)]}"
            if row.auto_dtypes is not None:
                role += " for " + ", ".join(_SHORT[d] for d in row.auto_dtypes)
        name = row.op if row.variants == ("default",) else f"{row.op} ({', '.join(row.variants)})"
        out.append({"op": name, "backend": row.backend, "device": row.device,
                    "dtypes": ", ".join(_SHORT[d] for d in row.dtypes), "role": role, "available": ok, "why": why})
    return out
