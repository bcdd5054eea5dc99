"""Speed knobs change speed, not answers: compile, bf16 sampling, CUDA-graph sampler (CPU path), channels_last."""
import copy
import warnings

import pytest
import torch
from captured import CapturedSampler

from reflow_core import accel, checkpoint, solvers
from reflow_core.config import NetConfig, TrainConfig
from reflow_core.nets import MLP, UNet, build_net
from reflow_core.train import Batch, train
from reflow_core.velocity import VelocityModel


def tiny_unet(seed=0, num_classes=0):
    torch.manual_seed(seed)
    net = UNet(3, 8, channels=8, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0,
               num_classes=num_classes)
    with torch.no_grad():  # the U-Net starts as v = 0 (zero-init output): randomise so comparisons mean something
        for p in net.parameters():
            p.normal_(0.0, 0.2)
    return net.eval()


def rel(a, b):
    return float((a - b).norm() / b.norm())


def _inputs(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g), torch.rand(n, generator=g)


@pytest.mark.slow  # cold inductor cache on a 2-core CPU: ~75 s of C++ compilation (seconds when the cache is warm)
def test_compiled_unet_matches_eager_or_warns_fallback():
    net = tiny_unet()
    x, t = _inputs()
    with torch.no_grad():
        ref = net(x, t)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        m = accel.prepare_model(copy.deepcopy(net), compile=True, mode="default", example=(x, t, None))
    fell_back = [w for w in rec if issubclass(w.category, accel.CompileFallbackWarning)]
    if isinstance(m, torch._dynamo.eval_frame.OptimizedModule):
        assert not fell_back
        with torch.no_grad():
            out = m(x, t)
        assert rel(out, ref) < 1e-4
    else:  # inductor unusable here: the fallback must have been taken *and announced*
        assert fell_back, "prepare_model returned an uncompiled module without a CompileFallbackWarning"
        with torch.no_grad():
            assert torch.equal(m(x, t), ref)


def test_compile_failure_falls_back_with_warning(monkeypatch):
    net = tiny_unet()
    x, t = _inputs()

    def broken_compile(module, **kw):
        def fail(*a, **k):
            raise RuntimeError("inductor: no C++ compiler (simulated)")
        return fail
    monkeypatch.setattr(torch, "compile", broken_compile)
    with pytest.warns(accel.CompileFallbackWarning, match="simulated"):
        m = accel.prepare_model(net, compile=True, example=(x, t, None))
    assert m is net
    with torch.no_grad():
        assert torch.equal(m(x, t), net(x, t))


def test_bf16_velocity_sampling_close_to_fp32():
    net = tiny_unet()
    noise, _ = _inputs(8, seed=3)
    grid = solvers.time_grid(6)
    fp32 = solvers.integrate(VelocityModel(net, amp=False).solver_velocity(), noise, grid, "heun")
    bf16 = solvers.integrate(VelocityModel(net, amp=True).solver_velocity(), noise, grid, "heun")
    assert bf16.dtype == torch.float32  # the state is accumulated in fp32
    err = rel(bf16, fp32)
    assert 0 < err < 3e-2, err  # bf16 operands: ~1e-3..1e-2 relative; 0 would mean autocast never engaged


def test_bf16_state_stays_fp32_inside_solver():
    net = tiny_unet()
    seen = []
    v = VelocityModel(net, amp=True).solver_velocity()
    solvers.euler(v, _inputs(2)[0], solvers.time_grid(3), callback=lambda i, t, x, d: seen.append((x.dtype, d.dtype)))
    assert seen and all(a == torch.float32 and b == torch.float32 for a, b in seen)


@pytest.mark.parametrize("solver,nfe", [("euler", 4), ("heun", 5)])
def test_captured_sampler_on_cpu_equals_integrate(solver, nfe):
    net = tiny_unet(num_classes=3)
    noise, _ = _inputs(4, seed=7)
    label = torch.tensor([0, 1, 2, 3])  # 3 = the null label
    lab = torch.zeros(4, dtype=torch.long)  # the caller's static label buffer, bound into the velocity
    s = CapturedSampler(VelocityModel(net, 3).solver_velocity(lab), noise.shape, nfe, solver, "rho", 2.0,
                              device="cpu")
    assert not s.use_graph
    ref = solvers.sample(lambda x, t: net(x, t, label).float(), noise, nfe, solver, "rho", 2.0)
    lab.copy_(label)
    assert torch.equal(s(noise), ref)
    with pytest.raises(ValueError, match="shape"):
        s(noise[:2])


def test_graphed_velocity_is_identity_on_cpu():
    net = tiny_unet()
    x, t = _inputs()
    gv = accel.GraphedVelocity(lambda x, t: net(x, t))
    with torch.no_grad():
        assert torch.equal(gv(x, t), net(x, t))


def test_channels_last_same_outputs():
    net = tiny_unet()
    x, t = _inputs()
    with torch.no_grad():
        ref = net(x, t)
        cl = accel.prepare_model(copy.deepcopy(net), channels_last=True)
        assert cl.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        out = cl(x.contiguous(memory_format=torch.channels_last), t)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-4)
    mlp = MLP(dim=2, hidden=16, depth=2)
    assert accel.prepare_model(mlp, channels_last=True) is mlp  # not an image net: untouched


