"""OFTSR's one-step student with a fidelity-realism knob: its output, its distillation loss, its knob sampler.

OFTSR (Zhu, Wang, Lu, Li, Yan & Zhang, arXiv:2412.09465) distils a conditional flow from a noisy upsampled low-res
image x_src to the high-res image into a one-step student whose time input tau tunes the output. The derivation is
docs/oftsr.md; the closed-form checks are tests/core/test_oftsr.py.

Time. Ours: t = 0 data (HR), t = 1 source, x_t = (1 - t) x_HR + t x_src, the teacher's v(x, t, c) ~ x_src - x_HR,
generation integrates 1 -> 0. The knob keeps OFTSR's orientation: tau = 1 - t, so tau = 0 is the source end and
tau = 1 the data end.

Student. u(x_src, tau, c) is a velocity in our convention: the teacher's average velocity over t in [1 - tau, 1],
so the student's state

    x_tau = x_src - tau u(x_src, tau, c)

lies on the teacher's ODE trajectory from x_src at t = 1 - tau. Its one-call output is the chord from x_src through
x_tau extended to t = 0: x_hat = x_src - u(x_src, tau, c). tau -> 0: u -> v(x_src, 1, c) and x_hat is the teacher's
one-step output, the posterior mean E[x_HR | x_src, c] (fidelity end); tau = 1: x_hat = x_tau, the teacher's ODE
endpoint (realism end).

Loss (per sample). With tau' = tau + delta and one midpoint step of the teacher from t_a = 1 - tau to t_a - delta,

    x_mid    = x_tau - (delta / 2) v(x_tau, t_a, c)
    target   = x_tau - delta v(x_mid, t_a - delta / 2, c)                     (all under stop-gradient)
    loss     = d(u(x_src, tau', c), (x_src - target) / tau') + w d(u(x_src, 0, c), sg v(x_src, 1, c)),

the first term the state equation x_src - tau' u(x_src, tau', c) = target written in velocities (OFTSR's form;
`space="state"` compares the states), d a per-sample distance (`distill.distance_fn`, l2 by default as in OFTSR),
w = `boundary_weight`. The boundary term pins the start of the trajectory; the first term carries it forward one
teacher step at a time.
"""
from __future__ import annotations

from typing import Protocol

import torch

from .distill import Distance, distance_fn

__all__ = ["Teacher", "Student", "student_state", "student_output", "oftsr_target", "oftsr_loss", "sample_knob",
           "student_from_velocity", "DELTA", "BOUNDARY_WEIGHT", "SPACES"]

DELTA = 0.05  # OFTSR's configs: the step between the two states the loss ties together
BOUNDARY_WEIGHT = 0.1  # OFTSR's configs: the weight of the boundary term


class Teacher(Protocol):
    """The conditional teacher velocity v(x, t, cond) in our convention (t = 1 source, t = 0 HR); t of shape (B,)."""

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor: ...


