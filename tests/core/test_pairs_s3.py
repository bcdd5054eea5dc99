"""Pair store on s3:// (moto server on 127.0.0.1): concurrent shard writers, resume after an interrupted write,
and the training sampler reading from the bucket."""
from __future__ import annotations

import socket
import threading

import numpy as np
import pytest
import torch

pytest.importorskip("moto")
boto3 = pytest.importorskip("boto3")
pytest.importorskip("s3fs")

from reflow_core.config import PairsConfig  # noqa: E402
from reflow_core.pairs import PairSampler, PairStore, row_noise, simulate_shard, store_for_config  # noqa: E402

pytestmark = pytest.mark.s3

SHAPE = (3, 2)
NUM_CLASSES = 4


def velocity(x, t, label):
    tt = t.reshape(-1, *([1] * (x.dim() - 1)))
    v = x * (0.4 + 0.2 * tt)
    if label is not None:
        v = v + 0.1 * (1.0 - tt) * label.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
    return v


def velocity_for(label):
    """simulate_shard's velocity_for: the batch's labels bound, the solvers' v(x, t)."""
    return lambda x, t: velocity(x, t, label)


def cfg() -> PairsConfig:
    return PairsConfig(n_pairs=128, n_forward=64, shard_size=32, chunk_size=16, batch_size=24, solver="heun",
                       nfe=5, grid={"kind": "rho", "rho": 1.5}, dtype="float32", seed=99)


def data():
    g = torch.Generator().manual_seed(5)
    return torch.randn(50, *SHAPE, generator=g), torch.randint(NUM_CLASSES, (50,), generator=g)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as mp:
        for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "FSSPEC_S3_ENDPOINT_URL", "AWS_PROFILE",
                  "AWS_SESSION_TOKEN"):
            mp.delenv(k, raising=False)
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="pairs")
        yield {"endpoint": endpoint, "opts": {"client_kwargs": {"endpoint_url": endpoint}}, "mp": mp}
    server.stop()


@pytest.fixture(scope="module")
def local_ref(tmp_path_factory):
    """The same store written locally in one pass."""
    c = cfg()
    s = store_for_config(str(tmp_path_factory.mktemp("ref") / "pairs.zarr"), c, shape=SHAPE,
                                     teacher_hash="t1")
    x, y = data()
    for sh in s.plan:
        simulate_shard(s, sh, velocity_for, cfg=c, data_x=x, data_y=y, num_classes=NUM_CLASSES)
    return s


def assert_same(a: PairStore, b: PairStore):
    ra, rb = a.read_raw(slice(0, a.n)), b.read_raw(slice(0, b.n))
    for k in ra:
        assert ra[k].dtype == rb[k].dtype and np.array_equal(ra[k].view(np.uint8), rb[k].view(np.uint8)), k
    for k in range(len(a.plan)):
        assert a.marker(k)["sha256"] == b.marker(k)["sha256"]


