"""Pair simulation at scale: the Prefect flow's shard fan-out on a Dask LocalCluster of worker processes,
a whole toy2d pipeline on an s3:// root (moto server on 127.0.0.1), a worker process killed with SIGKILL mid-shard
and resumed, no credential in anything written, and the zarr layout switches (sharding codec, compression)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from helpers import tiny

from reflow_core import stages
from reflow_core.callbacks import NullCallback
from reflow_core.preset import load_preset
from reflow_core.pairs import PairStore, simulate_shard, store_for_config

TINY = tiny({
    "pairs.chunk_size": 250, "pairs.n_pairs": 2000, "pairs.nfe": 9, "pairs.shard_size": 500, "pairs.workers": 2,
    "reflow.train.batch_size": 128, "reflow.train.ckpt_every": 30, "reflow.train.log_every": 20,
    "reflow.train.steps": 60, "reflow.train.warmup": 100, "teacher.train.batch_size": 128,
    "teacher.train.ckpt_every": 30, "teacher.train.log_every": 20, "teacher.train.steps": 60,
    "teacher.train.warmup": 100,
})


def _stage(cfg, rundir, name, device=None, **inputs) -> stages.StageOutput:
    """Run one stage instance of cfg's plan in this process with the given inputs (role -> earlier stage output)."""
    s = stages.find(stages.plan(cfg, rundir), name)
    return stages.module(s).run(s, stages.Context(cfg, rundir, NullCallback(), device), inputs)


def assert_same_store(a: PairStore, b: PairStore) -> None:
    """Bit-for-bit equal arrays and equal per-shard digests."""
    assert a.n == b.n and a.plan == b.plan
    ra, rb = a.read_raw(slice(0, a.n)), b.read_raw(slice(0, b.n))
    for k in ra:
        assert ra[k].dtype == rb[k].dtype and np.array_equal(ra[k].view(np.uint8), rb[k].view(np.uint8)), k
    for k in range(len(a.plan)):
        assert a.marker(k)["sha256"] == b.marker(k)["sha256"], k


# --------------------------------------------------------------------------------------------------- (a) dask
def test_pair_task_runner_choice():
    pytest.importorskip("prefect_dask")
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    from flows.params import orchestration
    from flows.runners import pair_task_runner
    runner, _ = pair_task_runner(orchestration("toy2d"), workers=3)
    assert isinstance(runner, ThreadPoolTaskRunner) and runner._max_workers == 3
    runner, _ = pair_task_runner(orchestration("toy2d", {"pairs.engine": "dask"}), workers=2)
    assert isinstance(runner, DaskTaskRunner) and runner.address is None
    assert runner.cluster_kwargs["n_workers"] == 2 and runner.cluster_kwargs["threads_per_worker"] == 1
    runner, _ = pair_task_runner(orchestration("toy2d", {"pairs.engine": "dask",
                                                         "pairs.dask_address": "tcp://10.0.0.1:8786"}), workers=1)
    assert runner.address == "tcp://10.0.0.1:8786"
    assert stages.pairs.shard_device(5, "cpu") == torch.device("cpu")
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    assert stages.pairs.shard_device(5) == (torch.device(f"cuda:{5 % n}") if n else torch.device("cpu"))


@pytest.mark.slow
def test_dask_engine_matches_threads_bit_for_bit(tmp_path, prefect_api, monkeypatch):
    pytest.importorskip("prefect_dask")
    from flows.reflow import reflow
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = str(tmp_path / "runs")
    t0 = time.perf_counter()
    out = reflow(preset="toy2d", overrides={**TINY, "pairs.engine": "dask"}, root=root, run="dask",
                 stages=["teacher", "pairs"])
    t_dask = time.perf_counter() - t0
    teacher = out["teacher_checkpoint"]
    dask_store = PairStore.open(stages.RunDir.of(root, "dask").url("pairs.zarr"))
    assert dask_store.is_complete() and len(dask_store.plan) == 4
    assert all(dask_store.verify_shard(k) for k in range(4))

    # the same config on the threads engine (run in-process, shard by shard: what each thread task calls)
    t0 = time.perf_counter()
    cfg = load_preset("toy2d", {**TINY, "pairs.engine": "threads", "teacher.checkpoint": teacher})
    tpaths = stages.prepare_run(cfg, root, "threads")
    tteacher = _stage(cfg, tpaths, "teacher")  # teacher.checkpoint given: the dask run's teacher, not trained
    assert tteacher.urls["model"] == teacher
    _stage(cfg, tpaths, "pairs", device="cpu", model=tteacher)
    t_threads = time.perf_counter() - t0
    threads_store = PairStore.open(stages.RunDir.of(root, "threads").url("pairs.zarr"))
    assert threads_store.attrs["teacher_hash"] == dask_store.attrs["teacher_hash"]
    assert_same_store(dask_store, threads_store)
    print(f"dask flow (teacher + pairs) {t_dask:.1f}s, threads engine (pairs) {t_threads:.1f}s")


