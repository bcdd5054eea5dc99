"""The trainer: it learns a closed-form velocity, checkpoints atomically, resumes exactly, refuses bad losses."""
import math
import os

import pytest
import torch

from reflow_core import checkpoint, storage
from reflow_core.config import NetConfig, TrainConfig
from reflow_core.nets import build_net
from reflow_core.checkpoint import CheckpointError
from reflow_core.train import Batch, NonFiniteLossError, train

MU, S = torch.tensor([2.0, -1.0]), 0.5


def gaussian_batches(seed=0, n=256):
    def batches(step):
        g = torch.Generator().manual_seed(seed * 100_003 + step)
        return Batch(MU + S * torch.randn(n, 2, generator=g), torch.randn(n, 2, generator=g))
    return batches


def optimal_velocity(x, t):
    """E[x_noise - x_data | x_t = x] for x_data ~ N(mu, s^2 I), x_noise ~ N(0, I), independent coupling."""
    t = t[:, None]
    var = (1 - t) ** 2 * S ** 2 + t ** 2
    cov = t - (1 - t) * S ** 2
    return -MU + cov / var * (x - (1 - t) * MU)


def test_mlp_learns_gaussian_optimal_velocity(tmp_path):
    cfg = TrainConfig(steps=1500, batch_size=256, lr=2e-3, warmup=50, ckpt_every=1500, log_every=500, ema_decay=0.99)
    net = build_net(NetConfig(kind="mlp", hidden=128, depth=3), (2,))
    url = train(net=net, batches=gaussian_batches(), cfg=cfg, ckpt_dir=str(tmp_path / "ck"))
    state = checkpoint.load(url)
    net.load_state_dict(state["ema"])
    net.eval()
    g = torch.Generator().manual_seed(5)
    t = 0.1 + 0.8 * torch.rand(2000, generator=g)
    x = (1 - t[:, None]) * (MU + S * torch.randn(2000, 2, generator=g)) + t[:, None] * torch.randn(2000, 2, generator=g)
    with torch.no_grad():
        err = (net(x, t) - optimal_velocity(x, t)).norm(dim=1).mean()
    scale = optimal_velocity(x, t).norm(dim=1).mean()
    assert err / scale < 0.1, (err, scale)


def _cfg(**kw):
    base = dict(steps=40, batch_size=64, lr=1e-3, warmup=5, ckpt_every=10, log_every=10, ema_decay=0.9)
    return TrainConfig(**(base | kw))


class Recorder:
    def __init__(self):
        self.metrics = []

    def on_metrics(self, stage, step, m):
        self.metrics.append((stage, step, m))

    def on_artifact(self, stage, path):
        pass

    def on_progress(self, stage, done, total):
        pass


def test_resume_equals_uninterrupted(tmp_path, monkeypatch):
    """Kill at step 20 (after its checkpoint), rerun: the final weights equal an uninterrupted run's."""
    def fresh():
        torch.manual_seed(0)
        return build_net(NetConfig(kind="mlp", hidden=32, depth=2), (2,))

    ref = checkpoint.load(train(net=fresh(), batches=gaussian_batches(), cfg=_cfg(), ckpt_dir=str(tmp_path / "a")))
    monkeypatch.setenv("REFLOW_FAULT_STAGE", "train")
    monkeypatch.setenv("REFLOW_FAULT_AT_STEP", "20")
    with pytest.raises(RuntimeError, match="injected fault"):
        train(net=fresh(), batches=gaussian_batches(), cfg=_cfg(), ckpt_dir=str(tmp_path / "b"))
    monkeypatch.delenv("REFLOW_FAULT_AT_STEP")
    assert checkpoint.load(checkpoint.latest(str(tmp_path / "b")))["step"] == 20
    rec = Recorder()
    out = checkpoint.load(train(net=fresh(), batches=gaussian_batches(), cfg=_cfg(), ckpt_dir=str(tmp_path / "b"),
                                callback=rec))
    assert rec.metrics[0][2]["resumed_from_step"] == 20
    assert out["step"] == 40
    for k in ref["net"]:
        assert torch.equal(ref["net"][k], out["net"][k]), k
        assert torch.equal(ref["ema"][k], out["ema"][k]), k


def test_finished_training_is_skipped(tmp_path):
    d = str(tmp_path / "c")
    net = build_net(NetConfig(kind="mlp", hidden=16, depth=1), (2,))
    url = train(net=net, batches=gaussian_batches(), cfg=_cfg(steps=10), ckpt_dir=d)
    calls = []

    def counting(step):
        calls.append(step)
        return gaussian_batches()(step)

    assert train(net=net, batches=counting, cfg=_cfg(steps=10), ckpt_dir=d) == url
    assert calls == []


def test_old_checkpoints_pruned_and_latest_points_to_newest(tmp_path):
    d = tmp_path / "d"
    train(net=build_net(NetConfig(kind="mlp", hidden=16, depth=1), (2,)), batches=gaussian_batches(),
          cfg=_cfg(steps=40, ckpt_every=10), ckpt_dir=str(d))
    names = sorted(p.name for p in d.glob("ckpt-*.pt"))
    assert names == ["ckpt-0000030.pt", "ckpt-0000040.pt"]
    assert storage.read_json(str(d / "latest.json"))["file"] == "ckpt-0000040.pt"
    assert not list(d.glob("*.tmp-*"))