class Student(Protocol):
    """The student velocity u(x_src, tau, cond), tau of shape (B,) in OFTSR's orientation (0 source, 1 HR)."""

    def __call__(self, x: torch.Tensor, tau: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor: ...


def _expand(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)


def _knob(tau: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    if not torch.is_tensor(tau):
        return torch.full((x.shape[0],), float(tau), dtype=x.dtype, device=x.device)
    return tau.to(x.dtype).expand(x.shape[0]) if tau.dim() == 0 else tau.to(x.dtype)


def student_from_velocity(model) -> Student:
    """A student from a velocity network `model(x, t, cond)` called at t = 1 - tau: a student initialised from the
    teacher then starts with u(x_src, 0, c) = v(x_src, 1, c), the boundary term already zero."""
    return lambda x, tau, cond: model(x, 1.0 - tau, cond)


def student_state(student: Student, x_src: torch.Tensor, cond: torch.Tensor | None,
                  tau: torch.Tensor | float) -> torch.Tensor:
    """x_tau = x_src - tau u(x_src, tau, c): the student's point on the teacher's trajectory at t = 1 - tau."""
    tau = _knob(tau, x_src)
    return x_src - _expand(tau, x_src) * student(x_src, tau, cond)


def student_output(student: Student, x_src: torch.Tensor, cond: torch.Tensor | None,
                   tau: torch.Tensor | float) -> torch.Tensor:
    """One network call: x_hat = x_src - u(x_src, tau, c), the chord from x_src through x_tau extended to t = 0.
    tau near 0: the posterior mean (fidelity); tau near 1: the teacher's ODE endpoint (realism)."""
    return x_src - student(x_src, _knob(tau, x_src), cond)


def _midpoint_slope(teacher: Teacher, x: torch.Tensor, t: torch.Tensor, delta: float,
                    cond: torch.Tensor | None) -> torch.Tensor:
    """The teacher's midpoint slope over [t - delta, t]: one step from x is x - delta * slope."""
    return teacher(x - (delta / 2) * teacher(x, t, cond), t - delta / 2, cond)


@torch.no_grad()
def oftsr_target(student: Student, teacher: Teacher, x_src: torch.Tensor, cond: torch.Tensor | None,
                 tau: torch.Tensor | float, delta: float = DELTA) -> torch.Tensor:
    """The student's state at tau advanced by one midpoint step of the teacher from t = 1 - tau to 1 - tau - delta
    (no gradient: the target of `oftsr_loss`)."""
    tau = _knob(tau, x_src)
    x = student_state(student, x_src, cond, tau)
    return x - delta * _midpoint_slope(teacher, x, 1.0 - tau, delta, cond)


SPACES = ("velocity", "state")


def oftsr_loss(student: Student, teacher: Teacher, x_src: torch.Tensor, cond: torch.Tensor | None,
               tau: torch.Tensor | float, *, delta: float = DELTA, boundary_weight: float = BOUNDARY_WEIGHT,
               align_weight: float = 0.0, space: str = "velocity", distance: str | Distance = "l2",
               huber_scale: float = 0.00054) -> torch.Tensor:
    """Per-sample OFTSR loss (B,) for knob values tau in [0, 1 - delta] (`sample_knob`).

    Trajectory term: the student's state at tau' = tau + delta against its state at tau advanced by one teacher
    midpoint step (target under stop-gradient), compared as states (`space="state"`) or as velocities
    (`"velocity"`, OFTSR's form: d(u(tau'), (x_src - target) / tau'), for l2 the state distance / tau'^2).
    Boundary term (`boundary_weight`): d(u(x_src, 0, c), sg v(x_src, 1, c)). Optional alignment term
    (`align_weight`, 0.01 in OFTSR's configs): the output against the teacher's one-step extrapolation from the
    student's state, d(x_tau - (1 - tau) u(tau), sg[x_tau - (1 - tau) w]), w the teacher's midpoint slope there."""
    tau = _knob(tau, x_src)
    if bool((tau < 0).any()) or bool((tau > 1 - delta + 1e-6).any()):
        raise ValueError(f"tau must lie in [0, 1 - delta] = [0, {1 - delta:g}]")
    if space not in SPACES:
        raise ValueError(f"unknown space {space!r}; choose one of {SPACES}")
    d = distance_fn(distance, huber_scale=huber_scale)
    with torch.set_grad_enabled(bool(align_weight) and torch.is_grad_enabled()):
        u_tau = student(x_src, tau, cond)  # with a gradient only for the alignment term
    with torch.no_grad():
        x_tau = x_src - _expand(tau, x_src) * u_tau
        slope = _midpoint_slope(teacher, x_tau, 1.0 - tau, delta, cond)
        target = x_tau - delta * slope
    tau_next = tau + delta
    u_next = student(x_src, tau_next, cond)
    if space == "state":
        loss = d(x_src - _expand(tau_next, x_src) * u_next, target)
    else:
        loss = d(u_next, (x_src - target) / _expand(tau_next, x_src))
    if boundary_weight:
        zero = torch.zeros_like(tau)
        with torch.no_grad():
            v_src = teacher(x_src, 1.0 - zero, cond)
        loss = loss + boundary_weight * d(student(x_src, zero, cond), v_src)
    if align_weight:
        rest = _expand(1.0 - tau, x_src)
        loss = loss + align_weight * d(x_tau - rest * u_tau, x_tau - rest * slope)
    return loss


def sample_knob(n: int, delta: float = DELTA, generator: torch.Generator | None = None,
                device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Training knob values tau ~ U[0, 1 - delta] (n,): every tau with tau + delta <= 1, so the state a step
    further is still on the trajectory. Uniform because the loss must hold at every knob value used at inference."""
    return torch.rand(n, generator=generator, device=device, dtype=dtype) * (1.0 - delta)