# --------------------------------------------------------------------------------------------------- (b, c) s3
@pytest.fixture(scope="module")
def s3_pipeline(moto_s3, tmp_path_factory):
    """A whole toy2d pipeline with an s3://reflow-scale/runs root."""
    moto_s3["client"].create_bucket(Bucket="reflow-scale")
    root = "s3://reflow-scale/runs"
    cfg = load_preset("toy2d", TINY)
    t0 = time.perf_counter()
    rows = stages.run_local(cfg, root, "toy", device="cpu")
    print(f"s3 pipeline {time.perf_counter() - t0:.1f}s")
    return {"root": root, "cfg": cfg, "rows": rows, "rundir": stages.RunDir.of(root, "toy"), **moto_s3}


def _keys(client, bucket: str, prefix: str = "") -> list[str]:
    keys, token = [], None
    while True:
        kw = {"Bucket": bucket, "Prefix": prefix, **({"ContinuationToken": token} if token else {})}
        r = client.list_objects_v2(**kw)
        keys += [o["Key"] for o in r.get("Contents", [])]
        if not r.get("IsTruncated"):
            return keys
        token = r["NextContinuationToken"]


@pytest.mark.s3
@pytest.mark.slow
def test_whole_pipeline_on_s3_root(s3_pipeline):
    keys = set(_keys(s3_pipeline["client"], "reflow-scale", "runs/toy/"))
    assert "runs/toy/config.json" in keys
    assert "runs/toy/teacher/latest.json" in keys and "runs/toy/reflow/latest.json" in keys
    assert any(k.startswith("runs/toy/teacher/ckpt-") and k.endswith(".pt") for k in keys)
    assert any(k.startswith("runs/toy/reflow/ckpt-") and k.endswith(".pt") for k in keys)
    assert "runs/toy/pairs.zarr/zarr.json" in keys
    assert {f"runs/toy/pairs.zarr/done/shard-{k:05d}.json" for k in range(4)} <= keys
    assert any(k.startswith("runs/toy/pairs.zarr/noise/c/") for k in keys)
    assert "runs/toy/eval/metrics.json" in keys
    metrics = json.loads(s3_pipeline["client"].get_object(Bucket="reflow-scale",
                                                          Key="runs/toy/eval/metrics.json")["Body"].read())
    assert {(r["model"], r["nfe"]) for r in metrics["rows"]} == {(m, n) for m in ("teacher", "reflow") for n in (1, 2)}
    rundir = s3_pipeline["rundir"]
    names = [s.name for s in stages.plan(s3_pipeline["cfg"], rundir)]
    assert names == ["teacher", "pairs", "reflow", "evaluate"]
    assert all(stages.stage_done(rundir, s) for s in names)
    assert PairStore.open(rundir.url("pairs.zarr")).is_complete()


@pytest.mark.s3
@pytest.mark.slow
def test_no_credentials_in_written_objects(s3_pipeline):
    client, secret, key_id = s3_pipeline["client"], s3_pipeline["secret"], s3_pipeline["key_id"]
    keys = _keys(client, "reflow-scale")
    assert len(keys) > 10
    for k in keys:
        body = client.get_object(Bucket="reflow-scale", Key=k)["Body"].read()
        assert secret.encode() not in body and key_id.encode() not in body, k
    cfg_text = json.dumps(json.loads(client.get_object(Bucket="reflow-scale", Key="runs/toy/config.json")["Body"]
                                     .read()))
    assert secret not in cfg_text and key_id not in cfg_text
    assert not any(w in cfg_text.lower() for w in ("secret", "access_key", "password"))


_WORKER = """
import sys, torch
torch.set_num_threads(1)
from reflow_core import stages
from reflow_core.config import PipelineConfig
cfg = PipelineConfig.model_validate_json(sys.argv[1])
rundir = stages.RunDir.of(sys.argv[2], sys.argv[3])
st = stages.find(stages.plan(cfg, rundir), "pairs")
inputs = {"model": stages.StageOutput({"model": sys.argv[4]})}  # the teacher checkpoint
print(stages.pairs.simulate(st, stages.Context(cfg, rundir, device="cpu"), inputs, 0), flush=True)
"""


