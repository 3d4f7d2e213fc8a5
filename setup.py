"""Builds csrc/ into the aosae._C extension (C++17, OpenMP) with torch's extension tooling.

Build it against the torch you run with:  pip install --no-build-isolation -e .
(an isolated build would download a different, multi-GB torch).
"""
import glob
import os
import sys

from setuptools import setup

try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:  # pragma: no cover - exercised only on a machine without torch
    sys.exit(
        "aosae: building the C++ extension needs torch installed first.\n"
        "  pip install torch   (CPU-only machines here: pip install torch==2.13.0)\n"
        "  pip install --no-build-isolation -e ."
    )

openmp = [] if sys.platform == "darwin" else ["-fopenmp"]
# no fused multiply-add: a sum's bits must not depend on the vector width (csrc/block_product.h)
extra_compile = ["-O3", "-std=c++17", "-ffp-contract=off", *openmp]
if os.environ.get("AOSAE_NATIVE", "0") == "1":  # opt-in: tune for the build machine only
    extra_compile.append("-march=native")

setup(
    ext_modules=[
        CppExtension(
            "aosae._C",
            sources=sorted(glob.glob("csrc/*.cpp")),
            extra_compile_args=extra_compile,
            extra_link_args=openmp,
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
