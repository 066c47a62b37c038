"""Python entry points of the native ops (``torch.ops.stackwise.*``).

Each family's module holds the typed wrapper, the fake (meta) kernel for torch.compile and the
autograd registration whose backward calls the family's backward op. Plain-PyTorch oracles are in
:mod:`stackwise.ops.reference`.
"""

from __future__ import annotations

from stackwise.ops.rms_norm import rms_norm
from stackwise.ops.rope import rope, rope_tables
from stackwise.ops.swiglu import swiglu

__all__ = ["rms_norm", "rope", "rope_tables", "swiglu"]
