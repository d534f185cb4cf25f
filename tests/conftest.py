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


@pytest.fixture(params=[b for b in ("torch", "cpp", "triton")])
def backend(request):
    """Run the test once per backend present here; absent ones are reported as skipped."""
    name = request.param
    if name not in dsd_kernels.available_backends():
        pytest.skip(f"backend {name} unavailable: {dsd_kernels._backend.reasons()[name]}")
    if name == "cpp" and DEVICE != "cpu":
        pytest.skip("the cpp backend has CPU kernels only; it is tested on a CPU-only machine")
    dsd_kernels.set_backend(name)
    yield name
    dsd_kernels.set_backend(None)
