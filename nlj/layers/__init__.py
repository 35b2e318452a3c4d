"""Sequence mixers and blocks as Flax NNX modules (pure JAX inside).

Every token mixer follows one streaming contract:

* ``init_cache(batch, max_len) -> cache`` -- the carried state of a fresh sequence (fast-memory
  states, partial-chunk anchors, conv tails, KV caches); a pytree of arrays, float32 states.
  ``max_len`` bounds the positions a KV cache can hold; recurrent mixers ignore it.
* ``__call__(x, cache=None) -> (y, cache)`` -- ``x, y [batch, seq, d_model]``; ``cache=None``
  starts a fresh sequence. Running a sequence in one call equals running it in pieces of any
  lengths with the returned cache.

Parameters live in the NNX modules; caches are explicit pytrees so they can be carried through
``lax.scan``, jit and sharding without touching module state.
"""

from nlj.layers.cms import CMSConfig, ContinuumMemory
from nlj.layers.common import GatedRMSNorm, RMSNorm, ShortConv, SwiGLU, l2_normalize
from nlj.layers.recurrent import DeltaNet, GatedDeltaNet, LinearAttention
from nlj.layers.selfmod import SelfModConfig, SelfModifyingTitans

__all__ = ["CMSConfig", "ContinuumMemory", "DeltaNet", "GatedDeltaNet", "GatedRMSNorm",
           "LinearAttention", "RMSNorm", "SelfModConfig", "SelfModifyingTitans", "ShortConv",
           "SwiGLU", "l2_normalize"]
