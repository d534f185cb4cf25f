"""Build script. Metadata lives in pyproject.toml; this file exists so that the optional
C++/CUDA extension (csrc/, dsd_kernels._C) can be added with torch's BuildExtension."""
from setuptools import setup

setup()
