"""Fixed-step ODE solvers for dx/dt = v(x, t): pure functions of (velocity_fn, x, t_grid).

Generation runs a descending grid 1 -> 0 (noise -> data); inversion runs the same grid reversed (data -> noise).
Grids are built apart from solvers, in float64 (EDM style). `heun` is EDM's sampler without churn: a trapezoidal
correction on every step except the last, which is plain Euler, so N steps cost 2N - 1 evaluations.
"""
from __future__ import annotations

from typing import Callable

import torch

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, t of shape (B,)) -> v
StepCallback = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]  # (i, t_i, x_i, v_i)

SOLVERS = ("euler", "heun")


def time_grid(steps: int, kind: str = "uniform", rho: float = 1.0, times: list[float] | None = None,
              t_start: float = 1.0, t_end: float = 0.0) -> torch.Tensor:
    """A float64 grid of steps + 1 times from t_start to t_end.

    kind="rho": EDM's schedule moved to t in [0, 1]: t_i = (t_start^(1/rho) + i/N (t_end^(1/rho) - t_start^(1/rho)))^rho,
    which for rho > 1 spends smaller steps near the data end (t = 0). rho = 1 is uniform.
    kind="list": the user's own times (must be monotone and include both ends).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if kind == "list":
        if times is None or len(times) != steps + 1:
            raise ValueError(f"a 'list' grid needs {steps + 1} times, got {times}")
        g = torch.tensor(times, dtype=torch.float64)
        d = g.diff()
        if not (torch.all(d < 0) or torch.all(d > 0)):
            raise ValueError(f"grid times must be strictly monotone, got {times}")
        return g
    i = torch.arange(steps + 1, dtype=torch.float64) / steps
    if kind == "uniform":
        return t_start + i * (t_end - t_start)
    if kind == "rho":
        a, b = t_start ** (1 / rho), t_end ** (1 / rho)
        return (a + i * (b - a)) ** rho
    raise ValueError(f"unknown grid kind {kind!r}; choose 'uniform', 'rho' or 'list'")


def steps_for_nfe(solver: str, nfe: int) -> int:
    """Euler: one evaluation a step. Heun (last step Euler): N steps cost 2N - 1, so NFE must be odd."""
    if nfe < 1:
        raise ValueError(f"nfe must be >= 1, got {nfe}")
    if solver == "euler":
        return nfe
    if solver == "heun":
        if nfe % 2 == 0:
            raise ValueError(f"heun needs an odd NFE (N steps = 2N-1 evaluations), got {nfe}")
        return (nfe + 1) // 2
    raise ValueError(f"unknown solver {solver!r}; choose one of {SOLVERS}")


def nfe_for_steps(solver: str, steps: int) -> int:
    return steps if solver == "euler" else 2 * steps - 1


def _t(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), float(t), device=x.device, dtype=torch.float32)


@torch.no_grad()
def euler(v: Velocity, x: torch.Tensor, grid: torch.Tensor, callback: StepCallback | None = None) -> torch.Tensor:
    for i in range(len(grid) - 1):
        t_cur, t_next = grid[i], grid[i + 1]
        d = v(x, _t(t_cur, x))
        if callback is not None:
            callback(i, t_cur, x, d)
        x = x + float(t_next - t_cur) * d
    return x


@torch.no_grad()
def heun(v: Velocity, x: torch.Tensor, grid: torch.Tensor, callback: StepCallback | None = None) -> torch.Tensor:
    last = len(grid) - 2
    for i in range(len(grid) - 1):
        t_cur, t_next = grid[i], grid[i + 1]
        h = float(t_next - t_cur)
        d = v(x, _t(t_cur, x))
        if callback is not None:
            callback(i, t_cur, x, d)
        x_next = x + h * d
        if i < last:  # EDM: second-order correction everywhere but the final step
            d2 = v(x_next, _t(t_next, x))
            x_next = x + h * 0.5 * (d + d2)
        x = x_next
    return x


def integrate(v: Velocity, x: torch.Tensor, grid: torch.Tensor, solver: str = "euler",
              callback: StepCallback | None = None) -> torch.Tensor:
    if solver == "euler":
        return euler(v, x, grid, callback)
    if solver == "heun":
        return heun(v, x, grid, callback)
    raise ValueError(f"unknown solver {solver!r}; choose one of {SOLVERS}")


def sample(v: Velocity, x_noise: torch.Tensor, nfe: int, solver: str = "euler", grid: str = "uniform",
           rho: float = 1.0, times: list[float] | None = None, callback: StepCallback | None = None) -> torch.Tensor:
    """Generate: integrate from t = 1 (noise) to t = 0 (data) with exactly `nfe` evaluations."""
    g = time_grid(steps_for_nfe(solver, nfe), grid, rho, times)
    return integrate(v, x_noise, g, solver, callback)


def invert(v: Velocity, x_data: torch.Tensor, nfe: int, solver: str = "euler", grid: str = "uniform",
           rho: float = 1.0, callback: StepCallback | None = None) -> torch.Tensor:
    """Inversion (Simple ReFlow's forward pairs): integrate from t = 0 (data) to t = 1 (noise).

    Uses the generation grid reversed, so a round trip meets the same time points in both directions."""
    g = time_grid(steps_for_nfe(solver, nfe), grid, rho).flip(0)
    return integrate(v, x_data, g, solver, callback)


def guided(v_cond: Velocity, v_guide: Velocity, w: float) -> Velocity:
    """Guidance as a velocity: v = v_guide + w (v_cond - v_guide), w = 1 is no guidance.

    Computed with torch.lerp, which is exact at both ends: w = 1 gives v_cond and w = 0 gives v_guide bit for bit.
    CFG: v_guide is the same net with the null label; AutoGuidance: a weaker checkpoint (both built by
    `velocity.VelocityModel.solver_velocity`). One guided call costs two network evaluations."""
    w = float(w)

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, b = v_cond(x, t), v_guide(x, t)
        return torch.lerp(b, a, w)
    return fn


# --- NFE accounting with guidance -----------------------------------------------------------------------------------
# `nfe` everywhere in metrics means *network* evaluations. A guided velocity calls two networks (the conditional
# one and the guide), so a guided Euler step costs 2 NFE and guided Heun with N steps costs 2 (2N - 1).

def network_nfe(solver: str, steps: int, guided: bool = False) -> int:
    """Network evaluations of `steps` solver steps (x2 when every velocity is guided)."""
    return nfe_for_steps(solver, steps) * (2 if guided else 1)


def solver_nfe_for_budget(solver: str, nfe: int, guided: bool = False) -> int | None:
    """The solver's velocity-evaluation count for a budget of `nfe` network evaluations, or None when the budget
    cannot be met exactly (guided: odd budgets; heun: an even number of velocity evaluations)."""
    if nfe < 1:
        raise ValueError(f"nfe must be >= 1, got {nfe}")
    per = 2 if guided else 1
    if nfe % per:
        return None
    n = nfe // per
    if solver == "heun" and n % 2 == 0:
        return None
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {SOLVERS}")
    return n
