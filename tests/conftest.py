"""Shared test setup: CPU only, small shapes."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Compilation dominates CPU test time and tests compare with tolerances: use XLA's cheaper CPU
# optimisation level for the whole suite.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0 "
                      "--xla_llvm_disable_expensive_passes=true")
