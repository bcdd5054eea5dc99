"""reflow_core.oftsr against closed forms: Gaussian HR data, a linear degradation, the VP source mix (CPU, seconds).

x_HR ~ N(mu, S) in R^2, y = A x_HR + sigma_y n with A = 2-pixel average pooling, c = U y (nearest upsampling,
which the issue writes A^T: A U = 1), x_src = sqrt(1 - sigma_p^2) c + sigma_p eps. Given c, x_HR ~ N(m_c, P) (Kalman
posterior) and x_src ~ N(a c, sigma_p^2 I) are independent, so x_t = (1 - t) x_HR + t x_src | c ~ N(m_t, Sigma_t),
    m_t = (1 - t) m_c + t a c,     Sigma_t = (1 - t)^2 P + t^2 sigma_p^2 I,
and the teacher v(x, t, c) = E[x_src - x_HR | x_t = x, c]
                           = (a c - m_c) + (t sigma_p^2 I - (1 - t) P) Sigma_t^-1 (x - m_t).
P and I commute, so the teacher's flow map is X(t) = m_t + Sigma_t^(1/2) (x_src - a c) / sigma_p: its endpoint
X(0) = m_c + P^(1/2) eps is an exact posterior sample, and x_src - v(x_src, 1, c) = m_c, the posterior mean.
The exact student (the teacher's average velocity from the source to tau) is computed by torchdiffeq, independently.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torchdiffeq import odeint

from reflow_core import oftsr

F64 = torch.float64


class GaussSR:
    """The closed-form teacher, posterior and flow map of the module docstring."""

    def __init__(self, sigma_p=0.3, sigma_y=0.1, dtype=F64):
        self.dtype = dtype
        self.mu = torch.tensor([0.3, -0.2], dtype=dtype)
        self.S = torch.tensor([[1.0, 0.6], [0.6, 0.8]], dtype=dtype)
        self.A = torch.tensor([[0.5, 0.5]], dtype=dtype)
        self.U = torch.tensor([[1.0], [1.0]], dtype=dtype)
        self.sp, self.sy = sigma_p, sigma_y
        self.a = math.sqrt(1.0 - sigma_p ** 2)
        self.K = self.S @ self.A.T / (self.A @ self.S @ self.A.T + sigma_y ** 2)
        self.P = self.S - self.K @ self.A @ self.S
        self.p, self.Q = torch.linalg.eigh(self.P)

    def sample(self, n, generator, c=None):
        x_hr = self.mu + torch.randn(n, 2, generator=generator, dtype=F64) @ torch.linalg.cholesky(self.S).T
        if c is None:
            y = x_hr @ self.A.T + self.sy * torch.randn(n, 1, generator=generator, dtype=F64)
            c = y @ self.U.T  # nearest upsampling of the 1-pixel image (A U = 1)
        x_src = self.a * c + self.sp * torch.randn(n, 2, generator=generator, dtype=F64)
        return x_hr.to(self.dtype), c.to(self.dtype), x_src.to(self.dtype)

    def post_mean(self, c):
        return self.mu + (c @ self.A.T - self.A @ self.mu) @ self.K.T

    def velocity(self, x, t, c):
        t = t.to(x.dtype).reshape(-1, 1, 1).expand(x.shape[0], 1, 1)
        eye = torch.eye(2, dtype=x.dtype)
        sig = (1 - t) ** 2 * self.P + t ** 2 * self.sp ** 2 * eye
        m_c, ac = self.post_mean(c), self.a * c
        m_t = (1 - t[:, :, 0]) * m_c + t[:, :, 0] * ac
        z = torch.linalg.solve(sig, (x - m_t)[..., None])
        return (ac - m_c) + ((t * self.sp ** 2 * eye - (1 - t) * self.P) @ z)[..., 0]

    def flow(self, x_src, c, t):
        """X(t) from X(1) = x_src, closed form."""
        t = t.reshape(-1, 1)
        root = torch.sqrt((1 - t) ** 2 * self.p + t ** 2 * self.sp ** 2)  # (B, 2) eigenvalues of Sigma_t^(1/2)
        m_t = (1 - t) * self.post_mean(c) + t * self.a * c
        return m_t + ((x_src - self.a * c) @ self.Q) * root / self.sp @ self.Q.T


def exact_student(gs: GaussSR):
    """u*(x_src, tau, c) = the mean of v along the teacher's trajectory over t in [1 - tau, 1], by torchdiffeq:
    s in [0, 1], t = 1 - s tau, dx/ds = -tau v(x, t), dU/ds = v(x, t); u* = U(1) (defined at tau = 0 too)."""

    def u(x_src, tau, c):
        tau = tau.to(x_src.dtype)

        def f(s, y):
            v = gs.velocity(y[:, :2], 1 - s * tau, c)
            return torch.cat([-tau[:, None] * v, v], 1)

        y0 = torch.cat([x_src, torch.zeros_like(x_src)], 1)
        grid = torch.tensor([0.0, 1.0], dtype=x_src.dtype)
        return odeint(f, y0, grid, rtol=1e-10, atol=1e-12, method="dopri5")[-1, :, 2:]

    return u


@pytest.fixture(scope="module")
def gs():
    return GaussSR()


def batch(gs, n=256, seed=0):
    return gs.sample(n, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("t", [0.1, 0.5, 0.9])
def test_teacher_velocity_is_the_conditional_expectation(gs, t):
    """Least squares of x_src - x_HR on (x_t, c, 1) over 400k draws (exact for jointly Gaussian variables) = v."""
    x_hr, c, x_src = batch(gs, 400_000, seed=1)
    x_t = (1 - t) * x_hr + t * x_src
    feats = torch.cat([x_t, c[:, :1], torch.ones_like(c[:, :1])], 1)
    coef = torch.linalg.lstsq(feats, x_src - x_hr).solution
    x_hr, c, x_src = batch(gs, 256, seed=2)
    x = (1 - t) * x_hr + t * x_src
    mc = torch.cat([x, c[:, :1], torch.ones_like(c[:, :1])], 1) @ coef
    v = gs.velocity(x, torch.full((256,), t, dtype=F64), c)
    assert (mc - v).abs().max() < 0.02, (mc - v).abs().max()


def test_closed_form_flow_map_solves_the_teacher_ode(gs):
    """torchdiffeq from x_src at t = 1 down to t = 1 - tau equals the closed-form flow map; the exact student's
    state x_src - tau u* lies on it."""
    _, c, x_src = batch(gs, 64)
    tau = torch.rand(64, generator=torch.Generator().manual_seed(3), dtype=F64)
    state = oftsr.student_state(exact_student(gs), x_src, c, tau)
    assert torch.allclose(state, gs.flow(x_src, c, 1 - tau), atol=1e-8)
    grid = torch.linspace(1.0, 0.0, 5, dtype=F64)
    path = odeint(lambda t, x: gs.velocity(x, t.expand(64), c), x_src, grid, rtol=1e-10, atol=1e-12)
    for t, x in zip(grid, path):
        assert torch.allclose(x, gs.flow(x_src, c, t.expand(64)), atol=1e-8)


def test_exact_student_ends_are_posterior_mean_and_teacher_endpoint(gs):
    _, c, x_src = batch(gs, 256)
    u = exact_student(gs)
    fidelity = oftsr.student_output(u, x_src, c, 1e-6)
    assert torch.allclose(fidelity, gs.post_mean(c), atol=1e-5)
    realism = oftsr.student_output(u, x_src, c, 1.0)
    assert torch.allclose(realism, gs.flow(x_src, c, torch.zeros(256, dtype=F64)), atol=1e-8)
    # the realism end is a posterior sample: fixed c, many source draws -> covariance P
    c0 = c[:1].expand(20_000, 2)
    _, _, xs = gs.sample(20_000, torch.Generator().manual_seed(4), c=c0)
    ends = gs.flow(xs, c0, torch.zeros(20_000, dtype=F64))
    assert torch.allclose(ends.mean(0), gs.post_mean(c0[:1])[0], atol=0.01)
    assert torch.allclose(torch.cov(ends.T), gs.P, atol=0.01)


def test_teacher_initialised_student_is_the_posterior_mean_at_tau_zero(gs):
    """`student_from_velocity(teacher)` at tau = 0: the teacher's one-step output = m_c, and no boundary loss."""
    _, c, x_src = batch(gs, 128)
    s = oftsr.student_from_velocity(gs.velocity)
    assert torch.allclose(oftsr.student_output(s, x_src, c, 0.0), gs.post_mean(c), atol=1e-10)
    loss = oftsr.oftsr_loss(s, gs.velocity, x_src, c, torch.zeros(128, dtype=F64), distance="l2")
    assert loss.shape == (128,) and float(loss.max()) > 0  # its trajectory term is not zero ...
    s_only = oftsr.oftsr_loss(s, gs.velocity, x_src, c, 0.0, distance="l2", boundary_weight=0.0)
    assert torch.allclose(loss, s_only, atol=1e-14)  # ... but its boundary term is


