"""Builds the optional C row kernels (crossent._cpu_rows); everything else is in pyproject.toml.

``optional=True``: where no C compiler is found the install still succeeds, and the CPU runs the same math in
torch ops (crossent.kernels.cpu_rows.available() says which).
"""

import sys

from setuptools import Extension, setup

# -fopenmp: the row loops run in OpenMP regions on PyTorch's own libgomp (see the C file's header)
flags = ["/O2", "/openmp"] if sys.platform == "win32" else ["-O3", "-fopenmp"]
link = [] if sys.platform == "win32" else ["-fopenmp"]
setup(ext_modules=[Extension("crossent._cpu_rows", ["src/crossent/csrc/cpu_rows.c"], extra_compile_args=flags,
                             extra_link_args=link, optional=True)])
