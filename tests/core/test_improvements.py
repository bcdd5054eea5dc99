"""Simple ReFlow's seven improvements and guidance: each switch's mathematics, not only that it runs."""
import math

import pytest
import torch
from torch import nn

from helpers import NFECounter

from reflow_core import checkpoint, solvers, stages
from reflow_core.config import ConfigError, EvalConfig, NetConfig, TrainConfig
from reflow_core.preset import load_preset, preset_names
from reflow_core.losses import HighPass, huber_c, mse, normalise, pseudo_huber
from reflow_core.nets import build_net
from reflow_core.callbacks import NullCallback
from reflow_core.pairs import PairSampler, PairStore
from reflow_core.paths import sample_time
from reflow_core.stages import load_model, prepare_run
from reflow_core.stages.evaluate import guide_checkpoint
from reflow_core.train import Batch, flow_matching_loss
from reflow_core.tuning import search_rho
from reflow_core.velocity import build_velocity_model, generate


# --- 1. loss normalisation -----------------------------------------------------------------------------------------

def test_loss_norm_makes_each_value_one_and_rescales_gradients():
    torch.manual_seed(0)
    w = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)
    x = torch.randn(8, 4, dtype=torch.float64)
    y = torch.randn(8, 4, dtype=torch.float64) * torch.linspace(0.1, 10, 8, dtype=torch.float64)[:, None]
    per = mse(x @ w - y)
    eps = 1e-3
    normed = normalise(per, eps)
    # value: L / (L + eps), i.e. 1 up to eps / L for every sample whatever its scale
    assert torch.allclose(normed, per / (per + eps))
    assert torch.all((normed - 1).abs() <= eps / per.detach() + 1e-12)
    # gradient: grad(L_i) / (L_i + eps) -- a per-sample rescaling, not a change of direction
    (g_norm,) = torch.autograd.grad(normed.sum(), w, retain_graph=True)
    expect = sum(torch.autograd.grad(per[i], w, retain_graph=True)[0] / (per[i].detach() + eps) for i in range(8))
    assert torch.allclose(g_norm, expect)


def test_loss_norm_switch_in_the_training_loss():
    net = build_net(NetConfig(kind="mlp", hidden=16, depth=2), (2,))
    b = Batch(torch.randn(32, 2), torch.randn(32, 2))
    raw = flow_matching_loss(net, b, TrainConfig(), torch.Generator().manual_seed(3))
    normed = flow_matching_loss(net, b, TrainConfig(loss_norm=True), torch.Generator().manual_seed(3))
    assert torch.allclose(normed, raw / (raw.detach() + 1e-3))
    assert torch.allclose(normed, torch.ones(32), atol=0.02)


# --- 2. time distribution ------------------------------------------------------------------------------------------

def test_exponential_time_distribution_matches_closed_form():
    b = 10.0
    assert TrainConfig(time_dist="exponential").time_dist_param is None  # None -> the default base b = 10
    t = sample_time("exponential", 400_000, torch.Generator().manual_seed(0)).double()
    assert t.min() >= 0 and t.max() <= 1
    mean = b / (b - 1) - 1 / math.log(b)  # E[t] for density ln(b) b^t / (b - 1) on [0, 1]
    assert abs(t.mean().item() - mean) < 3e-3, (t.mean().item(), mean)
    # CDF(1/2) = (sqrt(b) - 1) / (b - 1): most mass at the noise end t = 1
    assert abs((t < 0.5).double().mean().item() - (math.sqrt(b) - 1) / (b - 1)) < 3e-3
    t2 = sample_time("exponential", 400_000, torch.Generator().manual_seed(0), param=b)
    assert torch.equal(t2, t.float())


# --- 3. HPF residual + pseudo-Huber: same minimiser (Proposition 1) ------------------------------------------------

