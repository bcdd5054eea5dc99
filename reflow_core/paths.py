"""The probability path and its time distributions: the one place the time convention is written.

Convention (Simple ReFlow / rfpp): t = 0 is data, t = 1 is noise.
    x_t = (1 - t) * x_data + t * x_noise,      v = dx_t/dt = x_noise - x_data.
Generation integrates dx/dt = v from t = 1 to t = 0; inversion integrates from t = 0 to t = 1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

CONVENTION = "t0=data,t1=noise"  # how artifacts (checkpoints, pair stores, exports) record this convention
TIME_DISTS = ("uniform", "logit_normal", "u_shape", "exponential")
_DEFAULT_PARAM = {"logit_normal": 1.0, "u_shape": 4.0, "exponential": 10.0}


@dataclass
class PathSample:
    """A point on the path between a coupled (x_data, x_noise) pair."""

    x_t: torch.Tensor
    t: torch.Tensor  # (B,)
    v: torch.Tensor  # regression target


def _expand(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)


def interpolate(x_data: torch.Tensor, x_noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    tt = _expand(t, x_data)
    return (1 - tt) * x_data + tt * x_noise


def velocity_target(x_data: torch.Tensor, x_noise: torch.Tensor) -> torch.Tensor:
    return x_noise - x_data


def path_sample(x_data: torch.Tensor, x_noise: torch.Tensor, t: torch.Tensor) -> PathSample:
    return PathSample(interpolate(x_data, x_noise, t), t, velocity_target(x_data, x_noise))


def time_density(kind: str, t: torch.Tensor, param: float | None = None) -> torch.Tensor:
    """Normalised density on [0, 1]; used by tests and the docs' plot."""
    p = _DEFAULT_PARAM.get(kind) if param is None else param
    if kind == "uniform":
        return torch.ones_like(t)
    if kind == "logit_normal":  # logit(t) ~ N(0, p^2)
        logit = torch.log(t) - torch.log1p(-t)
        return torch.exp(-0.5 * (logit / p) ** 2) / (p * math.sqrt(2 * math.pi) * t * (1 - t))
    if kind == "u_shape":  # rfpp: density proportional to cosh(a (t - 1/2))
        z = 2 * math.sinh(p / 2) / p
        return torch.cosh(p * (t - 0.5)) / z
    if kind == "exponential":  # Simple ReFlow: density proportional to b^t (mass toward the noise end t = 1)
        lb = math.log(p)
        return lb * torch.exp(lb * t) / (p - 1)
    raise ValueError(f"unknown time distribution {kind!r}; choose one of {TIME_DISTS}")


def sample_time(kind: str, n: int, generator: torch.Generator | None = None, param: float | None = None,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """Draw n times in [0, 1] from one of TIME_DISTS by inverse-CDF (exact, no rejection)."""
    p = _DEFAULT_PARAM.get(kind) if param is None else param
    u = torch.rand(n, generator=generator, device="cpu", dtype=torch.float64)
    if kind == "uniform":
        t = u
    elif kind == "logit_normal":
        t = torch.sigmoid(p * torch.randn(n, generator=generator, dtype=torch.float64))
    elif kind == "u_shape":
        # CDF(t) = (sinh(a(t-1/2)) + sinh(a/2)) / (2 sinh(a/2))  ->  t = 1/2 + asinh((2u - 1) sinh(a/2)) / a
        t = 0.5 + torch.asinh((2 * u - 1) * math.sinh(p / 2)) / p
    elif kind == "exponential":
        # CDF(t) = (b^t - 1) / (b - 1)  ->  t = log(1 + u (b - 1)) / log b
        t = torch.log1p(u * (p - 1)) / math.log(p)
    else:
        raise ValueError(f"unknown time distribution {kind!r}; choose one of {TIME_DISTS}")
    return t.clamp(0.0, 1.0).to(torch.float32).to(device)


def from_original_rf(v_rf):
    """The one adapter for the original Rectified Flow code's convention (t = 0 noise, t = 1 data, v = data - noise).

    Its x at time s is ours at t = 1 - s, and its velocity is the negative of ours, so
    v_ours(x, t) = -v_rf(x, 1 - t). Wrap an imported model (or a pair generator) with this once, at the boundary.
    """
    def v(x: torch.Tensor, t: torch.Tensor, *args) -> torch.Tensor:
        return -v_rf(x, 1 - t, *args)
    return v
