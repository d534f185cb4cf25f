"""setup.py's build of csrc/: each baseline source is compiled with torch's headers precompiled and
given first (`-include`, GCC only). A source must still include what it uses, or the build
breaks where there is no PCH (clang, DSD_KERNELS_PCH=0). The preprocessor lists each source's
headers cheaply; a source that does not include every precompiled header itself is compiled
(syntax only) without the PCH."""
import os
import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from torch.utils.cpp_extension import include_paths

from .test_aarch64_build import CXX_FLAGS, PCH_HEADERS, ROOT, SOURCES

pytestmark = pytest.mark.slow

BASELINE = [s for s in SOURCES if "/isa/" not in s]  # the ISA files are compiled without the PCH


def test_precompiled_headers_are_torch_headers_the_sources_use():
    common = (ROOT / "csrc" / "cpu" / "common.h").read_text()
    assert all(h.startswith(("ATen/", "torch/")) for h in PCH_HEADERS)
    assert all(f"#include <{h}>" in common for h in PCH_HEADERS if h != "torch/library.h")


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not installed")
def test_every_source_compiles_without_the_precompiled_headers():
    flags = ["-std=c++20", "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H", *CXX_FLAGS,
             *(f"-I{p}" for p in include_paths()), f"-I{sysconfig.get_paths()['include']}"]

    def included(src: str) -> tuple[str, set[str]]:
        out = subprocess.run(["g++", *flags, "-M", src], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        deps = out.stdout.replace("\\\n", " ").split()
        return src, {h for h in PCH_HEADERS if any(d.endswith("/" + h) for d in deps)}

    def syntax_only(src: str) -> tuple[str, subprocess.CompletedProcess]:
        return src, subprocess.run(["g++", *flags, "-fsyntax-only", src], cwd=ROOT, capture_output=True, text=True,
                                   timeout=600)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        lacking = [src for src, found in pool.map(included, BASELINE) if set(PCH_HEADERS) - found]
        failed = {src: out.stderr[-3000:] for src, out in pool.map(syntax_only, lacking) if out.returncode != 0}
    assert not failed, "\n\n".join(f"{src} (compiled without the PCH):\n{err}" for src, err in failed.items())
    assert len(lacking) < len(BASELINE)  # most sources include every precompiled header themselves
