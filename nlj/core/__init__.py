"""Core NL vocabulary: memories, objectives, rules, levels and their nesting.

A level is a memory (:mod:`~nlj.core.memories`) trained in context on an internal objective
(:mod:`~nlj.core.objectives`) by an inner optimizer (:mod:`~nlj.core.rules`) once per chunk
(:mod:`~nlj.core.level`); levels nest by frequency (:mod:`~nlj.core.nesting`). Every level runs
as a token-by-token reference, a chunk-parallel JAX form or a registered kernel
(:mod:`~nlj.core.dispatch`).
"""

from nlj.core.compositions import (deltanet, dgd_memory, gated_deltanet, linear_attention,
                                   titans_memory)
from nlj.core.dispatch import IMPLS, Kernel, register_kernel, registered_kernels
from nlj.core.level import Level, LevelInputs, LevelState
from nlj.core.memories import ACTIVATIONS, MatrixMemory, Memory, MLPMemory
from nlj.core.nesting import run_nested
from nlj.core.objectives import (L2, DotProduct, Huber, Lp, Objective, get_objective,
                                 memory_grad)
from nlj.core.rules import Rule, newton_schulz

__all__ = [
    "ACTIVATIONS", "IMPLS", "DotProduct", "Huber", "Kernel", "L2", "Level", "LevelInputs",
    "LevelState", "Lp", "MLPMemory", "MatrixMemory", "Memory", "Objective", "Rule", "deltanet",
    "dgd_memory", "gated_deltanet", "get_objective", "linear_attention", "memory_grad",
    "newton_schulz", "register_kernel", "registered_kernels", "run_nested", "titans_memory",
]