def test_concurrent_writers_match_local(s3, local_ref):
    url, c = "s3://pairs/run-a/pairs.zarr", cfg()
    store_for_config(url, c, shape=SHAPE, teacher_hash="t1", storage_options=s3["opts"])
    x, y = data()
    errors = []

    def worker(shards):
        try:
            store = PairStore.open(url, storage_options=s3["opts"])  # each writer its own handle
            for k in shards:
                simulate_shard(store, k, velocity_for, cfg=c, data_x=x, data_y=y, num_classes=NUM_CLASSES)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    n = len(local_ref.plan)
    threads = [threading.Thread(target=worker, args=(list(range(i, n, 2)),)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    store = PairStore.open(url, storage_options=s3["opts"])
    assert store.is_complete() and store.done_shards() == set(range(n))
    assert_same(store, local_ref)
    assert all(store.verify_shard(k) for k in range(n))


def test_interrupted_shard_is_redone(s3, local_ref):
    url, c = "s3://pairs/run-b/pairs.zarr", cfg()
    store = store_for_config(url, c, shape=SHAPE, teacher_hash="t1", storage_options=s3["opts"])
    x, y = data()
    for k in (0, 1):
        simulate_shard(store, k, velocity_for, cfg=c, data_x=x, data_y=y, num_classes=NUM_CLASSES)
    # shard 2 was interrupted: half its rows written (with wrong values), no marker
    sh = store.plan[2]
    half = sh.rows // 2
    store.write_rows(sh.start, row_noise(1, range(half), SHAPE), torch.full((half, *SHAPE), 7.0))
    assert store.pending_shards() == [2, 3, 4, 5]
    # resume from a fresh process's view of the store
    resumed = store_for_config(url, c, shape=SHAPE, teacher_hash="t1", storage_options=s3["opts"])
    results = [simulate_shard(resumed, k, velocity_for, cfg=c, data_x=x, data_y=y, num_classes=NUM_CLASSES)
               for k in range(len(resumed.plan))]
    assert [r.get("skipped", False) for r in results] == [True, True, False, False, False, False]
    assert resumed.is_complete()
    assert_same(resumed, local_ref)


def test_sampler_reads_from_s3_with_endpoint_from_env(s3, local_ref):
    url = "s3://pairs/run-a/pairs.zarr"  # written by test_concurrent_writers_match_local, or written here
    opts = s3["opts"]
    if not PairStore.exists(url, opts):
        c = cfg()
        s = store_for_config(url, c, shape=SHAPE, teacher_hash="t1", storage_options=opts)
        x, y = data()
        for sh in s.plan:
            simulate_shard(s, sh, velocity_for, cfg=c, data_x=x, data_y=y, num_classes=NUM_CLASSES)
    s3["mp"].setenv("AWS_ENDPOINT_URL", s3["endpoint"])
    try:
        store = PairStore.open(url)  # endpoint taken from the environment
        for budget, mode in ((2 * 2 ** 30, "memory"), (0, "stream")):
            with PairSampler(store, 16, forward_ratio=0.25, seed=0, window_chunks=3, ram_budget_bytes=budget) as sp:
                assert sp.mode == mode
                for _ in range(10):
                    b = next(sp)
                    assert b.noise.shape == (16, *SHAPE) and int((b.direction == 1).sum()) == 4
                    ref = local_ref.read(b.index)
                    assert torch.equal(b.noise, ref.noise) and torch.equal(b.sample, ref.sample)
                    assert torch.equal(b.label, ref.label)
    finally:
        s3["mp"].delenv("AWS_ENDPOINT_URL")


def test_stream_from_s3_equals_memory(s3, local_ref):
    """The bucket's store streamed (windows of chunks read over S3, prefetched) gives the same bits per step as the
    same store held in RAM, and as the local copy held in RAM."""
    url = "s3://pairs/run-c/pairs.zarr"
    c, x, y = cfg(), *data()
    store = store_for_config(url, c, shape=SHAPE, teacher_hash="t1", storage_options=s3["opts"])
    for sh in store.plan:
        simulate_shard(store, sh, velocity_for, cfg=c, data_x=x, data_y=y, num_classes=NUM_CLASSES)
    kw = dict(forward_ratio=0.25, seed=3, window_chunks=2)
    with PairSampler(store, 20, ram_budget_bytes=0, **kw) as st, PairSampler(store, 20, **kw) as mem, \
            PairSampler(local_ref, 20, **kw) as local:
        assert (st.mode, mem.mode, local.mode) == ("stream", "memory", "memory")
        for step in range(30):  # 120 backward positions per 8 steps: crosses epochs of both sections
            a, b, r = st.batch(step), mem.batch(step), local.batch(step)
            for k in ("noise", "sample", "label", "direction", "index"):
                assert torch.equal(getattr(a, k), getattr(b, k)) and torch.equal(getattr(a, k), getattr(r, k)), k
            assert a.noise.dtype == torch.float32 and a.label.dtype == torch.long
            assert int((a.direction == 1).sum()) == 5
        assert torch.equal(a.noise.view(torch.int32), r.noise.view(torch.int32))  # the same bits
        # resumed at a later step, on a fresh handle: the same batch
        with PairSampler(PairStore.open(url, storage_options=s3["opts"]), 20, ram_budget_bytes=0, **kw) as again:
            assert torch.equal(again.batch(17).index, mem.batch(17).index)
            assert torch.equal(again.batch(17).sample, mem.batch(17).sample)
