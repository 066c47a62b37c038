"""The layers of a stackwise model (documented import path ``stackwise.model.layers``)."""

from __future__ import annotations

from stackwise.model.ffn import SwiGLUFFN
from stackwise.model.lexical import LexicalKernelManager

__all__ = ["LexicalKernelManager", "SwiGLUFFN"]