def test_exact_student_has_zero_loss_up_to_the_midpoint_rule(gs):
    """The exact student's loss is the midpoint step's local error squared: ~0. Here Sigma_t is quadratic in t and
    m_t linear, for which the midpoint rule's h^3 error term cancels (docs/oftsr.md): the local error is O(delta^4),
    the loss O(delta^8), x256 when delta halves. An Euler target would give x16 (checked below)."""
    _, c, x_src = batch(gs, 128)
    u = exact_student(gs)
    tau = oftsr.sample_knob(128, 0.1, torch.Generator().manual_seed(5), dtype=F64)
    losses = [oftsr.oftsr_loss(u, gs.velocity, x_src, c, tau, delta=d, distance="l2", space="state").mean()
              for d in (0.1, 0.05)]
    assert losses[1] < 1e-12, losses
    assert 200 < float(losses[0] / losses[1]) < 300, losses
    t, euler = 1 - tau, []
    for d in (0.1, 0.05):
        x = oftsr.student_state(u, x_src, c, tau)
        euler.append((oftsr.student_state(u, x_src, c, tau + d) - (x - d * gs.velocity(x, t, c))).pow(2).mean())
    assert 12 < float(euler[0] / euler[1]) < 20 and euler[1] > 1e5 * losses[1], euler


