"""``SwiGLUFFN``: down(silu(gate(x)) · up(x)) (Shazeer 2020) on the native SwiGLU op.

With ``freeze_up_proj=True`` the up projection is a fixed random feature map: initialised from
``seed`` (independent of the global RNG) and never trained; gate and down train.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stackwise.exceptions import ModelError
from stackwise.ops import swiglu


class SwiGLUFFN(nn.Module):
    """x [..., d_model] -> [..., d_model] through a SwiGLU hidden layer of width ``d_ff``."""

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        freeze_up_proj: bool = False,
        bias: bool = False,
        dropout: float = 0.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if d_model <= 0 or d_ff <= 0:
            raise ModelError(f"SwiGLUFFN: d_model and d_ff must be positive, got {d_model}, {d_ff}")
        self.d_model, self.d_ff = d_model, d_ff
        self.gate_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.up_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.down_proj = nn.Linear(d_ff, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.freeze_up_proj = freeze_up_proj
        self.reference = False  # plain PyTorch silu(gate) * up instead of the native op
        if freeze_up_proj:
            gen = torch.Generator().manual_seed(seed)
            bound = 1.0 / math.sqrt(d_model)
            with torch.no_grad():
                self.up_proj.weight.copy_(
                    (torch.rand(d_ff, d_model, generator=gen) * 2 - 1) * bound
                )
                if bias:
                    self.up_proj.bias.zero_()
            self.up_proj.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)
        hidden = F.silu(gate) * up if self.reference else swiglu(gate, up)
        return self.dropout(self.down_proj(hidden))
