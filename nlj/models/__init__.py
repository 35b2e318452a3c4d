"""Decoder language models over registered block families, presets and streaming decoding.

A *family* (``register_family``) names a block's token mixer and MLP; ``ModelConfig`` chooses
families per layer, widths and chunk sizes; ``PRESETS[(family, size)]`` holds the paper's sizes;
``build_model(config, rngs)`` returns a :class:`DecoderLM` following the streaming contract of
:mod:`nlj.layers`. ``python -m nlj.models`` prints the preset parameter table.
"""

from nlj.models.blocks import Block, swiglu_hidden
from nlj.models.configs import DTYPES, PRESET_FAMILIES, PRESETS, SIZES, TARGET_PARAMS, ModelConfig
from nlj.models.decoding import generate
from nlj.models.lm import DecoderLM, build_model
from nlj.models.registry import families, register_family
from nlj.models.summary import count_params

__all__ = ["Block", "DecoderLM", "DTYPES", "ModelConfig", "PRESETS", "PRESET_FAMILIES", "SIZES",
           "TARGET_PARAMS", "build_model", "count_params", "families", "generate",
           "register_family", "swiglu_hidden"]
