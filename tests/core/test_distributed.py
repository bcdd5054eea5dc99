"""DDP on CPU (gloo, 2 processes under torchrun): identical weights across ranks, rank-0 checkpoints, exact resume."""
import subprocess
import sys
import textwrap

import pytest
import torch

from reflow_core import checkpoint, distributed, stages, storage
from reflow_core.preset import load_preset
from reflow_core.stages import prepare_run

pytestmark = pytest.mark.slow  # each torchrun launch starts 3 Python processes (~10-20 s on a busy 2-core box)

SCRIPT = textwrap.dedent('''
    import sys, torch
    from reflow_core import distributed
    from reflow_core.config import NetConfig, TrainConfig
    from reflow_core.nets import build_net
    from reflow_core.train import Batch, train
    out = sys.argv[1]
    seen = []
    def batches(key):
        seen.append(key)
        g = torch.Generator().manual_seed(key)
        return Batch(torch.randn(16, 2, generator=g) + 2, torch.randn(16, 2, generator=g))
    torch.manual_seed(0)
    net = build_net(NetConfig(kind="mlp", hidden=16, depth=2), (2,))
    cfg = TrainConfig(steps=20, batch_size=16, warmup=2, ckpt_every=10, log_every=10)
    url = train(net=net, batches=batches, cfg=cfg, ckpt_dir=out + "/ck")
    info = distributed.env_info()
    torch.save({"net": net.state_dict(), "keys": seen, "url": url}, f"{out}/rank{info.rank}.pt")
    distributed.cleanup()
''')


def test_ddp_two_ranks_identical_weights_disjoint_batches(tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    for k in r0["net"]:
        assert torch.equal(r0["net"][k], r1["net"][k]), k
    assert set(r0["keys"]).isdisjoint(r1["keys"]) and len(r0["keys"]) == 20
    assert r0["url"] == r1["url"] and storage.exists(r0["url"])
    assert checkpoint.load(r0["url"])["step"] == 20


def _cfg(nproc=2):
    return load_preset("toy2d", {"data.n_train": 512, "net.hidden": 16, "net.depth": 2,
                                 "teacher.train": {"steps": 20, "batch_size": 32, "warmup": 2, "ckpt_every": 10,
                                                   "log_every": 10, "nproc": nproc}})


def train_teacher(cfg, rundir) -> str:
    """The teacher stage of cfg's plan (nproc > 1: it launches torchrun); its checkpoint URL."""
    st = stages.find(stages.plan(cfg, rundir), "teacher")
    return stages.module(st).run(st, stages.Context(cfg, rundir), {}).urls["model"]


def test_pipeline_teacher_via_torchrun_resumes_exactly(tmp_path, monkeypatch):
    root = str(tmp_path)
    full = train_teacher(_cfg(), prepare_run(_cfg(), root, "full"))
    assert checkpoint.load(full)["step"] == 20
    rundir = prepare_run(_cfg(), root, "cut")
    monkeypatch.setenv("REFLOW_FAULT_STAGE", "teacher")
    monkeypatch.setenv("REFLOW_FAULT_AT_STEP", "15")
    with pytest.raises(distributed.LaunchError, match="injected fault"):
        train_teacher(_cfg(), rundir)
    assert checkpoint.load(checkpoint.latest(rundir.url("teacher")))["step"] == 15
    monkeypatch.delenv("REFLOW_FAULT_STAGE")
    resumed = train_teacher(_cfg(), rundir)
    a, b = checkpoint.load(full), checkpoint.load(resumed)
    assert b["step"] == 20
    for k in a["net"]:
        assert torch.equal(a["net"][k], b["net"][k]), k
        assert torch.equal(a["ema"][k], b["ema"][k]), k
