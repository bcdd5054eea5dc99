"""Liu et al.'s straightness of a model's generation paths, integrated by the solvers' Euler with a step callback."""
from __future__ import annotations

from typing import Callable

import torch

from .. import solvers


@torch.no_grad()
def straightness(
    velocity_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x_noise: torch.Tensor,
    steps: int = 64,
    *,
    return_per_sample: bool = False,
    callback: solvers.StepCallback | None = None,
):
    """S = int_0^1 E || (x_noise - x_data) - v(x_t, t) ||^2 dt along the model's own path.

    The ODE is integrated by `solvers.euler` on a uniform grid from t = 1 (``x_noise``) to t = 0 with ``steps``
    steps; ``velocity_fn(x, t)`` is the solvers' velocity (labels bound by the caller, e.g.
    ``VelocityModel.solver_velocity(label)``). ``x_data`` is the final point. The squared norm is summed over all
    non-batch dims; the time integral is the left Riemann sum over the velocities of the Euler steps. A field whose
    velocity is constant along each path gives exactly 0.

    Returns ``float`` S (mean over samples), or ``(S, per_sample)`` with ``per_sample`` a CPU tensor (B,) when
    ``return_per_sample=True``. ``callback(i, t, x, v)`` (the solvers' step callback) sees every Euler step before
    it is taken, so a caller can keep the trajectory (e.g. for a plot) without integrating the ODE a second time.
    """
    if steps < 1:
        raise ValueError("steps must be >= 1")
    vs = []

    def keep(i, t, x, v):
        vs.append(v.detach())
        if callback is not None:
            callback(i, t, x, v)

    x_data = solvers.euler(velocity_fn, x_noise, solvers.time_grid(steps), keep)
    b = x_noise.shape[0]
    disp = (x_noise - x_data).reshape(b, -1).double()
    dt = 1.0 / steps
    per_sample = torch.zeros(b, dtype=torch.float64, device=x_noise.device)
    for v in vs:
        per_sample += dt * ((disp - v.reshape(b, -1).double()) ** 2).sum(dim=1)
    s = float(per_sample.mean().item())
    if return_per_sample:
        return s, per_sample.float().cpu()
    return s