@pytest.mark.s3
@pytest.mark.slow
def test_worker_killed_mid_shard_then_resumed(s3_pipeline, tmp_path):
    client, root = s3_pipeline["client"], s3_pipeline["root"]
    teacher = stages.model_checkpoint(s3_pipeline["rundir"], "teacher")
    # one big shard written in many small chunks, so the worker is still busy when the first chunk lands
    over = {**TINY, "teacher.checkpoint": teacher, "pairs.n_pairs": 8_000, "pairs.shard_size": 4_000,
            "pairs.chunk_size": 100, "pairs.batch_size": 400, "pairs.nfe": 15}
    cfg = load_preset("toy2d", over)
    rundir = stages.prepare_run(cfg, root, "killed")
    teacher_out = _stage(cfg, rundir, "teacher")  # teacher.checkpoint given: checked, not trained
    assert teacher_out.urls["model"] == teacher
    pairs_stage = stages.find(stages.plan(cfg, rundir), "pairs")
    assert stages.pairs.pending(pairs_stage, stages.Context(cfg, rundir), {"model": teacher_out}) == [0, 1]
    proc = subprocess.Popen([sys.executable, "-c", _WORKER, cfg.model_dump_json(), root, "killed", teacher],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ))
    first = "runs/killed/pairs.zarr/noise/c/0/0"
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            if _keys(client, "reflow-scale", first):
                break
            time.sleep(0.02)
        assert proc.poll() is None, ("worker ended before it was killed", proc.communicate())
        assert _keys(client, "reflow-scale", first), "no chunk written within 90 s"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    store = PairStore.open(rundir.url("pairs.zarr"))
    assert store.marker(0) is None and store.pending_shards() == [0, 1]  # killed mid-shard: nothing marked done
    written = [k for k in _keys(client, "reflow-scale", "runs/killed/pairs.zarr/noise/c/")]
    assert 0 < len(written) < 40, len(written)  # partial: some of shard 0's 40 chunks

    t0 = time.perf_counter()
    _stage(cfg, rundir, "pairs", device="cpu", model=teacher_out)  # the resume
    t_resume = time.perf_counter() - t0
    resumed = PairStore.open(rundir.url("pairs.zarr"))
    assert resumed.is_complete()

    ref_paths = stages.prepare_run(cfg, str(tmp_path / "runs"), "clean")  # one clean pass, local
    _stage(cfg, ref_paths, "pairs", device="cpu", model=_stage(cfg, ref_paths, "teacher"))
    assert_same_store(resumed, PairStore.open(ref_paths.url("pairs.zarr")))
    print(f"killed after {len(written)} noise chunks; resume {t_resume:.1f}s")


# --------------------------------------------------------------------------------------------------- zarr layout
def _velocity(x, t, label):
    return x * (0.3 + 0.2 * t.reshape(-1, *([1] * (x.dim() - 1))))


def _velocity_for(label):  # simulate_shard's velocity_for: the batch's labels -> v(x, t)
    return lambda x, t: _velocity(x, t, label)


@pytest.mark.parametrize("layout", [{"zarr_shards": True}, {"compress": True},
                                    {"zarr_shards": True, "compress": True}])
def test_zarr_layout_switches_keep_values(tmp_path, layout):
    from reflow_core.config import PairsConfig
    base = dict(n_pairs=96, n_forward=32, shard_size=32, chunk_size=8, batch_size=12, solver="euler", nfe=4,
                grid="uniform", seed=7)
    x = torch.randn(40, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    stores = []
    for i, extra in enumerate(({}, layout)):
        c = PairsConfig(**base, **extra)
        s = store_for_config(str(tmp_path / f"p{i}.zarr"), c, shape=(3, 4, 4), teacher_hash="t")
        for sh in s.plan:
            simulate_shard(s, sh, _velocity_for, cfg=c, data_x=x)
        stores.append(PairStore.open(str(tmp_path / f"p{i}.zarr")))
    assert_same_store(*stores)
    plain, other = stores
    assert other.attrs["zarr_shards"] == layout.get("zarr_shards", False)
    n_files = [sum(len(f) for _, _, f in os.walk(tmp_path / f"p{i}.zarr" / "noise" / "c")) for i in (0, 1)]
    if layout.get("zarr_shards"):
        assert n_files[1] == len(other.plan) < n_files[0] == other.num_chunks  # one object per pair shard
    b = other.read(torch.tensor([5, 90, 3, 127]))
    assert torch.equal(b.sample, plain.read(torch.tensor([5, 90, 3, 127])).sample)


def test_zarr_shards_refuse_shared_boundary(tmp_path):
    with pytest.raises(ValueError, match="zarr_shards"):
        PairStore.create(str(tmp_path / "p.zarr"), shape=(2,), n_backward=48, n_forward=16, chunk_size=16,
                         shard_size=32, dtype="float32", attrs={}, zarr_shards=True)
