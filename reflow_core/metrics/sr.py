"""Super-resolution metrics of reconstructions against their own ground truth: PSNR (peak 2 on [-1, 1]),
consistency ||A x_hat - y|| with the degradation A, LPIPS from local weights only, and `sr_row`, one row per model.

Images live in [-1, 1], so the peak-to-peak range is 2 and PSNR = 10 log10(2^2 / MSE) per image. The degradation is
any callable A: HR -> LR (average pooling for digits_sr), passed in so this module does not own it.
"""
from __future__ import annotations

from typing import Callable

import torch

from .reference import Reference

Degradation = Callable[[torch.Tensor], torch.Tensor]

PEAK = 2.0  # images in [-1, 1]


def psnr(x_hat: torch.Tensor, x_true: torch.Tensor, *, peak: float = PEAK) -> torch.Tensor:
    """PSNR per image (N,) in dB, 10 log10(peak^2 / MSE), float64; +inf where an image is reproduced exactly."""
    if x_hat.shape != x_true.shape:
        raise ValueError(f"psnr: shapes differ, {tuple(x_hat.shape)} vs {tuple(x_true.shape)}")
    mse = (x_hat.double() - x_true.double()).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(peak ** 2 / mse)


def consistency(x_hat: torch.Tensor, y: torch.Tensor, degrade: Degradation) -> torch.Tensor:
    """||A x_hat - y||_2 per image (N,), float64: how far the reconstruction's degradation is from its input."""
    ax = degrade(x_hat)
    if ax.shape != y.shape:
        raise ValueError(f"consistency: A(x_hat) has shape {tuple(ax.shape)}, the low-res input {tuple(y.shape)}")
    return (ax.double() - y.double()).flatten(1).norm(dim=1)


def lpips(x_hat: torch.Tensor, x_true: torch.Tensor, *, net: str = "alex") -> torch.Tensor:
    """LPIPS per image (N,) from local weights only (`distill.lpips_weights_path`); FileNotFoundError naming the
    missing file otherwise, never a download."""
    from ..distill import lpips_distance
    with torch.no_grad():
        return lpips_distance(x_hat, x_true, net=net).double()


def lpips_available(net: str = "alex") -> bool:
    """Whether LPIPS `net`'s backbone weights are on disk (and the lpips package importable)."""
    import importlib.util
    import os

    from ..distill import lpips_weights_path
    return importlib.util.find_spec("lpips") is not None and os.path.exists(lpips_weights_path(net)[0])


class PSNR:
    """`PairedMetric`: mean PSNR (peak 2) of reconstructions against their ground truth, higher is better."""

    metric = "psnr"

    def score(self, x_hat: torch.Tensor, x_true: torch.Tensor) -> dict[str, float]:
        p = psnr(x_hat, x_true)
        return {"psnr": float(p.mean()), "psnr_std": float(p.std()) if p.numel() > 1 else 0.0}


class Consistency:
    """`PairedMetric`: mean ||A x_hat - A x_true|| with the noiseless low-res A x_true as the input, lower is better."""

    metric = "consistency"

    def __init__(self, degrade: Degradation):
        self.degrade = degrade

    def score(self, x_hat: torch.Tensor, x_true: torch.Tensor) -> dict[str, float]:
        return {"consistency": float(consistency(x_hat, self.degrade(x_true), self.degrade).mean())}


def sr_row(x_hat: torch.Tensor, x_true: torch.Tensor, y: torch.Tensor, degrade: Degradation, *,
           reference: Reference | None = None, lpips_net: str | None = "alex") -> dict[str, float]:
    """One row of SR metrics for generated HR images ``x_hat`` of shape (K, N, C, H, W): K noise draws for each of
    N low-res inputs ``y`` (N, C, h, w) with ground truth ``x_true`` (N, C, H, W). Per-draw PSNR, consistency and
    LPIPS are averaged over all K*N images; ``psnr_of_mean`` is the PSNR of the draws' mean (the posterior-mean
    estimate's fidelity); the reference (``metrics.reference_for``) scores all K*N images as one set. LPIPS is left
    out when ``lpips_net`` is None or its weights are not local (``lpips`` then absent from the row)."""
    if x_hat.dim() != x_true.dim() + 1 or x_hat.shape[1:] != x_true.shape:
        raise ValueError(f"sr_row: x_hat must be (K, *x_true.shape), got {tuple(x_hat.shape)} and "
                         f"{tuple(x_true.shape)}")
    k, n = x_hat.shape[:2]
    flat_hat = x_hat.reshape(k * n, *x_true.shape[1:])
    truth = x_true.unsqueeze(0).expand_as(x_hat).reshape_as(flat_hat)
    lows = y.unsqueeze(0).expand(k, *y.shape).reshape(k * n, *y.shape[1:])
    p = psnr(flat_hat, truth)
    row = {"psnr": float(p.mean()), "psnr_std": float(p.std()) if p.numel() > 1 else 0.0,
           "psnr_of_mean": float(psnr(x_hat.double().mean(0), x_true).mean()),
           "consistency": float(consistency(flat_hat, lows, degrade).mean()), "draws": float(k)}
    if lpips_net is not None and lpips_available(lpips_net):
        row["lpips"] = float(lpips(flat_hat, truth, net=lpips_net).mean())
    if reference is not None:
        scores = reference.score(flat_hat)
        row.update(scores)
        row["fd"] = scores[reference.metric]
    return row