def test_perturbed_students_have_positive_loss(gs):
    _, c, x_src = batch(gs, 128)
    u = exact_student(gs)
    tau = oftsr.sample_knob(128, generator=torch.Generator().manual_seed(6), dtype=F64)
    exact = oftsr.oftsr_loss(u, gs.velocity, x_src, c, tau, distance="l2").mean()
    bent = lambda x, t, cond: u(x, t, cond) + 0.05 * torch.sin(3 * t)[:, None]  # boundary intact
    offset = lambda x, t, cond: u(x, t, cond) + 0.05  # boundary off too
    for student in (bent, offset):
        loss = oftsr.oftsr_loss(student, gs.velocity, x_src, c, tau, distance="l2").mean()
        assert loss > 1e3 * exact and loss > 1e-6, (loss, exact)
    bound = oftsr.oftsr_loss(offset, gs.velocity, x_src, c, tau, distance="l2") - oftsr.oftsr_loss(
        offset, gs.velocity, x_src, c, tau, distance="l2", boundary_weight=0.0)
    assert torch.allclose(bound, torch.full_like(bound, 0.1 * 0.05 ** 2), rtol=1e-6)


class MLPStudent(nn.Module):
    """u(x_src, tau, c) from (x_src, c's one pixel, tau)."""

    def __init__(self, width=64, dtype=torch.float32):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 2)).to(dtype)

    def forward(self, x, tau, cond):
        return self.net(torch.cat([x, cond[:, :1], tau[:, None].to(x.dtype)], 1))


