"""Tuned time discretisation (Simple ReFlow improvement #7): pick the grid that best matches a many-step solve.

For a fixed budget (solver, NFE) we try a family of grids (EDM's rho schedule, rho = 1 uniform) and keep the one whose
endpoints on a held-out noise batch are closest to a reference endpoint (by default the same velocity integrated with
many Heun steps). The score is the mean over the batch of the squared L2 distance per sample. This is the honest,
cheap form of the paper's tuned discretisation: it needs no data and no metric network, only the model itself.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from . import solvers

DEFAULT_RHOS = (0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.0)


def reference_endpoint(velocity: solvers.Velocity, nfe: int = 127, solver: str = "heun") -> Callable:
    """x_noise -> the endpoint of a many-step solve (default: Heun, 64 steps = 127 NFE, uniform grid)."""
    def ref(x_noise: torch.Tensor) -> torch.Tensor:
        return solvers.sample(velocity, x_noise, nfe, solver, "uniform")
    return ref


def endpoint_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean over the batch of the per-sample squared L2 distance."""
    return float((x - ref).flatten(1).pow(2).sum(1).mean())


@torch.no_grad()
def search_rho(velocity: solvers.Velocity, x_noise: torch.Tensor, reference_fn: Callable | None = None,
               nfe: int = 4, solver: str = "euler", rhos: Sequence[float] = DEFAULT_RHOS,
               x_ref: torch.Tensor | None = None) -> tuple[float, dict[float, float]]:
    """The rho in `rhos` minimising endpoint_error(sample(velocity, x_noise, nfe, solver, 'rho', rho), reference).

    Returns (best_rho, {rho: error}). Ties go to the rho listed first (so list 1.0 first to prefer uniform).
    `reference_fn(x_noise)` gives the reference endpoint (default `reference_endpoint(velocity)`); `x_ref` skips it.
    With one step every grid is [1, 0]: all errors are equal and the first rho is returned.
    """
    if not rhos:
        raise ValueError("rhos must not be empty")
    if x_ref is None:
        x_ref = (reference_fn or reference_endpoint(velocity))(x_noise)
    errors: dict[float, float] = {}
    for rho in rhos:
        x = solvers.sample(velocity, x_noise, nfe, solver, "rho", float(rho))
        errors[float(rho)] = endpoint_error(x, x_ref)
    best = min(errors, key=lambda r: (errors[r], list(errors).index(r)))
    return best, errors
