"""csrc/cuda compiles with nvcc against the installed torch's headers, for the H100 (sm_90),
with the flags torch's extension builder passes, without warnings from our own files, and
without register spills (ptxas -v; its registers per kernel are printed).

Where torch is a CUDA build the package's install already builds these files; this test is for
machines like CI's, whose torch is CPU-only but which have nvcc: the kernels' logic is tested by
test_cuda_emulation.py, their CUDA syntax and device code here. Running them needs a GPU (`gpu`).
"""
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from torch.utils import cpp_extension

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))


def test_there_are_cuda_sources():
    assert {p.name for p in SOURCES} >= {"magnitude_select.cu", "masked_sgd.cu", "masked_adamw.cu"}


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found on this machine")
def test_cuda_sources_compile(tmp_path):
    includes = list(cpp_extension.include_paths())
    torch_include = Path(includes[0])
    if not (torch_include / "c10/cuda/impl/cuda_cmake_macros.h").exists():
        # a CPU-only torch ships the c10/cuda headers but not this generated one: an empty
        # stand-in (it only says whether c10_cuda is a shared library) lets them compile
        shim = tmp_path / "shim" / "c10" / "cuda" / "impl"
        shim.mkdir(parents=True)
        (shim / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        includes.insert(0, str(tmp_path / "shim"))
    # -O0 is nvcc's host optimisation level only (the device code is optimised by cicc and ptxas
    # either way: the same registers and spills), and the host compile was a third of the time
    flags = [*cpp_extension.COMMON_NVCC_FLAGS, "-std=c++20", "-O0", "-DTORCH_ASSERT_ONLY_METHOD_OPERATORS", "-arch=sm_90", "-Xptxas", "-v",
             *(f"-I{p}" for p in includes)]

    def compile_one(src: Path):
        cmd = ["nvcc", "-c", str(src), "-o", str(tmp_path / (src.stem + ".o")), *flags]
        return src, subprocess.run(cmd, capture_output=True, text=True)

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(compile_one, SOURCES))
    for src, out in results:
        assert out.returncode == 0, f"{src.name} failed to compile:\n{out.stderr[-4000:]}"
        ours = [line for line in out.stderr.splitlines() if "csrc/" in line and "warning" in line]
        assert not ours, f"{src.name}: warnings in our sources:\n" + "\n".join(ours)
        registers = [int(r) for r in re.findall(r"Used (\d+) registers", out.stderr)]
        spills = [(int(a), int(b)) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads",
                                                           out.stderr)]
        print(f"{src.name}: {len(registers)} kernels, {min(registers)}-{max(registers)} registers, "
              f"spill bytes {max(a + b for a, b in spills)}")
        assert registers and all(a == b == 0 for a, b in spills), f"{src.name} spills registers"
