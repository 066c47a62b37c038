"""Feature maps phi of kernel (linear) attention: k(x, y) ~ phi(x) . phi(y).

``stackwise.ops.linear_attention(phi(q), phi(k), v)`` normalises by ``phi(q[s]) . sum_t phi(k[t])``,
which must stay >= 0; every map here guarantees that (``FeatureMap.non_negative``) except the
plain trigonometric random Fourier features (``GaussianRandomFeatures(positive=False)``), kept for
kernel approximation.

- ``elu``:      phi(x) = elu(x) + 1 > 0 (Katharopoulos et al. 2020, "Transformers are RNNs").
- ``relu``:     phi(x) = relu(x) >= 0.
- ``softmax``:  FAVOR+ positive orthogonal random features (Choromanski et al. 2021,
  "Rethinking Attention with Performers", Lemma 1): phi(x) = exp(W x - |x|^2 / 2) / sqrt(m),
  E[phi(x) . phi(y)] = exp(x . y). Scale q and k by d^-1/4 beforehand for softmax attention.
- ``gaussian``: k(x, y) = exp(-|x - y|^2 / (2 sigma^2)). Default positive random features
  phi(x) = exp(W x~ - |x~|^2) / sqrt(m), x~ = x / sigma (the FAVOR+ identity times
  exp(-|x~|^2 / 2) exp(-|y~|^2 / 2)); ``positive=False`` gives the random Fourier features of
  Rahimi & Recht 2007, sqrt(2/m) [cos(W x~), sin(W x~)], bounded but of either sign.
- ``laplacian``: k(x, y) = exp(-|x - y|_1 / sigma). Random Fourier features with frequencies
  from a standard Cauchy distribution (the kernel's Fourier transform), made non-negative by the
  shift phi'(x) = [phi(x), 1] / sqrt(2): phi'(x) . phi'(y) = (1 + k^(x, y)) / 2 in [0, 1] since
  |phi(x)| = 1. The attention weights are then (1 + k) / 2, a kernel of the same order.

The exponential (positive) features underflow to 0 for inputs far from the origin relative to the
kernel's scale (|x|^2 / sigma^2 above ~100 in float32): such a row attends to nothing and the
linear-attention output there is 0 / eps = 0; scale queries and keys (or sigma) accordingly.

Random projections are buffers drawn from ``torch.Generator().manual_seed(seed)`` in float64:
the same seed gives the same projection on every run, whatever the global RNG state. Maps compute
in float32 (float64 for float64 inputs) and return the input's dtype; input ``[..., head_dim]``,
output ``[..., out_dim]``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stackwise.exceptions import ConfigurationError

FEATURE_MAP_TYPES = ("elu", "relu", "gaussian", "softmax", "laplacian")


def _acc(x: Tensor) -> Tensor:
    return x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)


def _gaussian_orthogonal(rows: int, dim: int, gen: torch.Generator) -> Tensor:
    """``rows x dim`` matrix whose blocks of ``dim`` rows are orthogonal, with row norms of
    independent gaussian vectors (FAVOR+ orthogonal random features, Choromanski et al. 2021)."""
    blocks = []
    for _ in range(math.ceil(rows / dim)):
        g = torch.randn(dim, dim, generator=gen, dtype=torch.float64)
        q, _ = torch.linalg.qr(g)
        blocks.append(q.T)
    w = torch.cat(blocks)[:rows]
    norms = torch.randn(rows, dim, generator=gen, dtype=torch.float64).norm(dim=1, keepdim=True)
    return w * norms


class FeatureMap(nn.Module):
    """Base class: ``in_dim`` -> ``out_dim`` features; ``non_negative`` when phi(x) >= 0."""

    non_negative: bool = True

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.out_dim = out_dim

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, out_dim={self.out_dim}"


class EluFeatureMap(FeatureMap):
    """``elu(x) + 1``, positive (exp(x) underflows only below x ~ -87); ``out_dim == head_dim``."""

    def __init__(self, head_dim: int) -> None:
        super().__init__(head_dim, head_dim)

    def forward(self, x: Tensor) -> Tensor:
        # exp(x) for x <= 0 instead of (exp(x) - 1) + 1, which rounds to 0 in bf16/fp16.
        return torch.where(x > 0, x + 1.0, torch.exp(torch.clamp(x, max=0.0)))


class ReluFeatureMap(FeatureMap):
    """``relu(x)``, non-negative (a row may be all zero); ``out_dim == head_dim``."""

    def __init__(self, head_dim: int) -> None:
        super().__init__(head_dim, head_dim)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x)


class SoftmaxRandomFeatures(FeatureMap):
    """FAVOR+ positive orthogonal random features: ``E[phi(x) . phi(y)] = exp(x . y)``."""

    def __init__(self, head_dim: int, kernel_dim: int, seed: int = 0) -> None:
        super().__init__(head_dim, kernel_dim)
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("projection", _gaussian_orthogonal(kernel_dim, head_dim, gen).float())

    def forward(self, x: Tensor) -> Tensor:
        xa = _acc(x)
        w = self.projection.to(xa.dtype)
        logits = xa @ w.T - 0.5 * (xa * xa).sum(-1, keepdim=True)
        return (torch.exp(logits) / math.sqrt(self.out_dim)).to(x.dtype)


class GaussianRandomFeatures(FeatureMap):
    """Random features of the gaussian kernel ``exp(-|x - y|^2 / (2 sigma^2))``.

    ``positive=True`` (default, for attention): ``exp(W x~ - |x~|^2) / sqrt(m)``, unbiased and > 0.
    ``positive=False``: trigonometric random Fourier features, unbiased, bounded, either sign;
    ``kernel_dim`` must then be even (cos and sin of ``kernel_dim / 2`` frequencies).
    """

    def __init__(
        self,
        head_dim: int,
        kernel_dim: int,
        sigma: float = 1.0,
        seed: int = 0,
        positive: bool = True,
    ) -> None:
        if not positive and kernel_dim % 2:
            raise ConfigurationError(
                f"trigonometric features need an even kernel_dim, got {kernel_dim}", "kernel_dim"
            )
        super().__init__(head_dim, kernel_dim)
        self.sigma = float(sigma)
        self.positive = positive
        self.non_negative = positive
        gen = torch.Generator().manual_seed(seed)
        rows = kernel_dim if positive else kernel_dim // 2
        self.register_buffer("projection", _gaussian_orthogonal(rows, head_dim, gen).float())

    def forward(self, x: Tensor) -> Tensor:
        xa = _acc(x) / self.sigma
        proj = xa @ self.projection.to(xa.dtype).T
        if self.positive:
            out = torch.exp(proj - (xa * xa).sum(-1, keepdim=True)) / math.sqrt(self.out_dim)
        else:
            scale = math.sqrt(2.0 / self.out_dim)
            out = torch.cat([torch.cos(proj), torch.sin(proj)], dim=-1) * scale
        return out.to(x.dtype)


class LaplacianRandomFeatures(FeatureMap):
    """Random Fourier features of ``exp(-|x - y|_1 / sigma)`` (Cauchy frequencies).

    ``shift=True`` (default, for attention) appends a constant and rescales, so that
    ``phi(x) . phi(y) = (1 + k^(x, y)) / 2 >= 0``; ``out_dim = kernel_dim + 1``. ``shift=False``
    gives the plain features, ``phi(x) . phi(y) = k^(x, y)``, ``out_dim = kernel_dim``.
    ``kernel_dim`` must be even.
    """

    def __init__(
        self, head_dim: int, kernel_dim: int, sigma: float = 1.0, seed: int = 0, shift: bool = True
    ) -> None:
        if kernel_dim % 2:
            raise ConfigurationError(
                f"laplacian features need an even kernel_dim, got {kernel_dim}", "kernel_dim"
            )
        super().__init__(head_dim, kernel_dim + 1 if shift else kernel_dim)
        self.sigma = float(sigma)
        self.shift = shift
        self.non_negative = shift
        self.num_frequencies = kernel_dim // 2
        gen = torch.Generator().manual_seed(seed)
        u = torch.rand(self.num_frequencies, head_dim, generator=gen, dtype=torch.float64)
        self.register_buffer("projection", torch.tan(math.pi * (u - 0.5)).float())

    def forward(self, x: Tensor) -> Tensor:
        xa = _acc(x) / self.sigma
        proj = xa @ self.projection.to(xa.dtype).T
        feats = torch.cat([torch.cos(proj), torch.sin(proj)], dim=-1)
        feats = feats / math.sqrt(self.num_frequencies)
        if self.shift:
            ones = torch.ones_like(feats[..., :1])
            feats = torch.cat([feats, ones], dim=-1) / math.sqrt(2.0)
        return feats.to(x.dtype)


def make_feature_map(kernel_type: str, head_dim: int, kernel_dim: int, seed: int = 0) -> nn.Module:
    """The feature map for ``kernel_type`` in :data:`FEATURE_MAP_TYPES`.

    ``elu`` and ``relu`` ignore ``kernel_dim`` (``out_dim == head_dim``); the random-feature maps
    draw their projection from ``seed``. Raises :class:`ConfigurationError` (a ``ValueError``)
    naming the key ``kernel_type`` for an unknown type.
    """
    if kernel_type == "elu":
        return EluFeatureMap(head_dim)
    if kernel_type == "relu":
        return ReluFeatureMap(head_dim)
    if kernel_type == "softmax":
        return SoftmaxRandomFeatures(head_dim, kernel_dim, seed=seed)
    if kernel_type == "gaussian":
        return GaussianRandomFeatures(head_dim, kernel_dim, seed=seed)
    if kernel_type == "laplacian":
        return LaplacianRandomFeatures(head_dim, kernel_dim, seed=seed)
    raise ConfigurationError(
        f"unknown kernel type {kernel_type!r}; expected one of {', '.join(FEATURE_MAP_TYPES)}",
        "kernel_type",
    )
