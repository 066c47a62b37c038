"""Feature maps of kernel attention: the factory, seeded determinism, the sign guarantees the
linear-attention normaliser relies on, and (statistically, with fixed seeds) that the random
features approximate their kernels."""

from __future__ import annotations

import pytest
import torch

import stackwise
from stackwise.exceptions import ConfigurationError
from stackwise.model import (
    FEATURE_MAP_TYPES,
    EluFeatureMap,
    GaussianRandomFeatures,
    LaplacianRandomFeatures,
    ReluFeatureMap,
    SoftmaxRandomFeatures,
    make_feature_map,
)

HEAD_DIM = 16


def _points(n: int, scale: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, HEAD_DIM, generator=gen, dtype=torch.float64) * scale


def _gram(fmap, x, y):
    fmap = fmap.double()
    return fmap(x) @ fmap(y).T


@pytest.mark.parametrize(
    ("kind", "cls", "out_dim"),
    [
        ("elu", EluFeatureMap, HEAD_DIM),
        ("relu", ReluFeatureMap, HEAD_DIM),
        ("softmax", SoftmaxRandomFeatures, 32),
        ("gaussian", GaussianRandomFeatures, 32),
        ("laplacian", LaplacianRandomFeatures, 33),
    ],
)
def test_factory_builds_each_kind(kind, cls, out_dim):
    fmap = make_feature_map(kind, HEAD_DIM, 32, seed=3)
    assert isinstance(fmap, cls) and isinstance(fmap, torch.nn.Module)
    x = torch.randn(2, 3, 5, HEAD_DIM)
    out = fmap(x)
    assert out.shape == (2, 3, 5, out_dim) == (*x.shape[:-1], fmap.out_dim)
    assert out.dtype == x.dtype


def test_factory_rejects_unknown_kind():
    with pytest.raises(ConfigurationError, match="kernel_type: unknown kernel type 'cosine'"):
        make_feature_map("cosine", HEAD_DIM, 32)
    with pytest.raises(ValueError, match="kernel_type"):
        make_feature_map("ELU", HEAD_DIM, 32)


def test_odd_kernel_dim_for_trigonometric_features_is_rejected():
    with pytest.raises(ConfigurationError, match="kernel_dim: .*even kernel_dim, got 7"):
        LaplacianRandomFeatures(HEAD_DIM, 7)
    with pytest.raises(ConfigurationError, match="kernel_dim"):
        GaussianRandomFeatures(HEAD_DIM, 7, positive=False)


@pytest.mark.parametrize("kind", ["softmax", "gaussian", "laplacian"])
def test_projection_is_a_seeded_buffer(kind):
    torch.manual_seed(1)
    a = make_feature_map(kind, HEAD_DIM, 32, seed=7)
    torch.manual_seed(2)  # the global RNG must not matter
    torch.randn(100)
    b = make_feature_map(kind, HEAD_DIM, 32, seed=7)
    c = make_feature_map(kind, HEAD_DIM, 32, seed=8)
    assert torch.equal(a.projection, b.projection)
    assert not torch.equal(a.projection, c.projection)
    assert "projection" in a.state_dict()
    assert not any(True for _ in a.parameters())  # fixed, not trained
    x = torch.randn(4, HEAD_DIM)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


