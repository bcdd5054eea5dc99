"""The host-wide share of the cores (reflow_core/cores.py): the registry counts the project's live processes across
real subprocesses and prunes a killed one, a lone process keeps its threads, a second one halves them at the next
re-check and its end restores them, and REFLOW_THREADS / OMP_NUM_THREADS / the work crossover win. No timings."""
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reflow_core import cores
from reflow_core.callbacks import NullCallback

ROOT = Path(__file__).resolve().parents[2]
# a member of the registry that imports no torch: joins, says so, waits for its stdin to close
MEMBER = ("import sys; from reflow_core.cores import registry; registry().register(); "
          "print('joined', flush=True); sys.stdin.read()")


def _member(path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), cores.DIR_ENV: str(path)}
    p = subprocess.Popen([sys.executable, "-c", MEMBER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         env=env, text=True)
    assert p.stdout.readline().strip() == "joined"
    return p


def _end(p: subprocess.Popen) -> None:
    p.stdin.close()
    p.wait(timeout=30)


@pytest.fixture
def threads():
    """Restore this process's intra-op threads after the test."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture
def auto(monkeypatch):
    """The environment of a user who fixed nothing: no REFLOW_THREADS, OMP_NUM_THREADS or crossover."""
    for k in (cores.THREADS_ENV, cores.MIN_WORK_ENV, "OMP_NUM_THREADS"):
        monkeypatch.delenv(k, raising=False)


def test_registry_counts_live_processes_and_prunes_a_killed_one(tmp_path):
    reg = cores.Registry(tmp_path)
    assert reg.live() == 0
    a, b = _member(tmp_path), _member(tmp_path)
    try:
        assert reg.live() == 2
        reg.register()
        reg.register()  # once per process
        assert reg.live() == 3 and len(os.listdir(tmp_path)) == 3
        os.kill(b.pid, signal.SIGKILL)
        b.wait(timeout=30)
        assert reg.live() == 2 and len(os.listdir(tmp_path)) == 2  # the dead one's file is gone
        _end(a)  # a clean exit removes its own file
        assert len(os.listdir(tmp_path)) == 1 and reg.live() == 1
        reg.unregister()
        assert reg.live() == 0 and os.listdir(tmp_path) == []
    finally:
        for p in (a, b):
            p.kill()
            p.wait()


def test_the_rule():
    env = {}
    assert cores.choose(4, cores=4, live=1, env=env) == cores.Choice(4, "alone on 4 cores", 1)  # a lone run
    assert cores.choose(4, cores=4, live=2, env=env).threads == 2
    assert cores.choose(2, cores=2, live=2, env=env).threads == 1
    assert cores.choose(8, cores=8, live=3, env=env).threads == 2
    assert cores.choose(2, cores=2, live=5, env=env).threads == 1  # never below one
    assert cores.choose(1, cores=8, live=2, env=env).threads == 1  # never above its own count
    # overrides win over the share
    c = cores.choose(2, cores=2, live=4, env={"REFLOW_THREADS": "3"})
    assert (c.threads, c.reason) == (3, "REFLOW_THREADS=3")
    c = cores.choose(2, cores=2, live=4, env={"OMP_NUM_THREADS": "2"})
    assert c.threads == 2 and "OMP_NUM_THREADS=2" in c.reason
    with pytest.raises(ValueError, match="REFLOW_THREADS"):
        cores.choose(2, cores=2, live=1, env={"REFLOW_THREADS": "zero"})
    # the work crossover: off by default, single-threaded below it when set
    assert cores.choose(4, cores=4, live=1, work=10.0, env={}).threads == 4
    c = cores.choose(4, cores=4, live=1, work=10.0, env={"REFLOW_THREADS_MIN_WORK": "1e6"})
    assert c.threads == 1 and "crossover" in c.reason
    assert cores.choose(4, cores=4, live=1, work=1e7, env={"REFLOW_THREADS_MIN_WORK": "1e6"}).threads == 4
    assert cores.step_work(100, (64, 1, 8, 8)) == 100 * 64 * 64 and cores.step_work(10, (512, 2)) == 10 * 512


class _Rec(NullCallback):
    def __init__(self):
        self.metrics = []

    def on_metrics(self, stage, step, m):
        self.metrics.append((stage, step, m))


def test_recheck_follows_a_second_process_and_reports_it(tmp_path, threads, auto, caplog):
    torch.set_num_threads(4)
    rec = _Rec()
    reg = cores.Registry(tmp_path)
    share = cores.Share("teacher", rec, reg=reg, cores=4, every=0.0)
    with caplog.at_level(logging.INFO, logger="reflow_core.cores"):
        assert share.tick(0) == 4 == torch.get_num_threads()  # alone: keeps its threads
        assert share.tick(1) == 4 and len(rec.metrics) == 1  # reported once, when it changes
        other = _member(tmp_path)
        try:
            assert share.tick(2) == 2 == torch.get_num_threads()
            assert share.choice.reason == "2 reflow processes share 4 cores"
        finally:
            _end(other)
        assert share.tick(3) == 4 == torch.get_num_threads()  # the survivor goes back up
        other = _member(tmp_path)
        try:
            with cores.Share("reflow", reg=reg, cores=4, every=0.0) as nxt:
                assert nxt.tick(0) == 2
            assert torch.get_num_threads() == 4  # a finished loop gives the thread back its count
        finally:
            _end(other)
    assert [(s, m["threads"], m["threads_live"]) for s, _, m in rec.metrics] == \
        [("teacher", 4, 1), ("teacher", 2, 2), ("teacher", 4, 1)]
    assert "teacher: 2 intra-op threads at step 2 (2 reflow processes share 4 cores)" in caplog.text


def test_a_count_set_by_the_caller_is_the_new_base(tmp_path, threads, auto):
    share = cores.Share("reflow", reg=cores.Registry(tmp_path), cores=4, every=0.0)
    torch.set_num_threads(3)
    assert share.tick(0) == 3
    other = _member(tmp_path)
    try:
        assert share.tick(1) == 2
        torch.set_num_threads(1)  # e.g. a test or a benchmark choosing its own count
        assert share.tick(2) == 1
    finally:
        _end(other)
    assert share.tick(3) == 1  # not raised back above what the caller chose
    share.close()
    assert torch.get_num_threads() == 1  # (the caller's, left as it is)


def test_a_later_loop_takes_the_callers_count_as_it_finds_it(tmp_path, threads, auto):
    """Even a count equal to what an earlier loop had applied: each loop's base is its own caller's."""
    reg = cores.Registry(tmp_path)
    other = _member(tmp_path)
    try:
        torch.set_num_threads(4)
        with cores.Share("a", reg=reg, cores=4, every=0.0) as first:
            assert first.tick(0) == 2
        assert torch.get_num_threads() == 4
        torch.set_num_threads(2)  # the caller's own choice, equal to the share just applied
        _end(other)
        with cores.Share("b", reg=reg, cores=4, every=0.0) as alone:
            assert alone.tick(0) == 2  # alone: its caller's count, not the earlier loop's base
    finally:
        other.kill()
        other.wait()


def test_the_interval_spares_the_registry_between_rechecks(tmp_path, threads, auto):
    torch.set_num_threads(2)
    share = cores.Share("pairs", reg=cores.Registry(tmp_path), cores=2, every=3600.0)
    assert share.tick(0) == 2
    other = _member(tmp_path)
    try:
        assert share.tick(1) == 2  # not re-checked within the interval
        assert share.tick(2, work=123.0) == 1  # a new work size re-checks at once
    finally:
        _end(other)


def test_fixed_counts_are_left_alone(tmp_path, threads, monkeypatch):
    monkeypatch.delenv(cores.THREADS_ENV, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # a torchrun rank's, a Dask worker's or the user's own
    torch.set_num_threads(2)
    other = _member(tmp_path)
    try:
        share = cores.Share("teacher", reg=cores.Registry(tmp_path), cores=2, every=0.0)
        assert share.tick(0) == 2
        monkeypatch.setenv(cores.THREADS_ENV, "1")
        assert share.tick(1) == 1
    finally:
        _end(other)


def test_the_default_directory_is_per_user(monkeypatch, tmp_path):
    monkeypatch.delenv(cores.DIR_ENV, raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert cores.registry_dir() == tmp_path / "reflow-cores"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert cores.registry_dir().name == f"reflow-cores-{os.getuid()}"
    monkeypatch.setenv(cores.DIR_ENV, str(tmp_path / "x"))
    assert cores.registry() is cores.registry() and cores.registry().path == tmp_path / "x"


def test_training_takes_its_share_and_reports_it(tmp_path, threads, auto, monkeypatch):
    """train() applies the rule at its first step and reports it: here the work crossover sends a tiny MLP to one
    thread; the run's results do not depend on the registry otherwise (golden runs use one thread throughout)."""
    from reflow_core.config import NetConfig, TrainConfig
    from reflow_core.nets import build_net
    from reflow_core.train import Batch, train

    monkeypatch.setenv(cores.DIR_ENV, str(tmp_path / "cores"))
    monkeypatch.setenv(cores.MIN_WORK_ENV, "1e12")
    torch.set_num_threads(2)
    rec = _Rec()
    net = build_net(NetConfig(kind="mlp", hidden=16, depth=2), (2,))
    cfg = TrainConfig(steps=3, batch_size=8, lr=1e-3, warmup=1, ckpt_every=3, log_every=3)
    train(net=net, batches=lambda s: Batch(torch.randn(8, 2), torch.randn(8, 2)), cfg=cfg,
          ckpt_dir=str(tmp_path / "ck"), callback=rec)
    reported = [(step, m) for _, step, m in rec.metrics if "threads" in m]
    assert reported == [(0, {"threads": 1.0, "threads_live": 1.0})]
    assert torch.get_num_threads() == 2  # given back when the loop ends
    assert cores.registry().registered  # a member while it lives; unregistered at exit