def test_find_max_batch_on_cpu_returns_configured_value():
    calls = []
    assert accel.find_max_batch(lambda b: calls.append(b), 64, 4096, device="cpu") == 64
    assert calls == []


def _toy_batches(step):
    g = torch.Generator().manual_seed(step)
    return Batch(torch.randn(32, 2, generator=g) + 2, torch.randn(32, 2, generator=g))


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_train_with_compile_saves_plain_state_dict(tmp_path, monkeypatch, backend):
    monkeypatch.setenv("REFLOW_COMPILE_BACKEND", backend)  # inductor cold-compiles fwd+bwd for ~60 s on this CPU
    cfg = TrainConfig(steps=3, batch_size=32, warmup=1, ckpt_every=3, log_every=3, compile=True)
    net = build_net(NetConfig(kind="mlp", hidden=16, depth=2), (2,))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        url = train(net=net, batches=_toy_batches, cfg=cfg, ckpt_dir=str(tmp_path / "ck"))
    fell_back = [w for w in rec if issubclass(w.category, accel.CompileFallbackWarning)]
    if backend == "aot_eager":  # needs no C++ compiler: the compiled path itself must have run
        assert not fell_back, fell_back[0].message
    state = checkpoint.load(url)
    assert not any("_orig_mod" in k or k.startswith("module.") for k in state["net"])
    fresh = build_net(NetConfig(kind="mlp", hidden=16, depth=2), (2,))
    fresh.load_state_dict(state["net"])  # strict
    fresh.load_state_dict(state["ema"])


def test_train_with_compile_conditional_net_runs_compiled_and_matches_eager(tmp_path, monkeypatch):
    """An image-conditional net (super-resolution) compiles: the first-step probe passes the condition, so no
    fallback to eager, and three compiled steps give the eager run's weights."""
    monkeypatch.setenv("REFLOW_COMPILE_BACKEND", "aot_eager")
    ncfg = NetConfig(kind="unet", channels=8, channel_mult=[1, 2], num_res_blocks=1, attn_resolutions=[],
                     dropout=0.0, cond_channels=1)

    def batches(step):
        g = torch.Generator().manual_seed(step)
        return Batch(torch.randn(4, 1, 8, 8, generator=g), torch.randn(4, 1, 8, 8, generator=g),
                     cond=torch.randn(4, 1, 8, 8, generator=g))
    states = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        net = build_net(ncfg, (1, 8, 8))
        cfg = TrainConfig(steps=3, batch_size=4, warmup=1, ckpt_every=3, log_every=3, compile=compiled)
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            url = train(net=net, batches=batches, cfg=cfg, ckpt_dir=str(tmp_path / f"ck{compiled}"))
        assert not [w for w in rec if issubclass(w.category, accel.CompileFallbackWarning)], compiled
        states[compiled] = checkpoint.load(url)["net"]
    assert states[True].keys() == states[False].keys()
    for k, v in states[False].items():
        assert torch.allclose(states[True][k], v, atol=1e-5, rtol=1e-4), k


def test_train_channels_last_unet(tmp_path):
    cfg = TrainConfig(steps=2, batch_size=4, warmup=1, ckpt_every=2, log_every=2, channels_last=True, amp=True)
    net = UNet(3, 8, channels=8, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0)

    def batches(step):
        g = torch.Generator().manual_seed(step)
        return Batch(torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g))
    url = train(net=net, batches=batches, cfg=cfg, ckpt_dir=str(tmp_path / "ck"))
    state = checkpoint.load(url)
    fresh = UNet(3, 8, channels=8, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0)
    fresh.load_state_dict(state["net"])
    assert all(torch.isfinite(p).all() for p in fresh.parameters())


def test_largest_fitting_doubles_until_the_first_oom():
    calls, cleaned = [], []

    def fn(b):
        calls.append(b)
        if b > 300:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
    assert accel.largest_fitting(fn, 64, 4096, cleanup=lambda: cleaned.append(1)) == 256
    assert calls == [64, 128, 256, 512] and len(cleaned) == 4  # stops at the first OOM; cleans up after each probe
    assert accel.largest_fitting(fn, 512, 4096) is None  # even the start does not fit
    calls.clear()
    assert accel.largest_fitting(fn, 10, 100) == 80 and max(calls) <= 100  # never probes past the limit
    with pytest.raises(RuntimeError, match="not an OOM"):  # any other error is a bug, not a size limit
        accel.largest_fitting(lambda b: (_ for _ in ()).throw(RuntimeError("not an OOM")), 1, 8)
    with pytest.raises(ValueError, match="start"):
        accel.largest_fitting(fn, 0, 8)


def test_pair_auto_batch_off_cuda_keeps_the_configured_batch():
    from reflow_core.config import ConfigError, PairsConfig
    from reflow_core.preset import load_preset
    from reflow_core.stages.pairs import pair_batch_size
    model = VelocityModel(MLP(dim=2, hidden=16, depth=2))  # unconditional
    pc = PairsConfig(batch_size=100, auto_batch=True, max_batch_size=1000)
    assert pair_batch_size(model, pc, (2,), rows=500, device=torch.device("cpu")) == 100
    assert pair_batch_size(model, pc, (2,), rows=50, device=torch.device("cpu")) == 50
    with pytest.raises(ConfigError, match="max_batch_size"):
        load_preset("toy2d", {"pairs.auto_batch": True, "pairs.batch_size": 2000, "pairs.max_batch_size": 1000})