def _fit(loss_fn, x, y):
    """Least-squares-style fit of a full linear map W on flattened 1x4x4 images, by L-BFGS in float64."""
    w = torch.zeros(16, 16, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        r = (x.flatten(1) @ w.T - y.flatten(1)).reshape(y.shape)
        loss = loss_fn(r).mean()
        loss.backward()
        return loss
    for _ in range(5):
        opt.step(closure)
    return w.detach()


def test_highpass_is_invertible_linear_and_keeps_the_mse_minimiser():
    torch.manual_seed(0)
    hpf = HighPass(2.0)
    # linear and invertible: its matrix on 16 pixels has full rank
    basis = torch.eye(16, dtype=torch.float64).reshape(16, 1, 4, 4)
    m = hpf(basis).reshape(16, 16)
    assert torch.linalg.matrix_rank(m) == 16
    r1, r2 = torch.randn(3, 1, 4, 4, dtype=torch.float64), torch.randn(3, 1, 4, 4, dtype=torch.float64)
    assert torch.allclose(hpf(2 * r1 - r2), 2 * hpf(r1) - hpf(r2))
    # noisy data: plain MSE and HPF-MSE fits of a linear model have the same optimum
    w_true = torch.randn(16, 16, dtype=torch.float64) / 4
    x = torch.randn(200, 1, 4, 4, dtype=torch.float64)
    y = (x.flatten(1) @ w_true.T).reshape(x.shape) + 0.3 * torch.randn(200, 1, 4, 4, dtype=torch.float64)
    w_mse = _fit(mse, x, y)
    w_hpf = _fit(lambda r: mse(hpf(r)), x, y)
    assert torch.allclose(w_mse, w_hpf, atol=1e-6), (w_mse - w_hpf).abs().max()
    assert (w_mse - w_true).abs().max() > 1e-3  # a real, noisy fit, not the trivial one
    # realisable targets: HPF + pseudo-Huber recovers the same map as MSE
    y_clean = (x.flatten(1) @ w_true.T).reshape(x.shape)
    c = huber_c(0.00054, 16)
    w_ph = _fit(lambda r: pseudo_huber(hpf(r), c), x, y_clean)
    assert torch.allclose(w_ph, w_true, atol=1e-4), (w_ph - w_true).abs().max()
    # ... and it does change what the loss sees: high frequencies weigh (1 + alpha) more
    checker = ((torch.arange(4)[:, None] + torch.arange(4)[None, :]) % 2 * 2 - 1).double().reshape(1, 1, 4, 4)
    assert mse(hpf(checker)) > 4 * mse(checker)


# --- 4-5: reflow dropout and forward pairs in a tiny class-conditional digits run ----------------------------------

TINY = {
    "net": {"kind": "unet", "channels": 8, "channel_mult": [1], "num_res_blocks": 1, "attn_resolutions": [],
            "dropout": 0.2, "class_cond": True},
    "teacher.train": {"steps": 8, "batch_size": 16, "warmup": 1, "ckpt_every": 4, "log_every": 4,
                      "label_dropout": 0.2},
    "pairs": {"n_pairs": 32, "n_forward": 32, "shard_size": 16, "chunk_size": 8, "batch_size": 32, "solver": "heun",
              "nfe": 3, "grid": "uniform"},
    "reflow": {"train": {"steps": 2, "batch_size": 8, "warmup": 1, "ckpt_every": 2, "log_every": 1, "seed": 1},
               "dropout": 0.0, "forward_ratio": 0.25},
    "eval": {"nfes": [2, 4], "n_samples": 32, "straightness_steps": 4, "models": ["reflow"]},
}


def _stage(cfg, rundir, name, **inputs) -> stages.StageOutput:
    """Run one stage instance of cfg's plan with the given inputs (role -> earlier stage output)."""
    s = stages.find(stages.plan(cfg, rundir), name)
    return stages.module(s).run(s, stages.Context(cfg, rundir, NullCallback()), inputs)


@pytest.fixture(scope="module")
def tiny_digits(tmp_path_factory):
    """(cfg, rundir, teacher stage output, reflow stage output): teacher, pairs and reflow stages, no evaluation."""
    root = str(tmp_path_factory.mktemp("improvements"))
    cfg = load_preset("digits", TINY)
    rundir = prepare_run(cfg, root, "tiny")
    teacher = _stage(cfg, rundir, "teacher")
    pairs = _stage(cfg, rundir, "pairs", model=teacher)
    reflow = _stage(cfg, rundir, "reflow", pairs=pairs, init=teacher)
    return cfg, rundir, teacher, reflow


def test_reflow_dropout_differs_from_the_teachers(tiny_digits):
    cfg, _, teacher_out, reflow_out = tiny_digits
    teacher, reflow = teacher_out.urls["model"], reflow_out.urls["model"]
    t_net, r_net = load_model(teacher).train(), load_model(reflow).train()
    t_p = {m.p for m in t_net.modules() if isinstance(m, nn.Dropout)}
    r_p = {m.p for m in r_net.modules() if isinstance(m, nn.Dropout)}
    assert t_p == {0.2} and r_p == {0.0}
    assert checkpoint.load(teacher)["meta"]["net"]["dropout"] == 0.2
    assert checkpoint.load(reflow)["meta"]["net"]["dropout"] == 0.0


def test_forward_pair_fraction_is_exact_in_every_batch(tiny_digits):
    _, rundir, _, _ = tiny_digits
    store = PairStore.open(rundir.url("pairs.zarr"))
    assert store.n_backward == 32 and store.n_forward == 32
    assert store.read(torch.arange(64)).direction.tolist() == [0] * 32 + [1] * 32
    with PairSampler(store, 8, forward_ratio=0.25, seed=0) as sampler, \
            PairSampler(store, 8, forward_ratio=0.25, seed=0, ram_budget_bytes=0) as streamed:
        assert (sampler.mode, streamed.mode) == ("memory", "stream")
        for step in range(10):
            b = sampler.batch(step)
            assert int(b.direction.sum()) == 2 and len(b) == 8
            assert torch.equal(b.index, streamed.batch(step).index)


def test_guide_snapshot_is_the_teacher_ema_at_a_quarter(tiny_digits):
    cfg, _, teacher_out, _ = tiny_digits
    url = guide_checkpoint(cfg, teacher_out)
    assert url.endswith("teacher/guide.pt") and checkpoint.load(url)["step"] == 2
    g, t = load_model(url), load_model(teacher_out.urls["model"])
    assert any(not torch.equal(a, b) for a, b in zip(g.state_dict().values(), t.state_dict().values()))


@pytest.mark.parametrize("guidance", ["none", "cfg", "autoguidance"])
def test_evaluate_reports_network_evaluations(tiny_digits, guidance):
    cfg, rundir, teacher, reflow = tiny_digits
    cfg = cfg.model_copy(deep=True)
    cfg.eval = EvalConfig(**(TINY["eval"] | {"guidance": guidance, "guidance_weight": 1.5, "nfes": [1, 2, 4],
                                             "solvers": ["euler", "heun"]}))
    ev = stages.find(stages.plan(cfg, rundir), "evaluate")  # reads reflow (+ guide: the teacher, autoguidance)
    rows = _stage(cfg, rundir, "evaluate", **stages.inputs_of(ev, {"teacher": teacher, "reflow": reflow})).info["rows"]
    got = {(r["solver"], r["nfe"], r["steps"]) for r in rows}
    if guidance == "none":
        assert got == {("euler", 1, 1), ("euler", 2, 2), ("euler", 4, 4), ("heun", 1, 1)}
    else:  # 2 NFE a velocity: euler 1 step = 2 NFE, heun 1 step = 2 NFE; 1 NFE and heun 4 NFE are impossible
        assert got == {("euler", 2, 1), ("euler", 4, 2), ("heun", 2, 1)}
        assert all(r["guidance"] == guidance and r["guidance_weight"] == 1.5 for r in rows)
    assert all(math.isfinite(r["fd_digits"]) for r in rows)


# --- 6. Heun: N steps = 2N - 1 NFE ---------------------------------------------------------------------------------

def test_heun_nine_nfe_is_five_steps():
    assert solvers.steps_for_nfe("heun", 9) == 5 and solvers.nfe_for_steps("heun", 5) == 9
    seen = []
    counter = NFECounter(lambda x, t: -x)
    solvers.sample(counter, torch.ones(3, 2), 9, "heun", callback=lambda i, t, x, v: seen.append(float(t)))
    assert counter.nfe == 9 and len(seen) == 5
    assert solvers.network_nfe("heun", 5, guided=True) == 18
    assert solvers.solver_nfe_for_budget("heun", 18, guided=True) == 9
    assert solvers.solver_nfe_for_budget("heun", 8) is None and solvers.solver_nfe_for_budget("euler", 3, True) is None
    # second order: on dx/dt = -x (backwards from t=1 to 0 gives x e^{1}) heun at 9 NFE beats euler at 9 NFE
    exact = math.e
    h = solvers.sample(lambda x, t: -x, torch.ones(1), 9, "heun")
    e = solvers.sample(lambda x, t: -x, torch.ones(1), 9, "euler")
    assert abs(h.item() - exact) < abs(e.item() - exact) / 2


# --- 7. tuned grid -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["data_end", "noise_end"])
def test_search_rho_picks_the_lowest_error_grid(where):
    """dx/dt = x / (2 (s + eps)) with s = t (curvature at t = 0) or s = 1 - t (at t = 1): exact solution known."""
    eps = 0.01
    if where == "data_end":
        v = lambda x, t: x / (2 * (t[:, None] + eps))  # noqa: E731  x(t) = x(1) sqrt((t + eps) / (1 + eps))
        exact = lambda x1: x1 * math.sqrt(eps / (1 + eps))  # noqa: E731
    else:
        v = lambda x, t: -x / (2 * (1 - t[:, None] + eps))  # noqa: E731  x(t) = x(1) sqrt((1 - t + eps) / eps)
        exact = lambda x1: x1 * math.sqrt((1 + eps) / eps)  # noqa: E731
    x1 = torch.randn(64, 2, dtype=torch.float64)
    rhos = (0.5, 0.75, 1.0, 2.0, 3.0, 5.0)
    best, errors = search_rho(v, x1, exact, nfe=4, solver="euler", rhos=rhos)
    manual = {r: float((solvers.sample(v, x1, 4, "euler", "rho", r) - exact(x1)).pow(2).sum(1).mean()) for r in rhos}
    assert errors == pytest.approx(manual) and best == min(manual, key=manual.get)
    assert (best > 1) if where == "data_end" else (best < 1)
    assert errors[best] < 0.6 * errors[1.0]


def test_user_time_grid_and_per_nfe_rhos_validate():
    # eval.grid is one tagged union: {kind: list, times} / {kind: rho, rho, per_nfe} / uniform
    listed = {"kind": "list", "times": [1.0, 0.6, 0.2, 0.0]}
    assert EvalConfig(nfes=[3], grid=listed).grid.times == [1.0, 0.6, 0.2, 0.0]
    with pytest.raises(ValueError, match="costs 3 NFE"):
        EvalConfig(nfes=[4], grid=listed)
    with pytest.raises(ValueError, match="strictly down"):
        EvalConfig(nfes=[2], grid={"kind": "list", "times": [1.0, 0.0, 0.5]})
    # a rho per NFE (was the list eval.rhos, one per NFE): a map NFE -> rho, the rest use grid.rho
    with pytest.raises(ValueError, match="per_nfe"):
        EvalConfig(nfes=[2, 4], grid={"kind": "rho", "per_nfe": {0: 2.0}})
    tuned = EvalConfig(nfes=[2, 4], grid={"kind": "rho", "rho": 7.0, "per_nfe": {2: 2.0}}).grid
    assert tuned.solver_args(2)["rho"] == 2.0 and tuned.solver_args(4)["rho"] == 7.0
    x = torch.randn(5, 2)
    g = solvers.time_grid(3, "list", times=[1.0, 0.6, 0.2, 0.0])
    assert torch.allclose(solvers.sample(lambda x, t: x, x, 3, "euler", "list", times=[1.0, 0.6, 0.2, 0.0]),
                          solvers.euler(lambda x, t: x, x, g))


# --- guidance ------------------------------------------------------------------------------------------------------

def _cond_mlp(seed):
    torch.manual_seed(seed)
    net = build_velocity_model(NetConfig(kind="mlp", hidden=32, depth=2, class_cond=True), (2,), num_classes=3).eval()
    with torch.no_grad():  # random weights everywhere (some layers start at zero): a visible class effect
        for p in net.parameters():
            p.normal_(0, 0.5)
    return net


def test_cfg_weight_one_is_conditional_zero_is_unconditional():
    net = _cond_mlp(0)
    x, t, y = torch.randn(16, 2), torch.rand(16), torch.randint(3, (16,))
    null = torch.full_like(y, net.null_label)
    with torch.no_grad():
        cond, unc = net(x, t, y), net(x, t, null)
        assert not torch.allclose(cond, unc)
        assert torch.allclose(net.solver_velocity(y, guidance="cfg", weight=1.0)(x, t), cond, atol=1e-6)
        assert torch.allclose(net.solver_velocity(y, guidance="cfg", weight=0.0)(x, t), unc, atol=1e-6)
        w = 2.5
        assert torch.allclose(net.solver_velocity(y, guidance="cfg", weight=w)(x, t), unc + w * (cond - unc),
                              atol=1e-5)
    noise = torch.randn(16, 2)
    for nfe, steps in ((2, 1), (4, 2), (8, 4)):
        xg, counted = generate(net, noise, nfe, "euler", label=y, guidance="cfg", weight=1.0,
                               return_nfe=True, device="cpu")
        assert counted == nfe  # 2 network evaluations per guided Euler step
        assert torch.allclose(xg, generate(net, noise, steps, "euler", label=y, device="cpu"), atol=1e-5)
    xu = generate(net, noise, 4, "euler", label=y, guidance="cfg", weight=0.0, device="cpu")
    assert torch.allclose(xu, generate(net, noise, 2, "euler", label=null, device="cpu"), atol=1e-5)
    with pytest.raises(ValueError, match="cannot be spent"):
        generate(net, noise, 3, "euler", label=y, guidance="cfg")
    with pytest.raises(ConfigError, match="class-conditional"):
        build_velocity_model(NetConfig(kind="mlp", hidden=8, depth=1), (2,)).solver_velocity(None, guidance="cfg",
                                                                                             weight=2.0)


def test_autoguidance_weight_one_is_the_model_zero_is_the_guide():
    net, guide = _cond_mlp(0), _cond_mlp(1)
    y, noise = torch.randint(3, (16,)), torch.randn(16, 2)
    a, counted = generate(net, noise, 18, "heun", label=y, guidance="autoguidance", weight=1.0,
                          guide=guide, return_nfe=True, device="cpu")
    assert counted == 18  # heun 5 steps = 9 velocities = 18 network evaluations (9 each)
    assert torch.allclose(a, generate(net, noise, 9, "heun", label=y, device="cpu"), atol=1e-5)
    b = generate(net, noise, 18, "heun", label=y, guidance="autoguidance", weight=0.0, guide=guide)
    assert torch.allclose(b, generate(guide, noise, 9, "heun", label=y, device="cpu"), atol=1e-5)
    v = net.solver_velocity(y)
    x, t = torch.randn(16, 2), torch.rand(16)
    with torch.no_grad():
        g = net.solver_velocity(y, guidance="autoguidance", weight=2.0, guide=guide)(x, t)
        assert torch.allclose(g, guide(x, t, y) + 2.0 * (v(x, t) - guide(x, t, y)), atol=1e-5)


# --- presets -------------------------------------------------------------------------------------------------------

def test_simple_and_baseline_presets_validate_and_differ_as_documented():
    names = set(preset_names())
    assert {"toy2d_simple", "digits_simple", "toy2d_baseline", "digits_baseline"} <= names
    for fam in ("toy2d", "digits"):
        base, simple = load_preset(f"{fam}_baseline"), load_preset(f"{fam}_simple")
        b, s = base.reflow.train, simple.reflow.train
        assert (b.loss_norm, b.time_dist, b.loss, b.hpf) == (False, "uniform", "mse", 0.0)
        assert s.loss_norm and s.time_dist == "exponential" and s.loss == "pseudo_huber"
        assert base.pairs.n_forward == 0 and base.reflow.forward_ratio == 0
        assert simple.pairs.n_forward > 0 and simple.reflow.forward_ratio > 0
        assert base.eval.solvers == ["euler"] and base.eval.grid.kind == "uniform"
        assert "heun" in simple.eval.solvers and simple.eval.grid.kind == "rho"
        assert base.reflow.dropout is None
    assert load_preset("digits_simple").reflow.train.hpf > 0
    assert load_preset("digits_simple").reflow.dropout < load_preset("digits_simple").net.dropout
