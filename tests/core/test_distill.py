"""reflow_core.distill: one-step students, FGD and annealing reflow against closed forms (CPU, seconds).

Convention: t = 0 data, t = 1 noise. The linear-Gaussian teacher below is *straight*: its trajectories are the lines
from a noise x1 to its data point mu + s x1, x_t = (1 - t)(mu + s x1) + t x1, so
    v_T(x, t) = (1 - s) x1 - mu,     x1 = (x - (1 - t) mu) / ((1 - t) s + t),
and one Euler step from any t to 0 lands exactly on mu + s x1.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from reflow_core import distill
from reflow_core.train import Batch

MU = (1.5, -0.5)
S = 0.5


class StraightGaussTeacher(nn.Module):
    """v_T of the straight flow from N(0, I) to N(mu, s^2 I): x1 = mu + s x1 paired with its own noise."""

    def __init__(self, mu, s, dtype=torch.float64):
        super().__init__()
        self.register_buffer("mu", torch.tensor(mu, dtype=dtype))
        self.s = float(s)

    def forward(self, x, t, label=None):
        tt = t.reshape(-1, 1).to(x.dtype)
        x1 = (x - (1 - tt) * self.mu) / ((1 - tt) * self.s + tt)
        return (1 - self.s) * x1 - self.mu


class LinearStudent(nn.Module):
    """A student whose one-step map is x1 -> mu' + s' x1: v_s(x, 1) = x - (mu' + s' x) (only t = 1 is meaningful)."""

    def __init__(self, mu, s, dtype=torch.float64):
        super().__init__()
        self.mu = nn.Parameter(torch.tensor(mu, dtype=dtype))
        self.s = nn.Parameter(torch.tensor(float(s), dtype=dtype))

    def forward(self, x, t, label=None):
        return x - (self.mu + self.s * x)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# --- FGD closed forms -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fgd_exact_student_is_a_fixed_point(dtype):
    teacher = StraightGaussTeacher(MU, S, dtype)
    student = LinearStudent(MU, S, dtype)
    e = torch.randn(512, 2, generator=_gen(1), dtype=torch.float64).to(dtype)
    mu = torch.tensor(MU, dtype=dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for tv in torch.linspace(0.2, 0.8, 13).tolist():
        t = torch.full((512,), tv, dtype=dtype)
        target = distill.fgd_target(student, teacher, e, t)
        torch.testing.assert_close(target, mu + S * e, atol=tol, rtol=0)                 # the teacher's map
        torch.testing.assert_close(target, distill.one_step(student, e), atol=tol, rtol=0)  # = the student's output
    batch = Batch(x_data=torch.zeros(512, 2, dtype=dtype), x_noise=torch.zeros(512, 2, dtype=dtype))
    for dist in ("l2", "pseudo_huber"):
        loss = distill.fgd_loss(student, teacher, batch, _gen(2), distance=dist)
        assert loss.shape == (512,)
        assert loss.abs().max().item() < (1e-9 if dtype == torch.float32 else 1e-20)


def test_fgd_target_closed_form_for_a_wrong_linear_student():
    # Student one-step map mu' + s' e, so v_s = (1 - s') e - mu' and the point on its line at t is
    #   x_t = e - (1 - t) v_s = (1 - t)(mu' + s' e) + t e.
    # The straight teacher's x1 of that point and its one-Euler-step end point mu + s x1 give
    #   target = mu + s [(1 - t)(mu' - mu) + ((1 - t) s' + t) e] / ((1 - t) s + t).
    mu, s = torch.tensor(MU, dtype=torch.float64), S
    mu_p, s_p = torch.tensor([-0.3, 0.8], dtype=torch.float64), 1.3
    teacher, student = StraightGaussTeacher(MU, S), LinearStudent(mu_p.tolist(), s_p)
    g = _gen(3)
    e = torch.randn(256, 2, generator=g, dtype=torch.float64)
    t = 0.2 + 0.6 * torch.rand(256, generator=g, dtype=torch.float64)
    tt = t[:, None]
    expected = mu + s * ((1 - tt) * (mu_p - mu) + ((1 - tt) * s_p + tt) * e) / ((1 - tt) * s + tt)
    torch.testing.assert_close(distill.fgd_target(student, teacher, e, t), expected, atol=1e-6, rtol=0)
    # and it is not the student's own output (else the test would prove nothing)
    assert (expected - distill.one_step(student, e)).abs().max() > 0.1


def test_fgd_gradient_flows_only_through_the_one_step_prediction():
    # Same draws (noise, then t, from the generator) -> the loss and gradient of l2(one_step(e), sg(target)).
    teacher, student = StraightGaussTeacher(MU, S), LinearStudent([0.2, 0.1], 0.9)
    batch = Batch(x_data=torch.zeros(64, 2, dtype=torch.float64), x_noise=torch.zeros(64, 2, dtype=torch.float64))
    loss = distill.fgd_loss(student, teacher, batch, _gen(4), distance="l2", t_range=(0.3, 0.6))
    g_impl = torch.autograd.grad(loss.mean(), [student.mu, student.s])
    g = _gen(4)
    e = torch.randn(64, 2, generator=g, dtype=torch.float64)
    t = 0.3 + 0.3 * torch.rand(64, generator=g, dtype=torch.float64)
    assert t.min() >= 0.3 and t.max() <= 0.6
    target = distill.fgd_target(student, teacher, e, t)
    ref = ((distill.one_step(student, e) - target) ** 2).mean(1)
    torch.testing.assert_close(loss, ref, atol=1e-12, rtol=0)
    for a, b in zip(g_impl, torch.autograd.grad(ref.mean(), [student.mu, student.s])):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_fgd_alone_converges_to_the_teachers_map():
    teacher, student = StraightGaussTeacher(MU, S), LinearStudent([0.0, 0.0], 1.0)
    opt = torch.optim.SGD(student.parameters(), lr=0.5)
    g = _gen(5)
    batch = Batch(x_data=torch.zeros(512, 2, dtype=torch.float64), x_noise=torch.zeros(512, 2, dtype=torch.float64))
    for _ in range(300):
        loss = distill.fgd_loss(student, teacher, batch, g, distance="l2").mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert (student.mu.detach() - torch.tensor(MU, dtype=torch.float64)).abs().max() < 1e-2, student.mu
    assert abs(student.s.item() - S) < 1e-2, student.s


# --- one step and the pair loss -------------------------------------------------------------------------------------

def test_one_step_and_distill_loss_of_a_known_student():
    mu_p, s_p = [0.25, -1.0], 0.7
    student = LinearStudent(mu_p, s_p, torch.float32)
    g = _gen(6)
    xn, xd = torch.randn(32, 2, generator=g), torch.randn(32, 2, generator=g)
    pred = torch.tensor(mu_p) + s_p * xn
    torch.testing.assert_close(distill.one_step(student, xn), pred)
    batch = Batch(x_data=xd, x_noise=xn)
    torch.testing.assert_close(distill.distill_loss(student, batch, distance="l2"), ((pred - xd) ** 2).mean(1))
    c = 0.00054 * math.sqrt(2)
    ph = torch.sqrt(((pred - xd) ** 2).sum(1) + c * c) - c
    torch.testing.assert_close(distill.distill_loss(student, batch), ph)  # default: pseudo-Huber, reflow's c
    c2 = 0.01 * math.sqrt(2)
    torch.testing.assert_close(distill.distill_loss(student, batch, huber_scale=0.01),
                               torch.sqrt(((pred - xd) ** 2).sum(1) + c2 * c2) - c2)
    # images (B, 1, 8, 8): the same, per sample over 64 dimensions
    xi, di = torch.randn(4, 1, 8, 8, generator=g), torch.randn(4, 1, 8, 8, generator=g)
    predi = torch.tensor(0.25) + s_p * xi
    student_i = LinearStudent(0.25, s_p, torch.float32)
    torch.testing.assert_close(distill.distill_loss(student_i, Batch(di, xi), distance="l2"),
                               ((predi - di) ** 2).flatten(1).mean(1))
    with pytest.raises(ValueError, match="unknown distance"):
        distill.distill_loss(student, batch, distance="l1")


def test_slim_distill_loss_with_velocity_models():
    from reflow_core.config import NetConfig
    from reflow_core.velocity import build_velocity_model
    torch.manual_seed(0)
    teacher = build_velocity_model(NetConfig(hidden=32, depth=2, class_cond=True), (2,), 3).eval()
    student = build_velocity_model(NetConfig(hidden=16, depth=2, class_cond=True), (2,), 3).train()
    g = _gen(7)
    batch = Batch(torch.randn(8, 2, generator=g), torch.randn(8, 2, generator=g), torch.arange(8) % 3)
    loss = distill.slim_distill_loss(student, teacher, batch, _gen(8), fgd_weight=0.5)
    assert loss.shape == (8,) and torch.isfinite(loss).all()
    expected = (distill.distill_loss(student, batch)
                + 0.5 * distill.fgd_loss(student, teacher, batch, _gen(8)))
    torch.testing.assert_close(loss, expected)
    loss.mean().backward()
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    # fgd_weight = 0: the pair loss alone, nothing drawn
    g0 = _gen(9)
    state = g0.get_state()
    torch.testing.assert_close(distill.slim_distill_loss(student, teacher, batch, g0, fgd_weight=0.0),
                               distill.distill_loss(student, batch))
    assert torch.equal(g0.get_state(), state)


# --- annealing reflow -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("schedule", distill.SCHEDULES)
def test_beta_schedules(schedule):
    steps = 1000
    vals = [distill.beta(s, steps, schedule) for s in range(0, steps + 50)]
    assert vals[0] == 1.0
    assert vals[steps] == 0.0 and all(v == 0.0 for v in vals[steps:])
    assert all(a >= b for a, b in zip(vals, vals[1:])), "not monotone non-increasing"
    assert all(0.0 <= v <= 1.0 for v in vals)
    assert 0.0 < distill.beta(steps // 2, steps, schedule) < 1.0
    assert distill.beta(0, 0, schedule) == 0.0  # no annealing


def test_beta_values_and_errors():
    assert distill.beta(250, 1000, "linear") == pytest.approx(0.75)
    assert distill.beta(500, 1000, "cosine") == pytest.approx(0.5)
    f = math.exp(-5)
    assert distill.beta(200, 1000, "exponential") == pytest.approx((math.exp(-1) - f) / (1 - f))
    with pytest.raises(ValueError, match="schedule"):
        distill.beta(1, 10, "step")


def test_anneal_source_variance_and_endpoints():
    g = _gen(10)
    x, fresh = torch.randn(100_000, generator=g), torch.randn(100_000, generator=g)
    for b in (0.0, 0.3, 0.7, 0.95, 1.0):
        assert distill.anneal_source(x, fresh, b).var().item() == pytest.approx(1.0, abs=0.02)
    x2, f2 = torch.randn(16, 3, 8, 8, generator=g), torch.randn(16, 3, 8, 8, generator=g)
    assert torch.equal(distill.anneal_source(x2, f2, 0.0), x2)
    assert torch.equal(distill.anneal_source(x2, f2, 1.0), f2)
    with pytest.raises(ValueError):
        distill.anneal_source(x2, f2, 1.5)


def _flipped(out, orig):
    """Per sample: True if out[i] is orig[i] flipped along the last axis, False if unchanged (else fail)."""
    res = []
    for o, x in zip(out, orig):
        if torch.equal(o, x):
            res.append(False)
        else:
            assert torch.equal(o, x.flip(-1))
            res.append(True)
    return torch.tensor(res)


def test_joint_hflip_flips_the_same_samples_in_both():
    g = _gen(11)
    d, n = torch.randn(64, 1, 4, 5, generator=g), torch.randn(64, 1, 4, 5, generator=g)
    d2, n2 = distill.joint_hflip(d, n, _gen(12))
    fd, fn = _flipped(d2, d), _flipped(n2, n)
    assert torch.equal(fd, fn)
    assert 0 < int(fd.sum()) < 64
    d3, n3 = distill.joint_hflip(d, n, _gen(12))  # deterministic for a seeded generator
    assert torch.equal(d2, d3) and torch.equal(n2, n3)
    d4, _ = distill.joint_hflip(d, n, _gen(13))
    assert not torch.equal(d2, d4)
    assert _flipped(distill.joint_hflip(d, n, _gen(0), p=0.0)[0], d).sum() == 0
    assert _flipped(distill.joint_hflip(d, n, _gen(0), p=1.0)[1], n).all()
    # vectors: identity, nothing drawn
    gv = _gen(14)
    state = gv.get_state()
    v, w = torch.randn(8, 2), torch.randn(8, 2)
    v2, w2 = distill.joint_hflip(v, w, gv)
    assert v2 is v and w2 is w and torch.equal(gv.get_state(), state)


def test_anneal_batch():
    g = _gen(15)
    batch = Batch(torch.randn(16, 1, 8, 8, generator=g), torch.randn(16, 1, 8, 8, generator=g), torch.arange(16))
    done = distill.anneal_batch(batch, 100, 100, "cosine", _gen(16), flip=False)  # beta = 0: the pairs themselves
    assert torch.equal(done.x_noise, batch.x_noise) and torch.equal(done.x_data, batch.x_data)
    assert isinstance(done, Batch) and done.label is batch.label
    start = distill.anneal_batch(batch, 0, 100, "linear", _gen(16), flip=False)  # beta = 1: fresh noise
    assert torch.equal(start.x_noise, torch.randn(16, 1, 8, 8, generator=_gen(16)))
    mid = distill.anneal_batch(batch, 50, 100, "linear", _gen(16), flip=True)
    gm = _gen(16)
    fresh = torch.randn(16, 1, 8, 8, generator=gm)
    exp_noise = math.sqrt(1 - 0.25) * batch.x_noise + 0.5 * fresh
    exp_data, exp_noise = distill.joint_hflip(batch.x_data, exp_noise, gm)  # the coins come after the noise
    assert torch.equal(mid.x_data, exp_data) and torch.equal(mid.x_noise, exp_noise)
    assert _flipped(mid.x_data, batch.x_data).any()


# --- LPIPS ----------------------------------------------------------------------------------------------------------

@pytest.fixture
def no_download(monkeypatch):
    """Any download attempt fails the test; the LPIPS cache starts empty."""
    import torchvision.models._api as tv_api

    def fail(*a, **k):
        pytest.fail(f"a download was attempted: {a} {k}")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fail)
    monkeypatch.setattr(torch.hub, "download_url_to_file", fail)
    monkeypatch.setattr(tv_api, "load_state_dict_from_url", fail)
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.setattr(distill, "_LPIPS_CACHE", {})


def test_lpips_offline_names_the_file(tmp_path, monkeypatch, no_download):
    home = tmp_path / "torch_home"
    home.mkdir()
    monkeypatch.setenv("TORCH_HOME", str(home))
    want = str(home / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth")
    assert distill.lpips_weights_path("alex") == (want, "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth")
    x = torch.zeros(2, 1, 8, 8)
    for call in (lambda: distill.lpips_distance(x, x),
                 lambda: distill.distance_fn("lpips"),
                 lambda: distill.distill_loss(LinearStudent(0.0, 1.0, torch.float32), Batch(x, x), distance="lpips")):
        with pytest.raises(FileNotFoundError) as info:
            call()
        assert want in str(info.value) and "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth" in str(
            info.value)
    assert list(home.iterdir()) == []  # nothing created, nothing fetched


def test_lpips_with_local_weights(tmp_path, monkeypatch, no_download):
    pytest.importorskip("lpips")
    import torchvision
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    path, _ = distill.lpips_weights_path("alex")
    import os
    os.makedirs(os.path.dirname(path))
    torch.manual_seed(0)
    feats = torchvision.models.alexnet().features  # random stand-in for the ImageNet weights (features only)
    state = {f"features.{k}": v for k, v in feats.state_dict().items()}
    torch.save(state, path)
    g = _gen(17)
    x = (torch.rand(4, 1, 8, 8, generator=g) * 2 - 1).requires_grad_(True)
    y = torch.rand(4, 1, 8, 8, generator=g) * 2 - 1
    d = distill.lpips_distance(x, y)
    assert d.shape == (4,) and (d > 0).all()
    assert distill.lpips_distance(y, y).abs().max() == 0
    d.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    model = next(iter(distill._LPIPS_CACHE.values()))
    assert torch.equal(model.net.slice1[0].weight, state["features.0.weight"])  # the file's weights, loaded
    assert torch.equal(getattr(model.net.slice5, "10").weight, state["features.10.weight"])
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    assert distill.lpips_prepare(torch.zeros(2, 1, 8, 8)).shape == (2, 3, 32, 32)
    assert distill.lpips_prepare(torch.zeros(2, 3, 64, 48)).shape == (2, 3, 64, 48)
    with pytest.raises(ValueError):
        distill.lpips_prepare(torch.zeros(2, 2))
