"""Shared test settings for the model tests."""

# XLA's cheaper CPU optimisation for test jits: compilation dominates CPU test time, and the
# tests compare results with tolerances.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
