"""Model building blocks: layers (MLGKA attention, SwiGLU FFN, lexical kernel), quantized linear
layers, feature maps of kernel attention."""

from __future__ import annotations

from stackwise.model.architecture import Block, Rack, Stack, create_gpt2_model, load_rack, save_rack
from stackwise.model.feature_maps import (
    FEATURE_MAP_TYPES,
    EluFeatureMap,
    FeatureMap,
    GaussianRandomFeatures,
    LaplacianRandomFeatures,
    ReluFeatureMap,
    SoftmaxRandomFeatures,
    make_feature_map,
)
from stackwise.model.ffn import SwiGLUFFN
from stackwise.model.lexical import LexicalKernelManager
from stackwise.model.mlgka import MLGKALayer
from stackwise.model.quantized import QuantizedLinear

__all__ = [
    "Block",
    "FEATURE_MAP_TYPES",
    "MLGKALayer",
    "Rack",
    "Stack",
    "create_gpt2_model",
    "load_rack",
    "save_rack",
    "EluFeatureMap",
    "FeatureMap",
    "GaussianRandomFeatures",
    "LaplacianRandomFeatures",
    "LexicalKernelManager",
    "QuantizedLinear",
    "ReluFeatureMap",
    "SoftmaxRandomFeatures",
    "SwiGLUFFN",
    "make_feature_map",
]