class ScaledTeacher(nn.Module):
    """The closed-form teacher with a parameter, to show it gets no gradient."""

    def __init__(self, gs):
        super().__init__()
        self.gs, self.scale = gs, nn.Parameter(torch.ones((), dtype=F64))

    def forward(self, x, t, cond):
        return self.scale * self.gs.velocity(x, t, cond)


def test_gradient_flows_only_through_the_student(gs):
    torch.manual_seed(0)
    student, teacher = MLPStudent(dtype=F64), ScaledTeacher(gs)
    _, c, x_src = batch(gs, 64)
    tau = oftsr.sample_knob(64, generator=torch.Generator().manual_seed(7), dtype=F64)
    oftsr.oftsr_loss(student, teacher, x_src, c, tau, distance="l2").mean().backward()
    assert teacher.scale.grad is None
    got = [p.grad.clone() for p in student.parameters()]
    # the same gradient from constants computed beforehand: the target and v(x_src, 1) are stop-gradient
    student.zero_grad()
    target = oftsr.oftsr_target(student, teacher, x_src, c, tau).detach()
    v_src = gs.velocity(x_src, torch.ones(64, dtype=F64), c)
    zero = torch.zeros(64, dtype=F64)
    tau1 = (tau + oftsr.DELTA)[:, None]
    ((student(x_src, tau + oftsr.DELTA, c) - (x_src - target) / tau1).pow(2).mean(1)
     + 0.1 * (student(x_src, zero, c) - v_src).pow(2).mean(1)).mean().backward()
    for a, b in zip(got, student.parameters()):
        assert torch.allclose(a, b.grad, atol=1e-12)
    # and it differs from the gradient with the target left attached (so the check above means something)
    student.zero_grad()
    x_tau = oftsr.student_state(student, x_src, c, tau)
    t = 1 - tau
    attached = x_tau - oftsr.DELTA * teacher(x_tau - oftsr.DELTA / 2 * teacher(x_tau, t, c), t - oftsr.DELTA / 2, c)
    ((student(x_src, tau + oftsr.DELTA, c) - (x_src - attached) / tau1).pow(2).mean(1)
     + 0.1 * (student(x_src, zero, c) - v_src).pow(2).mean(1)).mean().backward()
    assert max(float((a - b.grad).abs().max()) for a, b in zip(got, student.parameters())) > 1e-6


def test_velocity_space_is_the_state_distance_over_tau_squared(gs):
    """For l2 the default (OFTSR's) velocity-space term is the state-space term divided by (tau + delta)^2."""
    _, c, x_src = batch(gs, 64)
    student = oftsr.student_from_velocity(gs.velocity)
    tau = oftsr.sample_knob(64, generator=torch.Generator().manual_seed(11), dtype=F64)
    kw = dict(distance="l2", boundary_weight=0.0)
    vel = oftsr.oftsr_loss(student, gs.velocity, x_src, c, tau, space="velocity", **kw)
    state = oftsr.oftsr_loss(student, gs.velocity, x_src, c, tau, space="state", **kw)
    assert torch.allclose(vel * (tau + oftsr.DELTA) ** 2, state, rtol=1e-10) and float(state.min()) > 0
    with pytest.raises(ValueError, match="unknown space"):
        oftsr.oftsr_loss(student, gs.velocity, x_src, c, tau, space="output")


