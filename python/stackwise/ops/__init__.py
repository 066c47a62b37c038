"""Python entry points of the native ops (``torch.ops.stackwise.*``).

Each family's module holds the typed wrapper, the fake (meta) kernel for torch.compile and the
autograd registration whose backward calls the family's backward op. Plain-PyTorch oracles are in
:mod:`stackwise.ops.reference`.
"""

from __future__ import annotations

from stackwise.ops.attention import attention
from stackwise.ops.swiglu import swiglu

__all__ = ["attention", "swiglu"]
