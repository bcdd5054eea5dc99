"""Distances between samples and a reference: sliced W2, energy distance and MMD between point clouds, and the Frechet
distance between feature statistics (mean, covariance). Every distance returns a plain python float."""
from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import torch


def flat(x: torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(x)
    return x.reshape(x.shape[0], -1)


def _quantile_resample(sorted_vals: torch.Tensor, n: int) -> torch.Tensor:
    """Pick ``n`` evenly spaced quantiles (mid-points) from a column-sorted (m, P) tensor."""
    m = sorted_vals.shape[0]
    if m == n:
        return sorted_vals
    idx = ((torch.arange(n, device=sorted_vals.device, dtype=torch.float64) + 0.5) * m / n).floor().long()
    return sorted_vals[idx.clamp_(0, m - 1)]


def unit_directions(d: int, n_proj: int, generator: torch.Generator | None, device) -> torch.Tensor:
    gen_device = generator.device if generator is not None else torch.device("cpu")
    u = torch.randn(d, n_proj, generator=generator, device=gen_device, dtype=torch.float64).to(device)
    return u / u.norm(dim=0, keepdim=True).clamp_min(1e-12)


def sliced_w2_sorted(px: torch.Tensor, py: torch.Tensor) -> float:
    """sqrt(mean over projections of the 1-D W2^2) from column-sorted projections (N, P) and (M, P)."""
    n = min(px.shape[0], py.shape[0])
    px, py = _quantile_resample(px, n), _quantile_resample(py, n)
    w2sq = ((px - py) ** 2).mean(dim=0)  # (n_proj,)
    return float(w2sq.mean().sqrt().item())


def sliced_w2(
    x: torch.Tensor,
    y: torch.Tensor,
    n_proj: int = 256,
    generator: torch.Generator | None = None,
) -> float:
    """Sliced Wasserstein-2 distance between point clouds x (N, ...) and y (M, ...).

    sqrt( mean over ``n_proj`` random unit directions u of W2^2(u.x, u.y) ), the 1-D W2 computed from sorted
    projections. If N != M the larger cloud's sorted projections are subsampled at the smaller's quantile levels.
    For two clouds that differ by a translation m, the value is about |m| / sqrt(d).
    Against one reference cloud many times, `reference.ToyReference` projects and sorts the reference once.
    """
    x = flat(x).double()
    y = flat(y).to(x.device).double()
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"dimension mismatch: {x.shape[1]} vs {y.shape[1]}")
    u = unit_directions(x.shape[1], n_proj, generator, x.device)
    return sliced_w2_sorted(torch.sort(x @ u, dim=0).values, torch.sort(y @ u, dim=0).values)


def mean_cdist(a: torch.Tensor, b: torch.Tensor, chunk: int, exclude_diag: bool = False) -> float:
    total = 0.0
    for i in range(0, a.shape[0], chunk):
        total += float(torch.cdist(a[i : i + chunk], b).sum().item())
    n, m = a.shape[0], b.shape[0]
    if exclude_diag:  # the diagonal is zero, so only the normaliser changes (U-statistic)
        return total / max(n * (n - 1), 1)
    return total / (n * m)


def energy_distance(x: torch.Tensor, y: torch.Tensor, chunk: int = 2048) -> float:
    """Energy distance 2 E|X - Y| - E|X - X'| - E|Y - Y'| (Euclidean, computed with torch.cdist in row chunks).

    The within-cloud terms are U-statistics (self-pairs excluded), so the estimate is unbiased and can be slightly
    negative when both clouds come from the same distribution.
    """
    x = flat(x).double()
    y = flat(y).to(x.device).double()
    return energy_from(x, y, mean_cdist(y, y, chunk, exclude_diag=True), chunk)


def energy_from(x: torch.Tensor, y: torch.Tensor, eyy: float, chunk: int) -> float:
    exy = mean_cdist(x, y, chunk)
    exx = mean_cdist(x, x, chunk, exclude_diag=True)
    return float(2.0 * exy - exx - eyy)


def mmd_rbf(
    x: torch.Tensor,
    y: torch.Tensor,
    bandwidths: Sequence[float] = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0),
    chunk: int = 2048,
) -> float:
    """Unbiased squared MMD with a sum of RBF kernels exp(-|a - b|^2 / (2 h^2)) over ``bandwidths``."""
    x = flat(x).double()
    y = flat(y).to(x.device).double()
    hs = torch.tensor(list(bandwidths), dtype=torch.float64, device=x.device)

    def ksum(a, b, exclude_diag):
        total = 0.0
        for i in range(0, a.shape[0], chunk):
            d2 = torch.cdist(a[i : i + chunk], b).pow(2)
            total += float(torch.exp(-d2[..., None] / (2 * hs**2)).sum().item())
        n, m = a.shape[0], b.shape[0]
        if exclude_diag:
            total -= n * len(bandwidths)  # k(a, a) = 1 per bandwidth
            return total / max(n * (n - 1), 1)
        return total / (n * m)

    return float(ksum(x, x, True) + ksum(y, y, True) - 2.0 * ksum(x, y, False))


def feature_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D) (float64 numpy, unbiased) of features (N, D) given as tensor or array."""
    if torch.is_tensor(features):
        features = features.detach().cpu().double().numpy()
    f = np.asarray(features, dtype=np.float64)
    f = f.reshape(f.shape[0], -1)
    mu = f.mean(axis=0)
    sigma = np.atleast_2d(np.cov(f, rowvar=False))
    return mu, sigma


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 sqrt(S1 S2)), as in the reference FID code (pytorch-fid / TTUR).

    Uses scipy.linalg.sqrtm; if the product is near singular (non-finite sqrtm), ``eps`` is added to the diagonals;
    small imaginary parts from numerical error are dropped. If the imaginary part is large, the trace of the square
    root is taken from the eigenvalues of S1 S2 instead (they are real and >= 0 in exact arithmetic).
    """
    from scipy import linalg

    mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError("mean vectors / covariances have different shapes")
    diff = mu1 - mu2

    def _sqrtm(a):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = linalg.sqrtm(a)
        return out[0] if isinstance(out, tuple) else out

    covmean = _sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            eig = np.linalg.eigvals(sigma1.dot(sigma2)).astype(np.complex128)
            tr_covmean = float(np.sum(np.sqrt(eig)).real)
        else:
            tr_covmean = float(np.trace(covmean.real))
    else:
        tr_covmean = float(np.trace(covmean))
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)
