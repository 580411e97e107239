"""Builds the fused C kernels of the reproducible entropy path; the rest of the package is in pyproject.toml.

The flags are part of the arithmetic (model/_exact_kernels.c says why): no FMA contraction and no
fast-math, so the kernels give the bits of model/fixedpoint.py's PyTorch reference. OpenMP links
against libgomp.so.1, which torch itself ships and has loaded by the time the extension is imported.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "model._exact_kernels",
            sources=["model/_exact_kernels.c"],
            extra_compile_args=["-O3", "-fopenmp", "-ffp-contract=off", "-fno-fast-math", "-fno-math-errno"],
            extra_link_args=["-fopenmp"],
        )
    ]
)
