"""Build script. Metadata lives in pyproject.toml; this file adds the optional C++ extension
`dsd_kernels._C` (csrc/): CPU kernels for the `cpp` backend.

DSD_KERNELS_BUILD_EXT=auto (default) builds it when torch and a C++ compiler are present and
falls back to the pure-Python package if the build fails; 1 makes a failure fatal; 0 skips it.
Build against the installed torch: `pip install --no-build-isolation .`.
"""
import glob
import os
import sys

from setuptools import setup

MODE = os.environ.get("DSD_KERNELS_BUILD_EXT", "auto").strip().lower()
if MODE not in ("auto", "0", "1"):
    sys.exit(f"DSD_KERNELS_BUILD_EXT must be auto, 0 or 1, got {MODE!r}")


def extension_setup():
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    class OptionalBuild(BuildExtension):
        def run(self):
            try:
                super().run()
            except Exception as err:  # noqa: BLE001 - any build failure: fall back, loudly
                if MODE == "1":
                    raise
                print(f"WARNING: dsd_kernels._C was not built ({err}); the package falls back "
                      f"to its torch and Triton backends (see `dsd-kernels info`)", file=sys.stderr)

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    ext = CppExtension("dsd_kernels._C", sources,
                       extra_compile_args=["-O3", "-fopenmp", "-std=c++17"],
                       extra_link_args=["-fopenmp"])
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