@pytest.mark.parametrize("kind", FEATURE_MAP_TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_features_keep_the_normaliser_non_negative(kind, dtype):
    fmap = make_feature_map(kind, HEAD_DIM, 64, seed=0)
    assert fmap.non_negative
    x = (torch.randn(3, 200, HEAD_DIM, generator=torch.Generator().manual_seed(0)) * 2).to(dtype)
    out = fmap(x)
    assert torch.isfinite(out).all()
    if kind == "elu":
        assert (out > 0).all()
    elif kind == "laplacian":  # shifted trigonometric features: only the products are >= 0
        gram = out.double() @ out.double().transpose(-1, -2)
        assert (gram >= -1e-2 if dtype == torch.bfloat16 else gram >= -1e-12).all()
    else:  # exp features may underflow to 0 far from the origin, never below
        assert (out >= 0).all()


@pytest.mark.parametrize("kind", FEATURE_MAP_TYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_linear_attention_normaliser_with_each_map(kind, causal):
    fmap = make_feature_map(kind, HEAD_DIM, 64, seed=0)
    gen = torch.Generator().manual_seed(1)
    q, k = (torch.randn(1, 2, 50, HEAD_DIM, generator=gen) for _ in range(2))
    v = torch.randn(1, 2, 50, 8, generator=gen)
    scores = fmap(q) @ fmap(k).transpose(-1, -2)  # the normaliser is a sum of these
    if causal:
        scores = torch.tril(scores)
    assert (scores.sum(-1) >= -1e-6).all()
    out = stackwise.ops.linear_attention(fmap(q), fmap(k), v, causal=causal)
    assert torch.isfinite(out).all()


def test_elu_and_relu_values():
    x = torch.tensor([-2.0, -0.5, 0.0, 0.5, 3.0])
    torch.testing.assert_close(EluFeatureMap(5)(x), torch.nn.functional.elu(x) + 1)
    torch.testing.assert_close(ReluFeatureMap(5)(x), torch.relu(x))


def test_favor_plus_approximates_exp_dot():
    # |x| ~ 1 (queries and keys scaled by d^-1/4 as in softmax attention).
    x, y = _points(64, 0.25, 1), _points(64, 0.25, 2)
    exact = torch.exp(x @ y.T)
    err = {
        m: (_gram(SoftmaxRandomFeatures(HEAD_DIM, m, seed=0), x, y) - exact).norm()
        for m in (256, 4096)
    }
    assert err[4096] / exact.norm() < 0.1
    assert err[4096] < err[256]


def test_gaussian_random_features_approximate_the_gaussian_kernel():
    sigma = 2.0
    x = _points(64, 0.5, 3)
    y = torch.cat([x[:32] + _points(32, 0.3, 4), _points(32, 0.5, 5)])  # near and far pairs
    exact = torch.exp(-(torch.cdist(x, y) ** 2) / (2 * sigma**2))
    trig = _gram(GaussianRandomFeatures(HEAD_DIM, 4096, sigma, seed=0, positive=False), x, y)
    assert (trig - exact).abs().max() < 0.05
    small = _gram(GaussianRandomFeatures(HEAD_DIM, 256, sigma, seed=0, positive=False), x, y)
    assert (trig - exact).norm() < (small - exact).norm()
    positive = _gram(GaussianRandomFeatures(HEAD_DIM, 4096, sigma, seed=0), x, y)
    assert (positive > 0).all()
    assert (positive - exact).norm() / exact.norm() < 0.12


def test_laplacian_random_features_approximate_the_laplacian_kernel():
    sigma = 2.0
    x = _points(64, 0.5, 6)
    y = torch.cat([x[:32] + _points(32, 0.3, 7), _points(32, 0.5, 8)])
    exact = torch.exp(-torch.cdist(x, y, p=1) / sigma)
    plain = _gram(LaplacianRandomFeatures(HEAD_DIM, 4096, sigma, seed=0, shift=False), x, y)
    assert (plain - exact).abs().max() < 0.08
    shifted = _gram(LaplacianRandomFeatures(HEAD_DIM, 4096, sigma, seed=0), x, y)
    torch.testing.assert_close(shifted, (1 + plain) / 2)  # same seed, same frequencies
    assert (shifted >= 0).all()


@pytest.mark.parametrize("kind", FEATURE_MAP_TYPES)
def test_feature_maps_are_differentiable(kind):
    fmap = make_feature_map(kind, HEAD_DIM, 8, seed=0).double()
    x = _points(5, 0.5, 9).requires_grad_(True)
    assert torch.autograd.gradcheck(fmap, (x,))
