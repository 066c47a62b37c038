"""Model building blocks: feature maps of kernel (linear) attention; later layers and racks."""

from __future__ import annotations

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

__all__ = [
    "FEATURE_MAP_TYPES",
    "EluFeatureMap",
    "FeatureMap",
    "GaussianRandomFeatures",
    "LaplacianRandomFeatures",
    "ReluFeatureMap",
    "SoftmaxRandomFeatures",
    "make_feature_map",
]