def test_alignment_term_is_the_distance_to_the_teachers_slope(gs):
    """align_weight * (1 - tau)^2 * l2(u(tau), w), w the teacher's midpoint slope at the student's state, computed
    here by hand from the closed-form teacher; it reaches the student's call at tau (none without it)."""
    _, c, x_src = batch(gs, 64)
    u = exact_student(gs)
    tau = oftsr.sample_knob(64, generator=torch.Generator().manual_seed(12), dtype=F64)
    kw = dict(distance="l2")
    extra = (oftsr.oftsr_loss(u, gs.velocity, x_src, c, tau, align_weight=0.01, **kw)
             - oftsr.oftsr_loss(u, gs.velocity, x_src, c, tau, **kw))
    u_tau, t, h = u(x_src, tau, c), 1 - tau, oftsr.DELTA
    x = x_src - tau[:, None] * u_tau
    w = gs.velocity(x - h / 2 * gs.velocity(x, t, c), t - h / 2, c)
    assert torch.allclose(extra, 0.01 * (1 - tau) ** 2 * (u_tau - w).pow(2).mean(1), rtol=1e-8, atol=1e-15)
    assert float(extra.max()) > 1e-6  # the exact student is not its minimiser: a regulariser, not a constraint
    seen = []

    def spy(x, tau, cond):
        out = u(x, tau, cond).detach().requires_grad_()
        seen.append(out)
        return out

    oftsr.oftsr_loss(spy, gs.velocity, x_src, c, tau, align_weight=0.01, **kw).sum().backward()
    assert seen[0].grad is not None and float(seen[0].grad.abs().max()) > 0
    seen.clear()
    oftsr.oftsr_loss(spy, gs.velocity, x_src, c, tau, **kw).sum().backward()
    assert seen[0].grad is None and seen[1].grad is not None


def test_knob_sampler_and_range():
    tau = oftsr.sample_knob(100_000, 0.05, torch.Generator().manual_seed(8))
    assert float(tau.min()) >= 0 and float(tau.max()) <= 0.95
    assert abs(float(tau.mean()) - 0.475) < 0.005 and abs(float(tau.var()) - 0.95 ** 2 / 12) < 0.002
    x = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="tau must lie"):
        oftsr.oftsr_loss(lambda x, t, c: x, lambda x, t, c: x, x, None, 0.97)


TRAIN_STEPS = 1500


def test_mlp_student_trained_with_oftsr_loss_approaches_the_closed_form():
    """A 3-layer MLP student (float64) trained with oftsr_loss on fresh draws: its one-call outputs at five knob
    values are close to the exact student's (closed form), much closer than the fidelity end is to the realism end.
    Measured (1,500 steps, ~8 s, the default velocity-space loss): rms error 0.009, 0.013, 0.012, 0.015, 0.010 at
    tau 0.01 ... 0.99 against a spread of 0.558 between the two ends, i.e. <= 2.6% of it; the bound is 5%. (The same
    run with space="state": 0.006, 0.037, 0.032, 0.032, 0.023.)"""
    gs = GaussSR()
    torch.manual_seed(0)
    student = MLPStudent().double()
    opt = torch.optim.Adam(student.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, TRAIN_STEPS)
    gen = torch.Generator().manual_seed(9)
    for _ in range(TRAIN_STEPS):
        _, c, x_src = gs.sample(256, gen)
        tau = oftsr.sample_knob(256, generator=gen, dtype=F64)
        loss = oftsr.oftsr_loss(student, gs.velocity, x_src, c, tau, distance="l2").mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    _, c, x_src = batch(gs, 1024, seed=10)
    spread = (gs.post_mean(c) - gs.flow(x_src, c, torch.zeros(1024, dtype=F64))).pow(2).sum(1).mean().sqrt()
    with torch.no_grad():
        for tau in (0.01, 0.25, 0.5, 0.75, 0.99):
            t = torch.full((1024,), tau, dtype=F64)
            exact = gs.flow(x_src, c, 1 - t)  # the exact state; the exact output extends the chord from x_src
            exact_out = x_src + (exact - x_src) / tau
            err = (oftsr.student_output(student, x_src, c, t) - exact_out).pow(2).sum(1).mean().sqrt()
            print(f"tau={tau}: rms error {float(err):.4f} (fidelity-to-realism spread {float(spread):.4f})")
            assert err < 0.05 * spread, (tau, float(err), float(spread))
