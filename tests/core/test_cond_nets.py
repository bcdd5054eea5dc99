"""Image condition in the backbones: cond_channels=0 builds today's nets exactly; the condition's zero-initialised
input weights let an unconditional checkpoint warm-start a conditional net (same outputs for any condition)."""
import pytest
import torch

from reflow_core.config import NetConfig
from reflow_core.nets import build_net

UNET = dict(kind="unet", channels=8, channel_mult=[1, 2], attn_resolutions=[4], dropout=0.0)
CASES = [(dict(kind="mlp", hidden=32, depth=2), (2,)), (UNET, (1, 8, 8))]


@pytest.mark.parametrize("net_kw,shape", CASES)
def test_cond_channels_zero_is_todays_net(net_kw, shape):
    torch.manual_seed(0)
    a = build_net(NetConfig(**net_kw), shape)
    after_a = torch.rand(1)
    torch.manual_seed(0)
    b = build_net(NetConfig(**net_kw, cond_channels=2), shape)
    after_b = torch.rand(1)
    assert torch.equal(after_a, after_b), "the condition's weights must draw no RNG"
    sa, sb = a.state_dict(), b.state_dict()
    extra = set(sb) - set(sa)
    assert len(extra) == 1 and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.count_nonzero(sb[extra.pop()]) == 0


@pytest.mark.parametrize("net_kw,shape", CASES)
def test_unconditional_checkpoint_warm_starts(net_kw, shape):
    torch.manual_seed(1)
    plain = build_net(NetConfig(**net_kw), shape).eval()
    for p in plain.parameters():  # move off the zero-init output so the comparison is not trivially 0 == 0
        p.data.add_(0.1 * torch.randn_like(p))
    cond_net = build_net(NetConfig(**net_kw, cond_channels=3), shape).eval()
    missing, unexpected = cond_net.load_state_dict(plain.state_dict(), strict=False)
    assert len(missing) == 1 and not unexpected
    x, t = torch.randn(4, *shape), torch.rand(4)
    want = plain(x, t)
    assert want.abs().sum() > 0
    for _ in range(3):
        c = torch.randn(4, 3, *shape[1:])
        assert torch.equal(cond_net(x, t, cond=c), want)


@pytest.mark.parametrize("net_kw,shape", CASES)
def test_condition_enters_and_is_checked(net_kw, shape):
    net = build_net(NetConfig(**net_kw, cond_channels=1), shape).eval()
    for p in net.parameters():
        p.data.add_(0.1 * torch.randn_like(p))
    x, t = torch.randn(2, *shape), torch.rand(2)
    c = torch.randn(2, 1, *shape[1:])
    assert not torch.equal(net(x, t, cond=c), net(x, t, cond=torch.zeros_like(c)))
    with pytest.raises(ValueError, match="cond_channels=1"):
        net(x, t)
    with pytest.raises(ValueError, match="expected"):
        net(x, t, cond=torch.randn(2, 2, *shape[1:]))


def test_velocity_model_binds_cond_and_cfg_null_is_zeros():
    from reflow_core.velocity import VelocityModel, generate
    net = build_net(NetConfig(**UNET, cond_channels=1), (1, 8, 8)).eval()
    for p in net.parameters():
        p.data.add_(0.1 * torch.randn_like(p))
    m = VelocityModel(net)
    x, t, c = torch.randn(3, 1, 8, 8), torch.rand(3), torch.randn(3, 1, 8, 8)
    with pytest.raises(ValueError, match="conditioned on an image"):
        m(x, t)
    assert torch.equal(m(x, t, cond=c), net(x, t, cond=c))
    # CFG with weight 0 is exactly the null velocity: the model at cond = zeros
    v0 = m.solver_velocity(guidance="cfg", weight=0.0, cond=c)
    assert torch.equal(v0(x, t), net(x, t, cond=torch.zeros_like(c)))
    assert torch.equal(m.solver_velocity(cond=c)(x, t), net(x, t, cond=c))
    # generate slices the condition with the noise: batch size does not change the samples
    a = generate(m, x, nfe=2, cond=c, batch_size=3)
    b = generate(m, x, nfe=2, cond=c, batch_size=1)
    assert torch.allclose(a, b, atol=1e-6) and not torch.allclose(a, generate(m, x, nfe=2, cond=-c), atol=1e-3)
    plain = VelocityModel(build_net(NetConfig(**UNET), (1, 8, 8)))
    with pytest.raises(ValueError, match="no condition channels"):
        plain(x, t, cond=c)
