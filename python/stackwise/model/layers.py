"""The layers of a stackwise model (documented import path ``stackwise.model.layers``)."""

from __future__ import annotations

from stackwise.model.attention import Attention, RMSNorm
from stackwise.model.ffn import SwiGLUFFN
from stackwise.model.lexical import LexicalKernelManager
from stackwise.model.mlgka import MLGKALayer

__all__ = ["Attention", "LexicalKernelManager", "MLGKALayer", "RMSNorm", "SwiGLUFFN"]
