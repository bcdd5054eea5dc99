"""Fast CPU checks of the velocity nets' contracts (shapes, labels, dropout, config errors, gradients)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from reflow_core.config import NetConfig
from reflow_core.nets import MLP, UNet, build_net, count_params, set_dropout

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These nets are tiny: intra-op threads only add contention (10x slower on a busy 2-core CI box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


SMALL_UNET = dict(channels=16, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,))


def perturb_zero_params(net: nn.Module, scale: float = 0.1, seed: int = 0) -> nn.Module:
    """Zero-init layers make the fresh net output 0 and block gradients; give them small random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if p.abs().max() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return net


@pytest.mark.parametrize("dim", [2, 5])
def test_mlp_shapes_and_time_forms(dim):
    net = MLP(dim=dim, hidden=32, depth=2).eval()
    perturb_zero_params(net)
    x = torch.randn(7, dim)
    out = net(x, torch.rand(7))
    assert out.shape == x.shape
    # python float, 0-dim tensor and (B,) all mean the same thing
    a, b, c = net(x, 0.3), net(x, torch.tensor(0.3)), net(x, torch.full((7,), 0.3))
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)


def test_fresh_nets_output_zero():
    x = torch.randn(3, 2)
    assert torch.all(MLP(hidden=16, depth=1)(x, torch.rand(3)) == 0)
    img = torch.randn(2, 1, 8, 8)
    assert torch.all(UNet(1, 8, **SMALL_UNET)(img, torch.rand(2)) == 0)


@pytest.mark.parametrize(
    "shape,kw",
    [
        ((1, 8, 8), dict(channels=16, channel_mult=(1, 2), attn_resolutions=(4,))),
        ((1, 16, 16), dict(channels=16, channel_mult=(1, 2, 2), attn_resolutions=(8,))),
        ((3, 32, 32), dict(channels=16, channel_mult=(1, 2, 2), attn_resolutions=(8,))),
        ((1, 8, 8), dict(channels=24, channel_mult=(1, 2, 2), attn_resolutions=(8, 2), num_res_blocks=2)),
    ],
)
def test_unet_shapes(shape, kw):
    net = perturb_zero_params(UNet(shape[0], shape[1], dropout=0.0, **kw)).eval()
    x = torch.randn(2, *shape)
    out = net(x, torch.rand(2))
    assert out.shape == x.shape and torch.isfinite(out).all()
    torch.testing.assert_close(net(x, 0.5), net(x, torch.tensor([0.5, 0.5])))


@pytest.mark.parametrize("kind", ["mlp", "unet"])
def test_class_conditional_backbone_needs_labels(kind):
    """Backbones know nothing of CFG: num_classes + 1 label rows, but no null_label and no None -> null mapping
    (that is VelocityModel's job: tests/core/test_velocity.py)."""
    torch.manual_seed(0)
    if kind == "mlp":
        net, x = MLP(hidden=32, depth=2, num_classes=3), torch.randn(4, 2)
    else:
        net, x = UNet(1, 8, num_classes=3, **SMALL_UNET), torch.randn(4, 1, 8, 8)
    assert net.label_emb.num_embeddings == 4 and not hasattr(net, "null_label")
    net = perturb_zero_params(net).eval()
    t = torch.rand(4)
    out0 = net(x, t, torch.zeros(4, dtype=torch.long))
    out1 = net(x, t, torch.ones(4, dtype=torch.long))
    assert not torch.allclose(out0, out1)
    null = net(x, t, torch.full((4,), 3, dtype=torch.long))  # the last row is a valid (null) label
    assert not torch.allclose(null, out0)
    with pytest.raises(ValueError, match="class-conditional.*VelocityModel"):
        net(x, t)


def test_unconditional_ignores_label():
    net = perturb_zero_params(MLP(hidden=16, depth=1)).eval()
    x, t = torch.randn(3, 2), torch.rand(3)
    torch.testing.assert_close(net(x, t), net(x, t, torch.tensor([0, 1, 2])))


def test_set_dropout_and_eval_determinism():
    net = UNet(1, 8, dropout=0.1, **SMALL_UNET)
    mlp = MLP(hidden=16, depth=3)
    drops = [m for m in net.modules() if isinstance(m, nn.Dropout)]
    assert drops and all(m.p == 0.1 for m in drops)
    set_dropout(net, 0.3)
    assert all(m.p == 0.3 for m in drops)
    set_dropout(mlp, 0.2)
    mlp_drops = [m for m in mlp.modules() if isinstance(m, nn.Dropout)]
    assert len(mlp_drops) == 3 and all(m.p == 0.2 for m in mlp_drops)
    with pytest.raises(ValueError):
        set_dropout(net, 1.0)

    perturb_zero_params(net)
    x, t = torch.randn(2, 1, 8, 8), torch.rand(2)
    net.train()
    assert not torch.allclose(net(x, t), net(x, t)), "dropout should be active in train mode"
    net.eval()
    torch.testing.assert_close(net(x, t), net(x, t), rtol=0, atol=0)


