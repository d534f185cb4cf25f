"""Build script. Metadata lives in pyproject.toml; this file adds the optional extension
`dsd_kernels._C` (csrc/): the `cpp` backend's CPU kernels (csrc/cpu) and, where torch is a CUDA
build and nvcc is found, its CUDA kernels (csrc/cuda).

DSD_KERNELS_BUILD_EXT=auto (default) builds it when torch and a C++ compiler are present; a
failed CUDA build is retried without the CUDA kernels, and a failed CPU build leaves the
pure-Python package. 1 makes any failure fatal; 0 skips the extension.
DSD_KERNELS_BUILD_CUDA=0 builds the CPU kernels only.
Build against the installed torch: `pip install --no-build-isolation .`.
"""
import glob
import os
import sys

from setuptools import setup

MODE = os.environ.get("DSD_KERNELS_BUILD_EXT", "auto").strip().lower()
if MODE not in ("auto", "0", "1"):
    sys.exit(f"DSD_KERNELS_BUILD_EXT must be auto, 0 or 1, got {MODE!r}")


BUILD_CUDA = os.environ.get("DSD_KERNELS_BUILD_CUDA", "auto").strip().lower()
if BUILD_CUDA not in ("auto", "0", "1"):
    sys.exit(f"DSD_KERNELS_BUILD_CUDA must be auto, 0 or 1, got {BUILD_CUDA!r}")

# no -std flag: torch's build helper picks the standard its headers need. -ffp-contract=off: the
# kernels that reproduce torch's bits write every fused multiply-add they mean (std::fma), and no
# other product may fuse into a sum; -fno-math-errno as torch builds (sqrt vectorises).
CXX_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno"]
CPU_SOURCES = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))


def cuda_wanted() -> bool:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME
    if BUILD_CUDA == "0":
        return False
    if torch.version.cuda is None or CUDA_HOME is None:
        if BUILD_CUDA == "1":
            sys.exit("DSD_KERNELS_BUILD_CUDA=1 needs a CUDA build of torch and nvcc "
                     f"(torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME})")
        return False
    return True


def extension_setup():
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    def cpu_extension():
        return CppExtension("dsd_kernels._C", CPU_SOURCES, extra_compile_args=CXX_FLAGS,
                            extra_link_args=["-fopenmp"])

    class OptionalBuild(BuildExtension):
        def run(self):
            try:
                super().run()
                return
            except Exception as err:  # noqa: BLE001 - any build failure: fall back, loudly
                if MODE == "1" or BUILD_CUDA == "1":
                    raise
                failure = err
            if any(src.endswith(".cu") for ext in self.extensions for src in ext.sources):
                print(f"WARNING: the CUDA kernels of dsd_kernels._C did not build ({failure}); "
                      f"building its CPU kernels only", file=sys.stderr)
                self.extensions = [cpu_extension()]
                try:
                    super().run()
                    return
                except Exception as err:  # noqa: BLE001
                    failure = err
            print(f"WARNING: dsd_kernels._C was not built ({failure}); the package falls back "
                  f"to its torch and Triton backends (see `dsd-kernels info`)", file=sys.stderr)

    if cuda_wanted():
        ext = CUDAExtension("dsd_kernels._C", CPU_SOURCES + sorted(glob.glob("csrc/cuda/*.cu")),
                            extra_compile_args={"cxx": CXX_FLAGS, "nvcc": ["-O3"]},
                            extra_link_args=["-fopenmp"])
    else:
        ext = cpu_extension()
    return {"ext_modules": [ext], "cmdclass": {"build_ext": OptionalBuild.with_options(no_python_abi_suffix=True)}}


kwargs = {}
if MODE != "0":
    try:
        kwargs = extension_setup()
    except ImportError as err:
        if MODE == "1":
            raise
        print(f"WARNING: not building dsd_kernels._C: {err}", file=sys.stderr)

setup(**kwargs)
