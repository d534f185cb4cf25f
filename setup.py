"""Build script. Metadata lives in pyproject.toml; this file adds the optional extension
`dsd_kernels._C` (csrc/): the `cpp` backend's CPU kernels (csrc/cpu) and, where torch is a CUDA
build and nvcc is found, its CUDA kernels (csrc/cuda).

DSD_KERNELS_BUILD_EXT=auto (default) builds it when torch and a C++ compiler are present; a
failed CUDA build is retried without the CUDA kernels, and a failed CPU build leaves the
pure-Python package. 1 makes any failure fatal; 0 skips the extension.
DSD_KERNELS_BUILD_CUDA=0 builds the CPU kernels only.
DSD_KERNELS_DEBUG=1 keeps debug information in the library (off by default). DSD_KERNELS_PCH=0
compiles without the precompiled torch headers (GCC only).
Build against the installed torch: `pip install --no-build-isolation .`.
"""
import glob
import os
import platform
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
# other product may fuse into a sum; -fno-math-errno as torch builds (sqrt vectorises). -g0 drops
# the debug information Python's own CFLAGS ask for (-g): it made the build a third slower and the
# library several times larger; DSD_KERNELS_DEBUG=1 keeps it.
DEBUG = os.environ.get("DSD_KERNELS_DEBUG", "0").strip().lower() not in ("", "0")
# TORCH_ASSERT_ONLY_METHOD_OPERATORS: each source includes the ATen operator headers it calls
# (ATen/ops/*.h), not ATen/ATen.h, whose parsing was a third of each compile (as ATen's own sources).
CXX_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-DTORCH_ASSERT_ONLY_METHOD_OPERATORS"]
if not DEBUG:
    CXX_FLAGS.append("-g0")
CPU_SOURCES = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))

# The kernels written once with at::vec::Vectorized (csrc/cpu/isa), compiled once per vector ISA
# with that ISA's flags and CPU_CAPABILITY (as ATen compiles its own CPU kernels); the extension
# picks one at run time (csrc/cpu/cpu_capability.h). Off x86-64 only the default build has flags:
# the AVX2 and AVX-512 files compile to stubs that report them as not built. Linked after the
# baseline objects, so an inline function that an ISA file also emits resolves to a baseline copy.
X86_64 = platform.machine().lower() in ("x86_64", "amd64")
# the torch headers every baseline source includes (csrc/cpu/common.h and the registrations)
PCH_HEADERS = ("ATen/Dispatch.h", "ATen/core/Tensor.h", "ATen/Parallel.h", "torch/library.h")
ISA_FLAGS = {
    "csrc/cpu/isa/default.cpp": ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"],
    "csrc/cpu/isa/avx2.cpp": (["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c", "-mpopcnt"]
                              if X86_64 else []),
    "csrc/cpu/isa/avx512.cpp": (["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512", "-mavx512f",
                                 "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c", "-mpopcnt"] if X86_64 else []),
}


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
        def build_extension(self, ext):
            # each ISA file alone, with its flags added to the extension's (BuildExtension has
            # added the torch and language-standard flags to them by now)
            cxx = ext.extra_compile_args
            cxx = list(cxx["cxx"] if isinstance(cxx, dict) else cxx)
            # a build folder per ISA file: torch writes a ninja manifest per compile call into its
            # output folder, and ninja drops the log entries of outputs another manifest built, so a
            # shared folder recompiled every object on every build
            isa_objects = []
            for src, flags in ISA_FLAGS.items():
                out = os.path.join(self.build_temp, "isa", os.path.splitext(os.path.basename(src))[0])
                isa_objects += self.compiler.compile([src], output_dir=out, include_dirs=ext.include_dirs,
                                                     extra_postargs=cxx + flags,
                                                     depends=glob.glob("csrc/cpu/isa/*.h"))
            ext.extra_objects = [o for o in ext.extra_objects or [] if o not in isa_objects] + isa_objects
            pch_flags = self.torch_headers_pch(ext, cxx)
            if pch_flags:  # the baseline sources only: the ISA files' flags would not match it
                if isinstance(ext.extra_compile_args, dict):
                    ext.extra_compile_args["cxx"] = list(ext.extra_compile_args["cxx"]) + pch_flags
                else:
                    ext.extra_compile_args = list(ext.extra_compile_args) + pch_flags
            super().build_extension(ext)

        def torch_headers_pch(self, ext, cxx):
            """GCC only: torch's headers that every source includes, parsed once into a precompiled
            header (with the sources' own compiler and flags) that each source is given first;
            parsing them was most of each source's compile. GCC reads the headers themselves
            where the PCH does not fit (and -Winvalid-pch says so). Returns the flags to add, or
            [] (another compiler, DSD_KERNELS_PCH=0, or the PCH did not build)."""
            import json
            import subprocess
            import torch
            if os.environ.get("DSD_KERNELS_PCH", "1").strip() == "0":
                return []
            compiler = list(self.compiler.compiler_so)
            try:
                version = subprocess.run([compiler[0], "--version"], capture_output=True, text=True).stdout
            except OSError:
                return []
            if "Free Software Foundation" not in version:
                return []
            # the sources get torch's -std (appended at compile time where none is given): the
            # PCH must be made with the same one, or GCC would not use it
            std = [f for f in cxx if f.startswith("-std=")] or self.torch_default_std()
            if not std:
                return []
            folder = os.path.join(os.path.abspath(self.build_temp), "pch")
            header = os.path.join(folder, "torch_headers.h")
            text = "".join(f"#include <{h}>\n" for h in PCH_HEADERS)
            includes = [f"-I{d}" for d in [*ext.include_dirs, *self.compiler.include_dirs]]
            cmd = [*compiler, *includes, "-x", "c++-header", header, "-o", header + ".gch", *cxx, *std[-1:]]
            stamp = json.dumps([cmd, text, torch.__version__, version])
            os.makedirs(folder, exist_ok=True)
            if not os.path.exists(header) or open(header).read() != text:
                with open(header, "w") as f:
                    f.write(text)
            stamp_path = header + ".stamp"
            if not (os.path.exists(header + ".gch") and os.path.exists(stamp_path) and open(stamp_path).read() == stamp):
                made = subprocess.run(cmd, capture_output=True, text=True)
                if made.returncode != 0:
                    print(f"WARNING: the precompiled torch headers did not build; compiling without them:\n"
                          f"{made.stderr[-2000:]}", file=sys.stderr)
                    return []
                with open(stamp_path, "w") as f:
                    f.write(stamp)
            return ["-include", header, "-Winvalid-pch"]

        @staticmethod
        def torch_default_std():
            """The -std= torch's BuildExtension appends to flags that have none, read from its
            source (it is a local function there); [] when that cannot be told."""
            import inspect
            import re
            from torch.utils.cpp_extension import BuildExtension
            found = set(re.findall(r"cpp_flag_prefix \+ '(c\+\+\d+)'", inspect.getsource(BuildExtension)))
            return [f"-std={found.pop()}"] if len(found) == 1 else []

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
                            extra_compile_args={"cxx": CXX_FLAGS, "nvcc": ["-O3", "-DTORCH_ASSERT_ONLY_METHOD_OPERATORS"]},
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
