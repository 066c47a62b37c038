"""Model building blocks."""

from __future__ import annotations

from stackwise.model.ffn import SwiGLUFFN
from stackwise.model.lexical import LexicalKernelManager
from stackwise.model.quantized import QuantizedLinear

__all__ = ["LexicalKernelManager", "QuantizedLinear", "SwiGLUFFN"]
