"""Pallas kernels for nlj's memory updates, importable as ``nlj_kernels``.

The folder is named ``kernels/`` in the repository; setup.cfg maps it to the package name
``nlj_kernels`` because a PyPI package called ``kernels`` already exists. Each op lives in its own
sub-package (contract and reference, chunked JAX form, Pallas backends, custom VJP, tests,
benchmark) and registers its backends with :func:`nlj.core.dispatch.register_kernel`.
"""

from nlj_kernels import matrix_memory  # noqa: E402,F401  (registers its kernel)
from nlj_kernels import mlp_memory  # noqa: E402,F401  (registers its kernel)
