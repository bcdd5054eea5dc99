"""The speed knobs on a real GPU: CUDA graphs, bf16 and torch.compile give the eager fp32 answers (within bf16's
tolerance), the batch probe finds the memory limit, and a pair shard simulated with every knob on matches one
simulated without. Every test here needs CUDA and is reported as skipped without it (the CPU paths of the same code
are tested in test_accel.py). On the lent GPU machine: `bash benchmarks/gpu_device.sh` runs them."""
from __future__ import annotations

import pytest
import torch
from captured import CapturedSampler

from reflow_core import accel, solvers
from reflow_core.nets import UNet
from reflow_core.velocity import VelocityModel, velocity_for

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CPU paths: test_accel.py)")]

DEV = torch.device("cuda")


@pytest.fixture(autouse=True)
def _exact_fp32():
    """TF32 off, so 'fp32' means fp32 and the comparisons below measure the knob under test, not TF32."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def unet(num_classes: int = 0) -> UNet:
    torch.manual_seed(0)
    net = UNet(3, 16, channels=32, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0,
               num_classes=num_classes)
    with torch.no_grad():  # the output layer starts at zero (v = 0): randomise so comparisons mean something
        for p in net.parameters():
            p.normal_(0.0, 0.05)
    return net.to(DEV).eval()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def noise(n: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed)).to(DEV)


def eager_fp32(net, x, nfe, solver="heun", label=None):
    model = VelocityModel(net, net.num_classes, amp=False)
    return solvers.sample(model.solver_velocity(label), x, nfe, solver, "rho", 7.0)


@pytest.mark.parametrize("per_step", [False, True])
def test_cuda_graph_sampler_equals_eager_fp32(per_step):
    net, x = unet(), noise()
    s = CapturedSampler(VelocityModel(net).solver_velocity(), x.shape, 9, "heun", "rho", 7.0, device=DEV,
                              per_step=per_step)
    assert s.use_graph
    out = s(x)
    assert s.captured
    assert rel(out, eager_fp32(net, x, 9)) < 1e-5
    # a replay with other noise gives that noise's answer (the static buffers are refreshed, not reused)
    y = noise(seed=2)
    assert rel(s(y), eager_fp32(net, y, 9)) < 1e-5


def test_bf16_graph_sampler_close_to_fp32_with_labels():
    net, x = unet(num_classes=10), noise()
    lab = torch.arange(16, device=DEV) % 11  # 10 = the null label
    buf = torch.zeros(16, dtype=torch.long, device=DEV)  # static label buffer, read by the captured graph
    s = CapturedSampler(VelocityModel(net, 10, amp=True).solver_velocity(buf), x.shape, 9, "heun", "rho", 7.0,
                              device=DEV)
    buf.copy_(lab)
    out = s(x)
    assert out.dtype == torch.float32
    err = rel(out, eager_fp32(net, x, 9, label=lab))
    assert 0 < err < 3e-2, err  # 0 would mean autocast never engaged


def test_compiled_bf16_graph_sampler_close_to_fp32():
    net, x = unet(), noise()
    fast = accel.prepare_model(net, channels_last=True, compile=True,
                               example=(x.contiguous(memory_format=torch.channels_last), torch.ones(16, device=DEV),
                                        None))
    assert isinstance(fast, torch._dynamo.eval_frame.OptimizedModule), "inductor fell back to eager on this GPU"
    s = CapturedSampler(VelocityModel(fast, amp=True).solver_velocity(), x.shape, 9, "heun", "rho", 7.0,
                              device=DEV)
    err = rel(s(x.contiguous(memory_format=torch.channels_last)), eager_fp32(net, x, 9))
    assert 0 < err < 3e-2, err


def test_graphed_velocity_equals_its_function():
    net, x = unet(), noise()
    t = torch.rand(16, device=DEV)
    gv = accel.GraphedVelocity(lambda x, t: net(x, t))
    with torch.no_grad():
        ref = net(x, t)
        assert torch.allclose(gv(x, t), ref, rtol=1e-5, atol=1e-6)
        assert torch.allclose(gv(x * 2, t), net(x * 2, t), rtol=1e-5, atol=1e-6)  # same graph, new inputs
    assert len(gv._graphs) == 1


def test_graphed_velocity_for_changing_labels():
    """velocity_for(cuda_graph=True): one graph per batch shape, each batch's labels copied into its static
    buffer, so a replay with other labels gives those labels' velocity (the pair simulation's use)."""
    net, x = unet(num_classes=10), noise()
    model = VelocityModel(net, 10)
    vf = velocity_for(model, cuda_graph=True)
    t = torch.rand(16, device=DEV)
    with torch.no_grad():
        for seed in (0, 1):
            lab = torch.randint(11, (16,), generator=torch.Generator().manual_seed(seed)).to(DEV)
            assert torch.allclose(vf(lab)(x, t), model(x, t, lab), rtol=1e-5, atol=1e-6)
        assert torch.allclose(vf(lab[:8])(x[:8], t[:8]), model(x[:8], t[:8], lab[:8]), rtol=1e-5, atol=1e-6)


def test_find_max_batch_stops_at_oom_and_memory_is_usable_after():
    total = torch.cuda.get_device_properties(DEV).total_memory
    mib = 2 ** 20

    def alloc(b):  # b MiB
        torch.empty(b * mib, dtype=torch.uint8, device=DEV).fill_(1)
    best = accel.find_max_batch(alloc, 256, 2 ** 22, DEV)  # limit 4 TiB: the loop must end on an OOM
    assert 256 <= best and best * mib <= total < 4 * best * mib  # doubling once more than best did not fit
    torch.empty(best * mib // 2, dtype=torch.uint8, device=DEV)  # the OOM left the allocator usable


def test_pair_shard_with_every_knob_matches_plain(tmp_path):
    """stages.pairs.simulate (one pair shard) with amp + compile + cuda_graph + auto_batch on the GPU against the plain fp32
    eager simulation: the same noise rows, samples within bf16 tolerance; auto_batch grew the batch."""
    from reflow_core import stages
    from reflow_core.callbacks import NullCallback
    from reflow_core.preset import load_preset
    from reflow_core.pairs import PairStore

    tiny = {"data.n_train": 1000, "net.hidden": 64, "net.depth": 2,
            "teacher.train.steps": 200, "teacher.train.batch_size": 256, "teacher.train.ckpt_every": 200,
            "teacher.train.log_every": 100,
            "pairs.n_pairs": 4096, "pairs.shard_size": 4096, "pairs.chunk_size": 512, "pairs.batch_size": 256,
            "pairs.nfe": 9}
    cfg = load_preset("toy2d", tiny)
    rundir = stages.prepare_run(cfg, str(tmp_path), "teacher")
    tst = stages.find(stages.plan(cfg, rundir), "teacher")
    teacher = stages.module(tst).run(tst, stages.Context(cfg, rundir, device=DEV), {}).urls["model"]
    stores, batches = [], []
    for name, knobs in (("plain", {}),
                        ("fast", {"pairs.amp": True, "pairs.compile": True, "pairs.cuda_graph": True,
                                  "pairs.auto_batch": True, "pairs.max_batch_size": 4096})):
        c = load_preset("toy2d", tiny | knobs | {"teacher.checkpoint": teacher})
        p = stages.prepare_run(c, str(tmp_path), name)
        pst = stages.find(stages.plan(c, p), "pairs")
        inputs = {"model": stages.StageOutput({"model": teacher})}
        stages.pairs.pending(pst, stages.Context(c, p), inputs)  # creates the store
        seen: dict = {}

        class Rec(NullCallback):
            def on_metrics(self, stage, step, m):
                seen.update(m)
        stages.pairs.simulate(pst, stages.Context(c, p, Rec(), DEV), inputs, 0)
        stores.append(PairStore.open(p.url("pairs.zarr")))
        batches.append(seen.get("batch_size"))
    plain, fast = (s.read(torch.arange(4096)) for s in stores)
    assert torch.equal(plain.noise, fast.noise)
    err = rel(fast.sample, plain.sample)
    assert 0 < err < 3e-2, err
    assert batches[0] is None and batches[1] == 4096  # a 2-D MLP at batch 4096 fits anywhere
