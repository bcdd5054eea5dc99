"""VelocityModel: the null label, guidance, bf16 autocast, label dropout, generation's NFE accounting, state dicts."""
from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from reflow_core import solvers
from reflow_core.config import NetConfig, TrainConfig
from reflow_core.nets import MLP, UNet, build_net
from reflow_core.velocity import (VelocityModel, build_velocity_model, generate, velocity_for,
                                  velocity_model_from_state)


SMALL_UNET = dict(channels=16, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,))


def randomise(net: nn.Module, seed: int = 0, scale: float = 0.5) -> nn.Module:
    """Random weights everywhere (zero-init layers would make every velocity 0 and every comparison trivial)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return net.eval()


def cond_mlp(seed: int = 0, num_classes: int = 3) -> VelocityModel:
    return VelocityModel(randomise(MLP(hidden=32, depth=2, num_classes=num_classes), seed), num_classes)


# --- labels ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["mlp", "unet"])
def test_label_none_is_exactly_the_null_label(kind):
    if kind == "mlp":
        backbone, x = MLP(hidden=32, depth=2, num_classes=3), torch.randn(4, 2)
    else:
        backbone, x = UNet(1, 8, num_classes=3, **SMALL_UNET), torch.randn(4, 1, 8, 8)
    model = VelocityModel(randomise(backbone, scale=0.1), 3)
    assert model.num_classes == 3 and model.null_label == 3 and model.class_cond and model.backbone is backbone
    t = torch.rand(4)
    with torch.no_grad():
        null = backbone(x, t, torch.full((4,), 3, dtype=torch.long))
        assert torch.equal(model(x, t), null)  # label=None is exactly the null row for everyone
        assert torch.equal(model(x, t, torch.full((4,), model.null_label)), null)
        out0 = model(x, t, torch.zeros(4, dtype=torch.long))
        assert not torch.allclose(model(x, t), out0)
        assert model(x, t).dtype == torch.float32


def test_unconditional_model_ignores_labels():
    backbone = randomise(MLP(hidden=16, depth=1))
    model = VelocityModel(backbone)
    assert model.num_classes == 0 and model.null_label is None and not model.class_cond
    x, t = torch.randn(3, 2), torch.rand(3)
    with torch.no_grad():
        assert torch.equal(model(x, t), model(x, t, torch.tensor([0, 1, 2])))
        assert torch.equal(model(x, t), backbone(x, t))


def test_backbone_class_count_must_match():
    with pytest.raises(ValueError, match="num_classes=3"):
        VelocityModel(MLP(hidden=16, depth=1, num_classes=3), 5)
    with pytest.raises(ValueError, match="num_classes"):
        VelocityModel(MLP(hidden=16, depth=1), 2)


def test_drop_labels():
    model = cond_mlp()
    y = torch.randint(3, (256,), generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    before = g.get_state()
    assert model.drop_labels(y, 0.0, g) is y  # p = 0: the labels themselves, no random draw
    assert torch.equal(g.get_state(), before)
    assert torch.equal(model.drop_labels(y, 1.0, g), torch.full_like(y, 3))  # p = 1: all null
    assert model.drop_labels(None, 0.5, g) is None
    a = model.drop_labels(y, 0.3, torch.Generator().manual_seed(7))
    b = model.drop_labels(y, 0.3, torch.Generator().manual_seed(7))
    c = model.drop_labels(y, 0.3, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)  # a function of the generator's seed
    dropped = a == 3
    assert 0.15 < dropped.float().mean() < 0.45
    assert torch.equal(a[~dropped], y[~dropped])  # the rest untouched
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        model.drop_labels(y, 1.5, g)
    with pytest.raises(ValueError, match="class-conditional"):
        VelocityModel(MLP(hidden=16, depth=1)).drop_labels(y, 0.1, g)


# --- guidance -------------------------------------------------------------------------------------------------------

def test_cfg_weight_one_is_conditional_zero_is_null_exactly():
    model = cond_mlp(0)
    x, t, y = torch.randn(16, 2), torch.rand(16), torch.randint(3, (16,))
    with torch.no_grad():
        cond, null = model(x, t, y), model(x, t)
        assert not torch.allclose(cond, null)
        assert torch.equal(model.solver_velocity(y, guidance="cfg", weight=1.0)(x, t), cond)
        assert torch.equal(model.solver_velocity(y, guidance="cfg", weight=0.0)(x, t), null)
        w = 2.5
        assert torch.allclose(model.solver_velocity(y, guidance="cfg", weight=w)(x, t), null + w * (cond - null),
                              atol=1e-5)
        assert torch.equal(model.solver_velocity(y)(x, t), cond)
    with pytest.raises(ValueError, match="eval.guidance"):
        VelocityModel(MLP(hidden=8, depth=1)).solver_velocity(None, guidance="cfg", weight=2.0)
    with pytest.raises(ValueError, match="eval.guidance"):
        model.solver_velocity(None, guidance="cfg", weight=2.0)  # nothing to guide towards
    with pytest.raises(ValueError, match="guidance"):
        model.solver_velocity(y, guidance="cgf")


def test_autoguidance_weight_one_is_the_model_zero_is_the_guide_exactly():
    model, guide = cond_mlp(0), cond_mlp(1)
    x, t, y = torch.randn(16, 2), torch.rand(16), torch.randint(3, (16,))
    with torch.no_grad():
        cond, weak = model(x, t, y), guide(x, t, y)
        assert torch.equal(model.solver_velocity(y, guidance="autoguidance", weight=1.0, guide=guide)(x, t), cond)
        assert torch.equal(model.solver_velocity(y, guidance="autoguidance", weight=0.0, guide=guide)(x, t), weak)
        g = model.solver_velocity(y, guidance="autoguidance", weight=2.0, guide=guide)(x, t)
        assert torch.allclose(g, weak + 2.0 * (cond - weak), atol=1e-5)
    with pytest.raises(ValueError, match="guide"):
        model.solver_velocity(y, guidance="autoguidance", weight=2.0)


def test_solver_velocity_reads_its_label_tensor_at_call_time():
    """A static label buffer refilled in place (CUDA graphs) changes what the bound velocity computes."""
    model = cond_mlp()
    x, t = torch.randn(4, 2), torch.rand(4)
    buf = torch.zeros(4, dtype=torch.long)
    v = model.solver_velocity(buf)
    with torch.no_grad():
        assert torch.equal(v(x, t), model(x, t, torch.zeros(4, dtype=torch.long)))
        buf.copy_(torch.tensor([2, 1, 0, 3]))
        assert torch.equal(v(x, t), model(x, t, torch.tensor([2, 1, 0, 3])))


def test_evaluations_per_call():
    assert VelocityModel.evaluations_per_call("none") == 1
    assert VelocityModel.evaluations_per_call("cfg") == VelocityModel.evaluations_per_call("autoguidance") == 2
    with pytest.raises(ValueError):
        VelocityModel.evaluations_per_call("bogus")


# --- generate -------------------------------------------------------------------------------------------------------

def _count_forwards(model: VelocityModel) -> list:
    calls = []
    model.backbone.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    return calls


def test_guided_generate_costs_two_network_evaluations_per_velocity():
    model = cond_mlp(0)
    y, noise = torch.randint(3, (16,), generator=torch.Generator().manual_seed(2)), torch.randn(16, 2)
    for nfe, steps in ((2, 1), (4, 2), (8, 4)):
        calls = _count_forwards(model)
        xg, counted = generate(model, noise, nfe, "euler", label=y, guidance="cfg", weight=1.0, return_nfe=True,
                               device="cpu")
        assert counted == nfe == len(calls)  # 2 network evaluations per guided Euler step, as the backbone saw
        model.backbone._forward_hooks.clear()
        assert torch.equal(xg, generate(model, noise, steps, "euler", label=y, device="cpu"))  # w = 1: unguided
    xu = generate(model, noise, 4, "euler", label=y, guidance="cfg", weight=0.0, device="cpu")
    assert torch.equal(xu, generate(model, noise, 2, "euler", label=torch.full_like(y, 3), device="cpu"))
    with pytest.raises(ValueError, match="cannot be spent"):
        generate(model, noise, 3, "euler", label=y, guidance="cfg")


def test_heun_nfe_accounting_plain_and_autoguided():
    model, guide = cond_mlp(0), cond_mlp(1)
    y, noise = torch.randint(3, (16,)), torch.randn(16, 2)
    x, counted = generate(model, noise, 9, "heun", label=y, return_nfe=True)
    assert counted == 9  # 5 steps, the last one Euler: 2 * 5 - 1
    calls_m, calls_g = _count_forwards(model), _count_forwards(guide)
    a, counted = generate(model, noise, 18, "heun", label=y, guidance="autoguidance", weight=1.0, guide=guide,
                          return_nfe=True, batch_size=16)
    assert counted == 18 and len(calls_m) == len(calls_g) == 9  # 9 velocities, each calling both networks
    model.backbone._forward_hooks.clear()
    guide.backbone._forward_hooks.clear()
    assert torch.equal(a, x)
    b = generate(model, noise, 18, "heun", label=y, guidance="autoguidance", weight=0.0, guide=guide)
    assert torch.equal(b, generate(guide, noise, 9, "heun", label=y))
    with pytest.raises(ValueError, match="cannot be spent"):
        generate(model, noise, 8, "heun", label=y)  # heun needs an odd number of velocities


def test_generate_batches_count_the_first_batch_only_and_match_one_batch():
    model = cond_mlp(0)
    y, noise = torch.randint(3, (10,)), torch.randn(10, 2)
    one, n1 = generate(model, noise, 5, "heun", label=y, return_nfe=True)
    many, n2 = generate(model, noise, 5, "heun", label=y, batch_size=3, return_nfe=True)
    assert n1 == n2 == 5
    assert many.shape == noise.shape and torch.allclose(one, many, atol=1e-6)
    with pytest.raises(TypeError, match="VelocityModel"):
        generate(model.backbone, noise, 1, "euler", label=y)


# --- bf16 -----------------------------------------------------------------------------------------------------------

def test_amp_output_is_float32_and_close_to_fp32():
    backbone = randomise(UNet(1, 8, dropout=0.0, **SMALL_UNET), scale=0.2)
    x, t = torch.randn(4, 1, 8, 8), torch.rand(4)
    with torch.no_grad():
        ref = VelocityModel(backbone)(x, t)
        out = VelocityModel(backbone, amp=True)(x, t)
    assert out.dtype == torch.float32
    err = float((out - ref).norm() / ref.norm())
    assert 0 < err < 3e-2, err  # 0 would mean autocast never engaged
    seen = []
    solvers.euler(VelocityModel(backbone, amp=True).solver_velocity(), x, solvers.time_grid(3),
                  callback=lambda i, tt, xx, d: seen.append((xx.dtype, d.dtype)))
    assert seen and all(a == torch.float32 and b == torch.float32 for a, b in seen)  # the state stays fp32


def test_amp_off_leaves_an_outer_autocast_on():
    """Training wraps the loss in its own autocast (TrainConfig.amp): amp=False must not switch it off."""
    backbone = randomise(MLP(hidden=32, depth=2))
    x, t = torch.randn(8, 2), torch.rand(8)
    with torch.no_grad():
        ref = VelocityModel(backbone)(x, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = VelocityModel(backbone)(x, t)
    assert out.dtype == torch.float32 and not torch.equal(out, ref)


# --- state dicts and construction -----------------------------------------------------------------------------------

def test_state_dict_round_trips_through_torch_save_weights_only():
    model = cond_mlp(0)
    sd = model.state_dict()
    assert sd and all(k.startswith("backbone.") for k in sd)
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    fresh = VelocityModel(MLP(hidden=32, depth=2, num_classes=3), 3)
    fresh.load_state_dict(loaded)  # strict
    x, t, y = torch.randn(5, 2), torch.rand(5), torch.randint(4, (5,))
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x, t, y), model(x, t, y))
    # a bare backbone state dict (checkpoints from before VelocityModel) loads too; a wrong one still fails
    legacy = VelocityModel(MLP(hidden=32, depth=2, num_classes=3), 3)
    legacy.load_state_dict(model.backbone.state_dict())
    with torch.no_grad():
        assert torch.equal(legacy.eval()(x, t, y), model(x, t, y))
    with pytest.raises(RuntimeError):
        VelocityModel(MLP(hidden=16, depth=2, num_classes=3), 3).load_state_dict(sd)


def test_build_velocity_model_and_from_checkpoint_state():
    cfg = NetConfig(kind="mlp", hidden=16, depth=1, class_cond=True)
    model = build_velocity_model(cfg, (2,), num_classes=10)
    assert model.num_classes == 10 and model.backbone.label_emb.num_embeddings == 11 and not model.amp
    unc = build_velocity_model(NetConfig(kind="mlp", hidden=16, depth=1), (2,), num_classes=10, amp=True)
    assert unc.num_classes == 0 and not unc.class_cond and unc.amp  # num_classes counts only when class_cond
    assert isinstance(build_net(cfg, (2,), 10), MLP)  # build_net still builds the bare backbone
    randomise(model)
    state = {"ema": model.state_dict(), "net": model.state_dict(),
             "meta": {"net": cfg.model_dump(), "shape": [2], "num_classes": 10}}
    again = velocity_model_from_state(state)
    assert not again.training and again.num_classes == 10
    x, t = torch.randn(3, 2), torch.rand(3)
    with torch.no_grad():
        assert torch.equal(again(x, t), model(x, t))


def test_with_backbone_shares_parameters_and_modes():
    model = cond_mlp(0)
    model.backbone.train()
    model.eval()
    view = model.with_backbone(model.backbone)
    assert view.num_classes == 3 and view.null_label == 3 and not view.training
    assert list(view.parameters())[0] is list(model.parameters())[0]
    model.train()
    model.with_backbone(model.backbone)
    assert model.backbone.training  # making a view never changes the shared backbone's mode


def test_velocity_for_off_cuda_is_solver_velocity():
    model = cond_mlp(0)
    x, t, y = torch.randn(6, 2), torch.rand(6), torch.randint(3, (6,))
    with torch.no_grad():
        for graph in (False, True):  # cuda_graph=True off CUDA runs eager
            vf = velocity_for(model, cuda_graph=graph, guidance="cfg", weight=2.0)
            assert torch.equal(vf(y)(x, t), model.solver_velocity(y, guidance="cfg", weight=2.0)(x, t))


def test_flow_matching_loss_takes_a_velocity_model():
    from reflow_core.train import Batch, flow_matching_loss
    model = cond_mlp(0).train()
    g = torch.Generator().manual_seed(0)
    y = model.drop_labels(torch.randint(3, (8,)), 0.5, g)
    for label in (y, None):
        loss = flow_matching_loss(model, Batch(torch.randn(8, 2), torch.randn(8, 2), label), TrainConfig(), g)
        assert loss.shape == (8,) and torch.isfinite(loss).all()
    loss.mean().backward()
    assert model.backbone.label_emb.weight.grad is not None
