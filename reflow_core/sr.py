"""Super-resolution measurements (OFTSR, Zhu et al. 2024) in our convention: the degradation A, its adjoint-like
A^T, the measurement y = A x + sigma_y n, the condition c = A^T y and the flow's source (our t = 1 end)
x_src = sqrt(1 - sigma_p^2) c + sigma_p eps.

A: average pooling by `scale` ("avgpool", the default) or bicubic downsampling ("bicubic"). A^T: nearest upsampling
for avgpool, so A A^T = I exactly (a low-res image survives the round trip); bicubic upsampling for bicubic
(torch.nn.functional.interpolate, antialiased down). Noise is passed in, never drawn here, so callers seed it per
row (`reflow_core.rng.row_noise`) and a row's source does not depend on the batch.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DEGRADATIONS = ("avgpool", "bicubic")


def check_degradation(degradation: str, scale: int) -> None:
    if degradation not in DEGRADATIONS:
        raise ValueError(f"unknown degradation {degradation!r}; choose one of {DEGRADATIONS}")
    if int(scale) < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")


def degrade(x: torch.Tensor, scale: int, degradation: str = "avgpool") -> torch.Tensor:
    """A x: (B, C, H, W) -> (B, C, H / scale, W / scale); H and W must be multiples of scale."""
    check_degradation(degradation, scale)
    if x.ndim != 4 or x.shape[-1] % scale or x.shape[-2] % scale:
        raise ValueError(f"degrade needs (B, C, H, W) with H, W multiples of scale={scale}, got {tuple(x.shape)}")
    if degradation == "avgpool":
        return F.avg_pool2d(x, scale)
    size = (x.shape[-2] // scale, x.shape[-1] // scale)
    return F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)


def lift(y: torch.Tensor, scale: int, degradation: str = "avgpool") -> torch.Tensor:
    """A^T y: the low-res image brought back to the data's size (nearest for avgpool, bicubic for bicubic)."""
    check_degradation(degradation, scale)
    if y.ndim != 4:
        raise ValueError(f"lift needs (B, C, h, w), got {tuple(y.shape)}")
    if degradation == "avgpool":
        return F.interpolate(y, scale_factor=scale, mode="nearest")
    return F.interpolate(y, scale_factor=scale, mode="bicubic", align_corners=False)


def measure(x: torch.Tensor, n: torch.Tensor, scale: int, degradation: str = "avgpool",
            sigma_y: float = 0.0) -> torch.Tensor:
    """y = A x + sigma_y n, n standard normal of y's shape."""
    y = degrade(x, scale, degradation)
    if n.shape != y.shape:
        raise ValueError(f"measurement noise of shape {tuple(n.shape)}, expected {tuple(y.shape)}")
    return y + float(sigma_y) * n


def source(c: torch.Tensor, eps: torch.Tensor, sigma_p: float) -> torch.Tensor:
    """x_src = sqrt(1 - sigma_p^2) c + sigma_p eps: a VP mix (variance-preserving for unit-variance c)."""
    if not 0.0 <= sigma_p <= 1.0:
        raise ValueError(f"sigma_p must be in [0, 1], got {sigma_p}")
    return math.sqrt(1.0 - sigma_p ** 2) * c + sigma_p * eps


def draw(x: torch.Tensor, scale: int, degradation: str, sigma_y: float, sigma_p: float,
         generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, c, x_src) of HR images x: the measurement noise n, then the source noise eps, drawn from `generator`
    in that order (a training batch or an evaluation draw is a function of its generator's seed)."""
    lr = (x.shape[0], x.shape[1], x.shape[2] // scale, x.shape[3] // scale)
    n = torch.randn(lr, generator=generator)
    eps = torch.randn(x.shape, generator=generator)
    y = measure(x, n.to(x.device), scale, degradation, sigma_y)
    c = lift(y, scale, degradation)
    return y, c, source(c, eps.to(x.device), sigma_p)