def test_build_net_from_config():
    mlp = build_net(NetConfig(kind="mlp", hidden=32, depth=2), (2,))
    assert isinstance(mlp, MLP) and mlp.label_emb is None
    assert mlp(torch.randn(5, 2), torch.rand(5)).shape == (5, 2)

    cfg = NetConfig(kind="unet", channels=16, channel_mult=[1, 2], attn_resolutions=[8], dropout=0.2, class_cond=True)
    unet = build_net(cfg, (1, 8, 8), num_classes=10)
    assert isinstance(unet, UNet) and unet.label_emb.num_embeddings == 11
    assert all(m.p == 0.2 for m in unet.modules() if isinstance(m, nn.Dropout))
    assert unet(torch.randn(2, 1, 8, 8), torch.rand(2), torch.tensor([1, 10])).shape == (2, 1, 8, 8)
    # num_classes is ignored unless class_cond
    assert build_net(NetConfig(kind="mlp", hidden=16, depth=1), (2,), num_classes=10).label_emb is None
    assert count_params(unet) == sum(p.numel() for p in unet.parameters()) > 0

    default_digits = build_net(NetConfig(kind="unet"), (1, 8, 8))  # default mult (1,2,2): 8 -> 4 -> 2
    assert default_digits(torch.randn(1, 1, 8, 8), 0.5).shape == (1, 1, 8, 8)


def test_bad_configs_raise_clear_errors():
    with pytest.raises(ValueError, match="does not fit image_size=8"):
        UNet(1, 8, channel_mult=(1, 2, 2, 2))  # 8 -> 4 -> 2 -> 1
    with pytest.raises(ValueError, match="does not fit image_size=12"):
        UNet(1, 12, channel_mult=(1, 2, 2, 2))  # 12 -> 6 -> 3 -> (not halvable)
    with pytest.raises(ValueError, match="attn_resolutions"):
        UNet(1, 16, channel_mult=(1, 2), attn_resolutions=(4,))
    with pytest.raises(ValueError, match="num_classes"):
        build_net(NetConfig(kind="mlp", class_cond=True), (2,), num_classes=0)
    with pytest.raises(ValueError, match="mlp"):
        build_net(NetConfig(kind="mlp"), (1, 8, 8))
    with pytest.raises(ValueError, match="unet"):
        build_net(NetConfig(kind="unet"), (2,))


@pytest.mark.parametrize("kind", ["mlp", "unet"])
def test_gradient_reaches_every_parameter(kind):
    torch.manual_seed(0)
    if kind == "mlp":
        net, x = MLP(hidden=16, depth=2, num_classes=2, dropout=0.1), torch.randn(6, 2)
    else:
        net, x = UNet(3, 8, num_classes=2, **SMALL_UNET), torch.randn(6, 3, 8, 8)
    perturb_zero_params(net).train()
    labels = torch.tensor([0, 1, 2, 0, 1, 2])  # includes the null row so every embedding row is used
    loss = (net(x, torch.rand(6), labels) - torch.randn_like(x)).square().mean()
    loss.backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing, f"no gradient reached: {missing}"


def test_zero_init_still_trains_output_layer():
    # Without any perturbation the zero-init output layer is the first to receive gradient (no dead net).
    net = UNet(1, 8, **SMALL_UNET)
    x = torch.randn(2, 1, 8, 8)
    (net(x, torch.rand(2)) - x).square().mean().backward()
    assert torch.any(net.conv_out.weight.grad != 0)
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


def test_channels_last_and_bf16_autocast_cpu():
    net = perturb_zero_params(UNet(1, 16, channels=16, channel_mult=(1, 2), attn_resolutions=(8,), dropout=0.0)).eval()
    x, t = torch.randn(2, 1, 16, 16), torch.rand(2)
    ref = net(x, t)
    net_cl = net.to(memory_format=torch.channels_last)
    out_cl = net_cl(x.to(memory_format=torch.channels_last), t)
    torch.testing.assert_close(out_cl, ref, rtol=1e-4, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_bf = net(x, t)
    assert out_bf.shape == x.shape and torch.isfinite(out_bf).all()
    assert (out_bf.float() - ref).abs().max() < 0.1 * ref.abs().max() + 1e-2
