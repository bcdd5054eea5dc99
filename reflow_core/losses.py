"""Per-sample losses (the trainer reduces): MSE, pseudo-Huber, loss normalisation, high-pass residual.

All return a (B,) tensor so weighting and normalisation compose; see docs/improvements.md
(improvements 1 and 3).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def mse(residual: torch.Tensor) -> torch.Tensor:
    """Mean squared residual per sample."""
    return residual.flatten(1).pow(2).mean(1)


def pseudo_huber(residual: torch.Tensor, c: float) -> torch.Tensor:
    """sqrt(||r||^2 + c^2) - c on the full per-sample norm (rfpp: c = 0.00054 * d... see `huber_c`)."""
    sq = residual.flatten(1).pow(2).sum(1)
    return torch.sqrt(sq + c * c) - c


def huber_c(scale: float, d: int) -> float:
    """rfpp's constant for the full norm: c = 0.00054 * sqrt(d) (EDM-style per-dimension scale times sqrt(d)).

    rfpp is often quoted as c = 0.00054 * d; for the *norm* of a d-dimensional residual the dimension-consistent
    form is scale * sqrt(d) (iCT's choice), which we use; the scale is configurable (TrainConfig.huber_scale).
    """
    return scale * math.sqrt(d)


def normalise(per_sample: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """Simple ReFlow #1: weight each sample by 1 / stopgrad(loss + eps), so every sample's loss is ~1 in value
    while its gradient is grad(loss) / (loss + eps)."""
    return per_sample / (per_sample.detach() + eps)


class HighPass:
    """Simple ReFlow #3: an invertible linear map phi(r) = r + alpha * (r - blur(r)) applied to the residual.

    Boosting high frequencies by (1 + alpha) leaves the minimiser unchanged (their Proposition 1: phi invertible
    linear) while re-weighting which errors the loss sees. alpha = 0 is the identity. Images only (B, C, H, W).
    """

    def __init__(self, alpha: float):
        self.alpha = float(alpha)
        k = torch.tensor([1.0, 2.0, 1.0])
        self.kernel = (k[:, None] * k[None, :]) / 16.0  # 3x3 binomial blur

    def __call__(self, r: torch.Tensor) -> torch.Tensor:
        if self.alpha == 0.0 or r.dim() != 4:
            return r
        c = r.shape[1]
        w = self.kernel.to(r.device, r.dtype).expand(c, 1, 3, 3)
        blur = F.conv2d(F.pad(r, (1, 1, 1, 1), mode="reflect"), w, groups=c)
        return r + self.alpha * (r - blur)
