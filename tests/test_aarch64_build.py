"""csrc/ builds for aarch64: every source of the extension compiles (compile only, no link) with
Debian's cross compiler (`aarch64-linux-gnu-g++`, package g++-aarch64-linux-gnu) against the
installed torch's headers, with setup.py's flags as setup.py would pass them on an aarch64 machine.
There the portable kernels (csrc/cpu/isa/default.cpp) are at::vec's NEON vectors (a static_assert
in csrc/cpu/isa/vec_lanes.h) and the AVX2/AVX-512 files compile to stubs.

Without the cross compiler the test skips, unless DSD_KERNELS_REQUIRE_AARCH64_BUILD=1 (set by
.ci/run, which installs it) makes its absence a failure."""
import ast
import glob
import os
import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from torch.utils.cpp_extension import include_paths

ROOT = Path(__file__).resolve().parents[1]
CROSS_CXX = "aarch64-linux-gnu-g++"


def setup_py_flags() -> tuple[list[str], dict[str, list[str]], tuple[str, ...]]:
    """CXX_FLAGS, ISA_FLAGS and PCH_HEADERS as setup.py computes them on a machine that is not x86-64."""
    values = {}
    for node in ast.parse((ROOT / "setup.py").read_text()).body:
        if isinstance(node, ast.Assign) and node.targets[0].id in ("CXX_FLAGS", "ISA_FLAGS", "PCH_HEADERS"):
            values[node.targets[0].id] = eval(compile(ast.Expression(node.value), "setup.py", "eval"),
                                              {"X86_64": False})
    return values["CXX_FLAGS"], values["ISA_FLAGS"], values["PCH_HEADERS"]


CXX_FLAGS, ISA_FLAGS, PCH_HEADERS = setup_py_flags()
# setup.py's CPU_SOURCES and the per-ISA files, as paths relative to the root
SOURCES = sorted(glob.glob("csrc/*.cpp", root_dir=ROOT) + glob.glob("csrc/cpu/*.cpp", root_dir=ROOT)) + list(ISA_FLAGS)


def test_sources_cover_every_cpp_file():
    on_disk = sorted(glob.glob("csrc/**/*.cpp", root_dir=ROOT, recursive=True))
    assert sorted(SOURCES) == on_disk
    assert ISA_FLAGS["csrc/cpu/isa/avx2.cpp"] == [] and ISA_FLAGS["csrc/cpu/isa/avx512.cpp"] == []


@pytest.mark.slow
def test_csrc_compiles_for_aarch64(tmp_path):
    if shutil.which(CROSS_CXX) is None:
        if os.environ.get("DSD_KERNELS_REQUIRE_AARCH64_BUILD") == "1":
            pytest.fail(f"DSD_KERNELS_REQUIRE_AARCH64_BUILD=1 but {CROSS_CXX} is not on PATH "
                        f"(apt-get install g++-aarch64-linux-gnu)")
        pytest.skip(f"{CROSS_CXX} not installed (apt-get install g++-aarch64-linux-gnu)")
    includes = [f"-I{p}" for p in include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
    # -O0: this checks that the sources compile and generate code for aarch64, not how fast
    common = ["-std=c++20", "-O0", "-Wno-psabi", "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H",
              *[f for f in CXX_FLAGS if not f.startswith("-O")], *includes]

    # torch's headers, parsed once into a precompiled header that every source is given first, as
    # setup.py does (GCC ignores the PCH where flags make it unusable and reads the headers
    # themselves). Each source still includes what it uses: a build without the PCH needs that.
    pch = tmp_path / "torch_headers.h"
    pch.write_text("".join(f"#include <{h}>\n" for h in PCH_HEADERS))
    made = subprocess.run([CROSS_CXX, *common, "-x", "c++-header", str(pch), "-o", f"{pch}.gch"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert made.returncode == 0, made.stderr[-3000:]

    def compile_one(src: str) -> tuple[str, subprocess.CompletedProcess]:
        obj = tmp_path / (src.replace("/", "_") + ".o")
        cmd = [CROSS_CXX, *common, *ISA_FLAGS.get(src, []), "-include", str(pch), "-c", src, "-o", str(obj)]
        return src, subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        results = list(pool.map(compile_one, SOURCES))
    failed = {src: out.stderr[-3000:] for src, out in results if out.returncode != 0}
    assert not failed, "\n\n".join(f"{src}:\n{err}" for src, err in failed.items())
    objdump = shutil.which("aarch64-linux-gnu-objdump")
    if objdump:
        header = subprocess.run([objdump, "-f", str(tmp_path / "csrc_cpu_isa_default.cpp.o")],
                                capture_output=True, text=True).stdout
        assert "elf64-littleaarch64" in header, header
