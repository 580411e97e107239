"""Builds the fused C kernels; the rest of the package is in pyproject.toml.

- ``model._exact_kernels``, the reproducible entropy path: the flags are part of the arithmetic
  (model/_exact_kernels.c says why): no FMA contraction and no fast-math, so the kernels give the
  bits of model/fixedpoint.py's PyTorch reference.
- ``model._transform_kernels``, g_a and g_s (fast float arithmetic, model/transform_kernels.py).

OpenMP links against libgomp.so.1, which torch itself ships and has loaded by the time the
extensions are imported.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "model._exact_kernels",
            sources=["model/_exact_kernels.c"],
            extra_compile_args=["-O3", "-fopenmp", "-ffp-contract=off", "-fno-fast-math", "-fno-math-errno"],
            extra_link_args=["-fopenmp"],
        ),
        Extension(
            "model._transform_kernels",
            sources=["model/_transform_kernels.c"],
            extra_compile_args=["-O3", "-fopenmp", "-fno-math-errno"],
            extra_link_args=["-fopenmp"],
        ),
    ]
)
