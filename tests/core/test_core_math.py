"""Closed-form checks of the core maths: convention, time distributions, losses, solvers (order, NFE, inversion)."""
import math

import pytest
import torch

from helpers import NFECounter

from reflow_core import losses, paths, solvers


# --- the time convention (docs/architecture.md, "Time convention") ---------------------------------------------------------------------

def test_interpolation_endpoints_and_target_sign():
    x_data, x_noise = torch.randn(5, 3), torch.randn(5, 3)
    assert torch.allclose(paths.interpolate(x_data, x_noise, torch.zeros(5)), x_data)  # t = 0 is data
    assert torch.allclose(paths.interpolate(x_data, x_noise, torch.ones(5)), x_noise)  # t = 1 is noise
    t = torch.rand(5)
    ps = paths.path_sample(x_data, x_noise, t)
    h = 1e-3  # v is d x_t / dt
    fd = (paths.interpolate(x_data, x_noise, t + h) - paths.interpolate(x_data, x_noise, t - h)) / (2 * h)
    assert torch.allclose(ps.v, fd, atol=1e-3)
    assert torch.allclose(ps.v, x_noise - x_data)


def test_generation_runs_from_noise_to_data():
    """The exact velocity of a single pair carries its noise to its data point in one Euler step."""
    x_data, x_noise = torch.randn(4, 2), torch.randn(4, 2)
    out = solvers.sample(lambda x, t: x_noise - x_data, x_noise, nfe=1)
    assert torch.allclose(out, x_data, atol=1e-6)
    back = solvers.invert(lambda x, t: x_noise - x_data, x_data, nfe=1)
    assert torch.allclose(back, x_noise, atol=1e-6)


# --- time distributions ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", paths.TIME_DISTS)
def test_time_samples_match_density(kind):
    g = torch.Generator().manual_seed(0)
    t = paths.sample_time(kind, 200_000, g).double()
    assert t.min() >= 0 and t.max() <= 1
    hist = torch.histc(t, bins=20, min=0, max=1) / len(t) * 20
    centres = (torch.arange(20, dtype=torch.float64) + 0.5) / 20
    dens = paths.time_density(kind, centres)
    grid = torch.linspace(1e-4, 1 - 1e-4, 20001, dtype=torch.float64)
    assert abs(torch.trapezoid(paths.time_density(kind, grid), grid).item() - 1) < 1e-2  # normalised
    # histogram vs density in the bulk (logit-normal's edges are too thin to compare)
    inner = slice(2, 18)
    assert torch.allclose(hist[inner], dens[inner], rtol=0.08, atol=0.03)


def test_exponential_puts_mass_toward_noise():
    t = paths.sample_time("exponential", 100_000, torch.Generator().manual_seed(1))
    assert t.mean() > 0.55 and (t > 0.5).float().mean() > 0.7  # b = 10: P(t > 1/2) = (10 - sqrt 10)/9 = 0.76
    assert abs((t > 0.5).float().mean().item() - (10 - math.sqrt(10)) / 9) < 0.01


def test_unknown_time_distribution_is_named():
    with pytest.raises(ValueError, match="uniform"):
        paths.sample_time("bogus", 3)


# --- losses ------------------------------------------------------------------------------------------------------

def test_pseudo_huber_value_and_gradient():
    r = torch.tensor([[3.0, 4.0], [0.0, 0.0]], requires_grad=True)
    c = 0.5
    val = losses.pseudo_huber(r, c)
    assert torch.allclose(val, torch.tensor([math.sqrt(25 + 0.25) - 0.5, 0.0]))
    val.sum().backward()
    assert torch.allclose(r.grad[0], torch.tensor([3.0, 4.0]) / math.sqrt(25.25))  # r / sqrt(|r|^2 + c^2)
    assert torch.allclose(r.grad[1], torch.zeros(2))
    assert losses.huber_c(0.00054, 3 * 32 * 32) == pytest.approx(0.00054 * math.sqrt(3072))


def test_normalised_loss_value_one_gradient_rescaled():
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    per = w ** 2  # per-sample losses 1 and 4
    out = losses.normalise(per, eps=0.0)
    assert torch.allclose(out, torch.ones(2))
    out.sum().backward()
    assert torch.allclose(w.grad, 2 * w.detach() / per.detach())  # grad(loss) / stopgrad(loss)


def test_mse_per_sample():
    r = torch.arange(8.0).reshape(2, 4)
    assert torch.allclose(losses.mse(r), torch.tensor([(0 + 1 + 4 + 9) / 4, (16 + 25 + 36 + 49) / 4]))


