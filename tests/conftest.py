import os

import torch

# Triton kernels run on CPU tensors under the interpreter; it must be set before triton
# is imported. On a machine with a GPU the kernels compile for real.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import dsd_kernels  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


def require_backend(name: str) -> None:
    """Skip the test when backend `name` cannot run on DEVICE for a reason of the machine (not
    of our code): no Triton, no nvcc to build csrc/cuda."""
    if name not in dsd_kernels.available_backends():
        pytest.skip(f"backend {name} unavailable: {dsd_kernels._backend.reasons()[name]}")
    if name == "cpp" and DEVICE != "cpu" and not dsd_kernels._backend.cpp_has_cuda_kernel("masked_sgd"):
        from torch.utils.cpp_extension import CUDA_HOME
        if CUDA_HOME is None:
            pytest.skip("cpp backend on CUDA: no nvcc on this machine to build csrc/cuda")
        pytest.fail(f"nvcc is at {CUDA_HOME} but dsd_kernels._C has no CUDA kernels "
                    f"({dsd_kernels._backend.reasons()['cpp']}); reinstall and read the build log")


@pytest.fixture(params=["torch", "cpp"])
def cpu_backend(request):
    """The optimizer tests' CPU backends (the Triton interpreter is not an optimizer's CPU path),
    each in force for the whole test."""
    if request.param not in dsd_kernels.available_backends():
        pytest.skip(f"backend {request.param} unavailable: {dsd_kernels._backend.reasons()[request.param]}")
    with dsd_kernels.use_backend(request.param):
        yield request.param


@pytest.fixture(params=[b for b in ("torch", "cpp", "triton")])
def backend(request):
    """Run the test once per backend present here; absent ones are reported as skipped. On a GPU
    the cpp backend is csrc/cuda (ops without CUDA kernels, masked_linear, choose as under auto)."""
    require_backend(request.param)
    with dsd_kernels.use_backend(request.param):
        yield request.param
