"""Builds the optional C row kernels; everything else is in pyproject.toml.

One source, ``src/crossent/csrc/cpu_rows.c``, built once per instruction-set level: ``crossent._cpu_rows`` for
the compiler's default target (any architecture), and on x86-64 (GCC or clang) ``crossent._cpu_rows_v2`` /
``_v3`` / ``_v4`` at ``-march=x86-64-v2`` / ``-v3`` / ``-v4``. ``crossent.kernels.cpu_rows`` imports the highest
one the CPU and ``CROSSENT_CPU_CAPABILITY`` allow (``crossent._cpu_level``): the choice is ours, at load time,
not a compiler's multi-versioning resolver. tests/test_vectorization.py checks that each level's exp loops
vectorize.

``optional=True``: where no C compiler is found (or one cannot target a level) the install still succeeds without
that extension, and the CPU runs the next level down, or the same math in torch ops
(crossent.kernels.cpu_rows.available() says which).
"""

import platform
import sys

from setuptools import Extension, setup

SOURCE = ["src/crossent/csrc/cpu_rows.c"]
MSVC = sys.platform == "win32"
# -fopenmp: the row loops run in OpenMP regions on PyTorch's own libgomp (see the C file's header)
FLAGS = ["/O2", "/openmp"] if MSVC else ["-O3", "-fopenmp"]
LINK = [] if MSVC else ["-fopenmp"]
X86_64 = platform.machine().lower() in ("x86_64", "amd64") and not MSVC


def variant(name: str, march=None) -> Extension:
    """The kernels as ``crossent.<name>`` (its PyInit name set by CPU_ROWS_NAME), at ``-march=<march>`` if given."""
    arch = [] if march is None else [f"-march={march}"]
    define = "/D" if MSVC else "-D"
    return Extension(f"crossent.{name}", SOURCE, extra_compile_args=FLAGS + arch + [f"{define}CPU_ROWS_NAME={name}"],
                     extra_link_args=LINK, optional=True)  # fmt: skip


extensions = [variant("_cpu_rows")]
if X86_64:
    extensions += [variant(f"_cpu_rows_v{level}", f"x86-64-v{level}") for level in (2, 3, 4)]
setup(ext_modules=extensions)