def test_truncated_checkpoint_is_refused_with_its_name(tmp_path):
    d = tmp_path / "e"
    url = train(net=build_net(NetConfig(kind="mlp", hidden=16, depth=1), (2,)), batches=gaussian_batches(),
                cfg=_cfg(steps=10), ckpt_dir=str(d))
    data = (d / "ckpt-0000010.pt").read_bytes()
    (d / "ckpt-0000010.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="ckpt-0000010.pt"):
        checkpoint.load(url)


def test_nonfinite_losses_skipped_then_stop(tmp_path):
    def bad(step):
        b = gaussian_batches()(step)
        if step % 2 == 0:
            b.x_data[0, 0] = math.nan
        return b

    net = build_net(NetConfig(kind="mlp", hidden=16, depth=1), (2,))
    rec = Recorder()
    train(net=net, batches=bad, cfg=_cfg(steps=20, max_bad_steps=15), ckpt_dir=str(tmp_path / "f"), callback=rec)
    counts = [m["nonfinite_steps"] for _, _, m in rec.metrics if "nonfinite_steps" in m]
    assert counts[-1] == 10  # every even step skipped and counted
    assert all(torch.isfinite(p).all() for p in net.parameters())
    with pytest.raises(NonFiniteLossError, match="max_bad_steps"):
        train(net=build_net(NetConfig(kind="mlp", hidden=16, depth=1), (2,)), batches=bad,
              cfg=_cfg(steps=40, max_bad_steps=3), ckpt_dir=str(tmp_path / "g"))


@pytest.mark.parametrize("clip", [1.0, 0.0])
def test_fast_step_equals_the_textbook_loop(tmp_path, clip):
    """foreach Adam, one _foreach_lerp_ EMA, clipping skipped when off: bit-identical to the per-tensor
    loop (single-tensor Adam, clip_grad_norm_ every step, ema_update) on CPU, weights and EMA alike."""
    import copy

    from reflow_core.train import ema_update, flow_matching_loss

    cfg = _cfg(steps=12, grad_clip=clip, ckpt_every=12, log_every=5, ema_decay=0.9, lr=5e-3, warmup=3, seed=3)
    net0 = build_net(NetConfig(kind="mlp", hidden=16, depth=2, dropout=0.1), (2,))
    ours = copy.deepcopy(net0)
    state = checkpoint.load(train(net=ours, batches=gaussian_batches(n=64), cfg=cfg, ckpt_dir=str(tmp_path / "a")))

    net, batches = copy.deepcopy(net0), gaussian_batches(n=64)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, foreach=False)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator()
    net.train()
    for step in range(cfg.steps):
        gen.manual_seed(cfg.seed * 1_000_003 + step)
        b = batches(step)
        for g in opt.param_groups:
            g["lr"] = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup))
        loss = flow_matching_loss(net, b, cfg, gen).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), clip if clip > 0 else math.inf, foreach=False)
        opt.step()
        ema_update(ema, net, min(cfg.ema_decay, (1 + step) / (10 + step)))
    for k, v in net.state_dict().items():
        assert torch.equal(state["net"][k], v), k
    for k, v in ema.state_dict().items():
        assert torch.equal(state["ema"][k], v), k


def test_worker_threads_follow_the_cores_given():
    from reflow_core import host

    before = torch.get_num_threads()
    env = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    try:
        assert host.threads_for(4, cores=2) == 1 and host.threads_for(2, cores=8) == 4
        assert host.threads_for(1) == host.available_cores() >= 1
        assert host.worker_threads(1) == 1 == torch.get_num_threads()
        assert host.worker_threads(workers=1) == host.available_cores() == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
        for k, v in env.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


MALLOC_PROBE = """
import sys

def heap_kb():  # size of the brk heap ([heap] in /proc/self/maps)
    for line in open("/proc/self/maps"):
        if line.rstrip().endswith("[heap]"):
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            return (hi - lo) // 1024
    return 0

applied = False
if sys.argv[1] == "on":  # (the "off" probe skips the import of torch: it only shows what glibc does by default)
    from reflow_core import host
    applied = host.steady_malloc()
before = heap_kb()
block = bytearray(8 << 20)  # 8 MB: above glibc's default mmap threshold (128 KB), below MMAP_THRESHOLD
grew = heap_kb() - before
del block
print(applied, grew >= 8 << 10, heap_kb() - before >= 8 << 10)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/maps") or not (os.confstr("CS_GNU_LIBC_VERSION") or "")
                    .startswith("glibc"), reason="glibc on Linux only")
def test_steady_malloc_serves_tensor_sized_blocks_from_the_heap_and_keeps_them(monkeypatch):
    """After host.steady_malloc an 8 MB block comes from the brk heap and stays there when freed (no mmap and
    munmap, no page faults on the next one); without it, a fresh process maps it; a user's MALLOC_* or LD_PRELOAD
    wins."""
    import subprocess
    import sys

    from reflow_core import host

    def probe(mode: str) -> list[str]:
        e = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "LD_PRELOAD"}
        e.update(PYTHONPATH=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
        return subprocess.run([sys.executable, "-c", MALLOC_PROBE, mode], env=e, capture_output=True, text=True,
                              check=True).stdout.split()

    assert probe("on") == ["True", "True", "True"]
    assert probe("off") == ["False", "False", "False"]
    # the user's own allocator settings win (checked before any mallopt call: this process is left as it was)
    for k, v in (("MALLOC_TRIM_THRESHOLD_", "131072"), ("LD_PRELOAD", "libjemalloc.so.2")):
        with monkeypatch.context() as m:
            m.setenv(k, v)
            assert host.steady_malloc() is False
