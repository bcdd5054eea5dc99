"""Closed-form checks of the super-resolution measurements."""
import math

import pytest
import torch
import torch.nn.functional as F

from reflow_core import sr


def test_avgpool_A_At_is_identity_and_shapes():
    y = torch.randn(5, 3, 4, 4)
    up = sr.lift(y, 2)
    assert up.shape == (5, 3, 8, 8)
    assert torch.allclose(sr.degrade(up, 2), y, atol=1e-6)
    # A is the block mean: check one block by hand
    x = torch.randn(1, 1, 8, 8)
    assert torch.allclose(sr.degrade(x, 4)[0, 0, 1, 0], x[0, 0, 4:8, 0:4].mean(), atol=1e-6)


def test_bicubic_shapes_and_constants_survive():
    x = torch.full((2, 1, 8, 8), 0.3)
    y = sr.degrade(x, 2, "bicubic")
    assert y.shape == (2, 1, 4, 4) and torch.allclose(y, torch.full_like(y, 0.3), atol=1e-5)
    assert torch.allclose(sr.lift(y, 2, "bicubic"), x, atol=1e-5)


def test_measurement_noise_and_source_variance():
    x, n = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 4, 4)
    assert torch.allclose(sr.measure(x, n, 2, sigma_y=0.1), F.avg_pool2d(x, 2) + 0.1 * n)
    g = torch.Generator().manual_seed(0)
    c, eps = torch.randn(200_000, generator=g), torch.randn(200_000, generator=g)
    s = sr.source(c, eps, 0.2)
    assert abs(s.var().item() - 1.0) < 0.01  # 0.96 + 0.04 for independent unit-variance c, eps
    assert torch.allclose(sr.source(c, eps, 0.0), c) and torch.allclose(sr.source(c, eps, 1.0), eps)
    assert math.isclose(torch.corrcoef(torch.stack([s, c]))[0, 1].item(), math.sqrt(0.96), abs_tol=0.01)


def test_refused_inputs():
    with pytest.raises(ValueError, match="multiples"):
        sr.degrade(torch.randn(1, 1, 7, 7), 2)
    with pytest.raises(ValueError, match="unknown degradation"):
        sr.lift(torch.randn(1, 1, 4, 4), 2, "lanczos")
    with pytest.raises(ValueError, match="expected"):
        sr.measure(torch.randn(1, 1, 8, 8), torch.randn(1, 1, 8, 8), 2)
