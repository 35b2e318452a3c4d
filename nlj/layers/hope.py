"""HOPE (Hope §8.3, eqs. 94-97), Hope-Attention (§8.3) and self-modifying Titans as families.

* ``self_mod_titans`` -- block = self-modifying Titans mixer + SwiGLU MLP.
* ``hope`` -- block = self-modifying Titans mixer -> Continuum Memory System (eq. 97), i.e. the
  Transformer MLP replaced by CMS levels that learn in context (:mod:`nlj.layers.cms`).
* ``hope_attention`` -- block = causal RoPE softmax attention -> CMS.

Family knobs come from ``ModelConfig.options`` (Table 6 ablations are one option away):

===========================  ========== ==========================================================
option                       default    meaning
===========================  ========== ==========================================================
``adaptive_q``               False      q from a memory instead of ``x W_q`` (§8 item 1)
``adaptive_k/v``             True       False: "w/o inner-projection k / v" (static projections)
``dgd``                      True       False: "w/o DGD" (plain GD inner rule)
``momentum``                 True       False: "w/o Momentum"
``weight_decay``             True       False: "w/o weight decay" (α = 1)
``memory_read``              boundary   main-memory read: ``boundary`` (eq. 90), ``before``,
                                        ``after``
``eta_scale``                1e-3       inner step ``η = softplus(M_η(x)) · eta_scale``
                                        (PAPER.md §3.6)
``memory_hidden_mult``       2.0        hidden width of the six memory MLPs / head_dim
``projection_checkpoint``    chunk      ``sub_chunk``: faster backward, more memory
                                        (:mod:`nlj.layers.selfmod`)
``cms``                      True       False: "w/o CMS" (a SwiGLU MLP instead)
``cms_lr``                   1e-3       in-context learning rate of every CMS level
``cms_variant``              sequential ``sequential``, ``nested`` or ``independent``
``cms_signal``               local      ``local`` or ``ntp`` (see :mod:`nlj.layers.cms`)
``cms_hidden_mult``          4/levels   hidden width of each CMS level / d_model: the levels
                                        share the parameter budget of the ``4 d`` MLP they replace
===========================  ========== ==========================================================

Chunk sizes come from ``ModelConfig.chunk`` (``C_memory``), ``chunk_others`` and ``cms_chunks``.
"""

from __future__ import annotations


import jax.numpy as jnp
from flax import nnx

from nlj.layers.attention import Attention
from nlj.layers.cms import CMSConfig, ContinuumMemory
from nlj.layers.selfmod import SelfModConfig, SelfModifyingTitans
from nlj.models.blocks import default_mlp
from nlj.models.configs import ModelConfig
from nlj.models.registry import register_family

__all__ = ["selfmod_config", "cms_config"]

_SELFMOD_OPTIONS = {"adaptive_q": "adaptive_q", "adaptive_k": "adaptive_k",
                    "adaptive_v": "adaptive_v", "dgd": "dgd", "momentum": "momentum",
                    "weight_decay": "weight_decay", "memory_read": "memory_read",
                    "eta_scale": "eta_scale", "memory_hidden_mult": "hidden_mult",
                    "beta": "beta", "projection_checkpoint": "projection_checkpoint"}
_CMS_OPTIONS = ("cms", "cms_lr", "cms_variant", "cms_signal", "cms_hidden_mult")


def selfmod_config(config: ModelConfig) -> SelfModConfig:
  """The self-modifying Titans mixer of ``config`` (chunks, conv, impl and options)."""
  options = dict(config.options)
  extra = {field: options[name] for name, field in _SELFMOD_OPTIONS.items() if name in options}
  return SelfModConfig(config.d_model, config.heads, chunk_memory=config.chunk,
                       chunk_other=config.chunk_others, conv=config.conv_width,
                       impl=config.impl, **extra)


def cms_config(config: ModelConfig) -> CMSConfig:
  """The CMS of ``config``: ``cms_chunks`` levels sharing one MLP's parameter budget."""
  options = dict(config.options)
  levels = len(config.cms_chunks)
  return CMSConfig(config.d_model, chunks=config.cms_chunks,
                   lrs=(float(options.get("cms_lr", 1e-3)),) * levels,
                   hidden_mult=float(options.get("cms_hidden_mult", 4.0 / levels)),
                   variant=options.get("cms_variant", "sequential"),
                   signal=options.get("cms_signal", "local"))


def _make_selfmod(config: ModelConfig, layer: int, rngs: nnx.Rngs) -> SelfModifyingTitans:
  return SelfModifyingTitans(selfmod_config(config), rngs, jnp.dtype(config.dtype),
                             jnp.dtype(config.param_dtype))


def _make_attention(config: ModelConfig, layer: int, rngs: nnx.Rngs) -> Attention:
  return Attention(config.d_model, config.heads, dtype=jnp.dtype(config.dtype),
                   param_dtype=jnp.dtype(config.param_dtype), rngs=rngs)


def _make_cms(config: ModelConfig, layer: int, rngs: nnx.Rngs):
  if not dict(config.options).get("cms", True):
    return default_mlp(config, layer, rngs)
  return ContinuumMemory(cms_config(config), rngs, jnp.dtype(config.param_dtype))


register_family("self_mod_titans", _make_selfmod, options=tuple(_SELFMOD_OPTIONS))
register_family("hope", _make_selfmod, _make_cms, tuple(_SELFMOD_OPTIONS) + _CMS_OPTIONS)
register_family("hope_attention", _make_attention, _make_cms, _CMS_OPTIONS)