def test_high_pass_is_invertible_linear_and_boosts_high_frequencies():
    hp = losses.HighPass(2.0)
    a, b = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    assert torch.allclose(hp(a + 2 * b), hp(a) + 2 * hp(b), atol=1e-5)  # linear
    # as a matrix on one 8x8 channel it is full rank (invertible: Proposition 1 keeps the minimiser)
    basis = torch.eye(64).reshape(64, 1, 8, 8)
    m = hp(basis).reshape(64, 64)
    assert torch.linalg.matrix_rank(m) == 64
    smooth = torch.ones(1, 1, 8, 8)
    checker = (torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2 * 2.0 - 1
    assert torch.allclose(hp(smooth), smooth)  # constant image untouched
    assert hp(checker[None, None]).norm() > 2.5 * checker.norm()  # highest frequency amplified
    assert losses.HighPass(0.0)(a) is a


# --- solvers -----------------------------------------------------------------------------------------------------

def _rotation_problem():
    """dx/dt = A x with A a rotation generator: the exact flow from t=1 to t=0 is expm(-A) x."""
    a = torch.tensor([[0.0, -2.0], [2.0, 0.0]], dtype=torch.float64)
    x1 = torch.tensor([[1.0, 0.5]], dtype=torch.float64)
    exact = x1 @ torch.linalg.matrix_exp(-a).T
    return (lambda x, t: x @ a.T), x1, exact


@pytest.mark.parametrize("solver,order", [("euler", 1), ("heun", 2)])
def test_convergence_order(solver, order):
    v, x1, exact = _rotation_problem()
    errs = []
    for steps in (16, 32, 64):
        x = solvers.integrate(v, x1, solvers.time_grid(steps), solver)
        errs.append((x - exact).norm().item())
    ratios = [errs[i] / errs[i + 1] for i in range(2)]
    # halving the step divides the error by ~2 (first order) or ~4 (second order; last Euler step is O(h^2))
    for r in ratios:
        assert 2 ** order * 0.8 < r < 2 ** order * 1.25, (errs, ratios)


@pytest.mark.parametrize("solver,nfe", [("euler", 1), ("euler", 7), ("heun", 1), ("heun", 9), ("heun", 35)])
def test_nfe_is_exact(solver, nfe):
    counter = NFECounter(lambda x, t: -x)
    solvers.sample(counter, torch.randn(3, 2), nfe, solver)
    assert counter.nfe == nfe
    assert solvers.nfe_for_steps(solver, solvers.steps_for_nfe(solver, nfe)) == nfe


def test_heun_rejects_even_nfe():
    with pytest.raises(ValueError, match="odd"):
        solvers.steps_for_nfe("heun", 4)


def test_inversion_then_generation_returns_start():
    torch.manual_seed(0)
    w = torch.randn(2, 2, dtype=torch.float64) * 0.5

    def v(x, t):  # smooth, nonlinear, time-dependent
        return torch.tanh(x @ w) + t[:, None].to(x.dtype) * x

    x0 = torch.randn(64, 2, dtype=torch.float64)
    errs = []
    for nfe in (51, 101, 201):
        z = solvers.invert(v, x0, nfe=nfe, solver="heun")
        assert (z - x0).abs().max() > 0.1  # it really moved to the noise end
        back = solvers.sample(v, z, nfe=nfe, solver="heun")
        errs.append((back - x0).abs().max().item())
    assert errs[-1] < 1e-3
    # the round-trip error is the final Euler step's O(h^2) local error: halving h cuts it ~4x
    assert errs[0] / errs[1] > 3 and errs[1] / errs[2] > 3, errs


def test_time_grids():
    g = solvers.time_grid(4)
    assert g.dtype == torch.float64 and g[0] == 1 and g[-1] == 0 and torch.allclose(g.diff(), torch.full((4,), -0.25,
                                                                                                    dtype=torch.float64))
    r = solvers.time_grid(8, "rho", rho=3.0)
    assert r[0] == 1 and r[-1] == 0 and torch.all(r.diff() < 0)
    assert (r[-2] - r[-1]) < (r[0] - r[1])  # rho > 1: finer steps near the data end
    assert torch.allclose(solvers.time_grid(5, "rho", rho=1.0), solvers.time_grid(5))
    lst = solvers.time_grid(2, "list", times=[1.0, 0.3, 0.0])
    assert lst.tolist() == [1.0, 0.3, 0.0]
    with pytest.raises(ValueError, match="monotone"):
        solvers.time_grid(2, "list", times=[1.0, 0.0, 0.3])


def test_guided_velocity_and_honest_nfe():
    c = NFECounter(lambda x, t: torch.ones_like(x))
    u = NFECounter(lambda x, t: torch.zeros_like(x))
    v = solvers.guided(c, u, w=3.0)
    out = solvers.sample(v, torch.zeros(2, 2), nfe=1)
    assert torch.allclose(out, torch.full((2, 2), -3.0))  # one Euler step of size -1 with v = 0 + 3 (1 - 0)
    assert c.nfe + u.nfe == 2  # one guided step costs two evaluations
    # the ends of the weight range are exact, not just close: w = 1 is v_cond, w = 0 is v_guide
    g = torch.Generator().manual_seed(0)
    a, b, x, t = torch.randn(8, 3, generator=g), torch.randn(8, 3, generator=g), torch.zeros(8, 3), torch.zeros(8)
    assert torch.equal(solvers.guided(lambda x, t: a, lambda x, t: b, 1.0)(x, t), a)
    assert torch.equal(solvers.guided(lambda x, t: a, lambda x, t: b, 0.0)(x, t), b)
