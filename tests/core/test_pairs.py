"""Pair store: plan, per-row seeding, resumable/idempotent simulation, dtypes, and the training sampler (CPU, fast)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from reflow_core import solvers
from reflow_core.config import PairsConfig
from reflow_core.pairs import (
    PairBatch, PairSampler, PairStore, PairStoreIncomplete, PairStoreMismatch, Shard, ram_bytes, row_labels,
    row_noise, row_seed, shard_plan, simulate_shard, store_for_config, NOISE_RNG,
)
from reflow_core import rng

SHAPE = (2,)
NUM_CLASSES = 3


def affine_v(x: torch.Tensor, t: torch.Tensor, label: torch.Tensor | None) -> torch.Tensor:
    """Elementwise affine field (only + and *): bitwise independent of batch size and layout."""
    tt = t.reshape(-1, *([1] * (x.dim() - 1)))
    v = x * (0.5 + 0.3 * tt)
    if label is not None:
        v = v + 0.2 * (1.0 - tt) * label.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
    return v


def smooth_v(x, t, label):
    tt = t.reshape(-1, *([1] * (x.dim() - 1)))
    return 0.5 * x + 0.3 * torch.tanh(x) * tt


def bind(v3):
    """simulate_shard's velocity_for from a (x, t, label) field: labels bound per batch, solvers' v(x, t)."""
    return lambda label: (lambda x, t: v3(x, t, label))


affine_for, smooth_for = bind(affine_v), bind(smooth_v)


def cfg_for(**kw) -> PairsConfig:
    base = dict(n_pairs=96, n_forward=32, shard_size=32, chunk_size=16, batch_size=20, solver="heun", nfe=7,
                grid={"kind": "rho", "rho": 1.5}, dtype="float32", seed=7)
    base.update(kw)
    return PairsConfig(**base)


def make_store(url, cfg: PairsConfig, shape=SHAPE, teacher_hash="abc") -> PairStore:
    return store_for_config(url, cfg, shape=shape, teacher_hash=teacher_hash)


def data(n=40, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *SHAPE, generator=g) * 0.5 + 1.0, torch.randint(NUM_CLASSES, (n,), generator=g)


def simulate_all(store, cfg, v=affine_for, num_classes=NUM_CLASSES, order=None):
    x, y = data()
    out = []
    for k in (order if order is not None else range(len(store.plan))):
        out.append(simulate_shard(store, store.plan[k], v, cfg=cfg, data_x=x, data_y=y, num_classes=num_classes))
    return out


def raw_equal(a: PairStore, b: PairStore) -> bool:
    ra, rb = a.read_raw(slice(0, a.n)), b.read_raw(slice(0, b.n))
    return all(ra[k].dtype == rb[k].dtype and np.array_equal(ra[k].view(np.uint8), rb[k].view(np.uint8))
               for k in ra)


# ------------------------------------------------------------------------------------------------ plan & seeding
@pytest.mark.parametrize("nb,nf,s", [(10, 0, 3), (12, 5, 4), (0, 7, 7), (100, 100, 32), (5, 5, 100)])
def test_shard_plan_covers_each_row_once(nb, nf, s):
    plan = shard_plan(nb, nf, s)
    seen = np.zeros(nb + nf, dtype=int)
    for i, sh in enumerate(plan):
        assert sh.index == i and 0 < sh.stop - sh.start <= s
        seen[sh.start:sh.stop] += 1
        section = 0 if sh.start < nb else 1
        assert sh.direction == section
        assert (sh.stop <= nb) if section == 0 else (sh.start >= nb)  # never straddles
    assert (seen == 1).all()
    assert [sh.start for sh in plan] == sorted(sh.start for sh in plan)


def test_row_noise_and_labels_independent_of_layout():
    full = row_noise(11, range(0, 20), (3, 2))
    part = row_noise(11, range(5, 10), (3, 2))
    assert full.shape == (20, 3, 2) and torch.equal(full[5:10], part)
    assert torch.equal(row_noise(11, torch.tensor([9, 5]), (3, 2)), full[[9, 5]])
    assert not torch.equal(row_noise(12, range(5, 10), (3, 2)), part)
    assert abs(float(row_noise(0, range(4000), (1,)).std()) - 1.0) < 0.05
    labels = row_labels(11, range(0, 20), 5)
    assert torch.equal(labels[5:10], row_labels(11, range(5, 10), 5))
    assert labels.dtype == torch.long and labels.min() >= 0 and labels.max() < 5


# SplitMix64 written out from the algorithm (Vigna, splitmix64.c), independent of reflow_core's implementation
_M64 = (1 << 64) - 1


def _ref_splitmix64(state: int, n: int) -> list[int]:
    out = []
    for _ in range(n):
        state = (state + 0x9E3779B97F4A7C15) & _M64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
        out.append(z ^ (z >> 31))
    return out


def test_splitmix64_stream_is_the_standard_sequence():
    # published outputs of splitmix64.c seeded with 0
    assert _ref_splitmix64(0, 3) == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]
    keys = np.array([0, 1, 0x9E3779B97F4A7C15, 2 ** 63 - 1, 2 ** 64 - 1, 123456789], dtype=np.uint64)
    ours = rng.row_stream(keys, 1, 9)
    odd, even = rng.row_stream(keys, 1, 4, 2), rng.row_stream(keys, 2, 4, 2)
    for i, k in enumerate(keys):
        ref = _ref_splitmix64(int(k), 9)
        assert [int(v) for v in ours[i]] == ref
        assert [int(v) for v in odd[i]] == ref[0:8:2] and [int(v) for v in even[i]] == ref[1:8:2]
    z = np.random.default_rng(0).integers(0, 2 ** 64, 500, dtype=np.uint64)
    assert [int(v) for v in rng.splitmix64_array(z)] == [_ref_splitmix64(int(v), 1)[0] for v in z]


def test_vectorised_row_seed_equals_scalar():
    draw = np.random.default_rng(1)
    rows = np.concatenate([np.arange(100), draw.integers(0, 2 ** 40, 100), 2 ** 40 + np.arange(50),
                           draw.integers(2 ** 40, 2 ** 63 - 1, 100), [2 ** 62, 2 ** 63 - 1]]).astype(np.int64)
    for seed in (0, 7, -5, 2 ** 31 + 1, 2 ** 63 + 11, 2 ** 80 + 3):
        for tag in (rng.TAG_NOISE, rng.TAG_LABEL, rng.TAG_PERM):
            keys = rng.row_keys(seed, rng.rows_array(rows), tag)
            assert keys.dtype == np.uint64
            assert [int(k) for k in keys] == [row_seed(seed, int(r), tag) for r in rows]


def test_row_noise_and_labels_follow_their_definition():
    """row_noise / row_labels against the documented scheme computed in plain Python from the reference stream."""
    seed, rows, d, k = 5, [0, 3, 2 ** 41 + 7], 5, 7  # odd d: the last sine is dropped
    noise, labels = row_noise(seed, rows, (d,)), row_labels(seed, rows, k)
    for i, r in enumerate(rows):
        u = [(x >> 11) * 2.0 ** -53 for x in _ref_splitmix64(row_seed(seed, r), d + 1)]
        want = []
        for j in range(0, d + 1, 2):
            rad = math.sqrt(-2.0 * math.log(1.0 - u[j]))
            want += [rad * math.cos(2 * math.pi * u[j + 1]), rad * math.sin(2 * math.pi * u[j + 1])]
        assert torch.allclose(noise[i].double(), torch.tensor(want[:d], dtype=torch.float64), rtol=2e-7, atol=1e-9)
        lu = (_ref_splitmix64(row_seed(seed, r, rng.TAG_LABEL), 1)[0] >> 11) * 2.0 ** -53
        assert int(labels[i]) == math.floor(lu * k)


def test_row_noise_independent_of_blocks_threads_and_input_type(monkeypatch):
    shape = (3, 16, 16)  # 300 x 768 elements: past the threading threshold
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    full = row_noise(3, range(300), shape)
    torch.set_num_threads(1)
    try:
        assert torch.equal(row_noise(3, range(300), shape), full)
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setattr(rng, "BLOCK_ELEMS", 3000)  # 3 rows per block
    assert torch.equal(row_noise(3, range(300), shape), full)
    idx = np.arange(299, 100, -7)
    assert torch.equal(row_noise(3, idx, shape), full[torch.from_numpy(idx)])
    assert torch.equal(row_noise(3, torch.from_numpy(idx).to(torch.int32), shape), full[torch.from_numpy(idx)])
    assert torch.equal(row_noise(3, [17], shape)[0], full[17])
    assert row_noise(3, [], shape).shape == (0, *shape) and row_labels(3, [], 4).shape == (0,)
    with pytest.raises(TypeError):
        row_noise(3, torch.tensor([1.0]), shape)


def test_row_noise_and_labels_statistics():
    """Fixed seeds (deterministic); the bounds sit at ~5 sigma / p ~ 1e-4 (no scipy.stats: its import alone is 1 s)."""
    x = row_noise(2024, range(50_000), (4,))  # 200k values
    v = x.double().reshape(-1).numpy()
    n = v.size
    assert abs(v.mean()) < 0.012 and abs(v.std() - 1.0) < 0.008
    cdf = torch.special.ndtr(torch.from_numpy(np.sort(v))).numpy()
    ks = max((np.arange(1, n + 1) / n - cdf).max(), (cdf - np.arange(n) / n).max())
    assert ks < math.sqrt(-math.log(1e-4 / 2) / 2 / n)  # Kolmogorov-Smirnov against N(0, 1) at p = 1e-4
    assert abs((np.abs(v) > 3).mean() - 0.0027) < 0.0008
    a = x.double().numpy()
    for p, q in ((a[:, :-1], a[:, 1:]), (a[:-1], a[1:])):  # consecutive elements of a row; adjacent rows
        assert abs(np.corrcoef(p.reshape(-1), q.reshape(-1))[0, 1]) < 0.012
    lab = row_labels(2024, range(200_000), 10).numpy()
    counts = np.bincount(lab, minlength=10)
    assert counts.shape == (10,) and ((counts - 20_000) ** 2 / 20_000).sum() < 33.7  # chi-square, 9 dof, p = 1e-4
    assert (row_labels(1, range(50), 1) == 0).all()


# ------------------------------------------------------------------------------------------------ simulation
def test_store_independent_of_batch_size_and_shard_order(tmp_path):
    a = make_store(str(tmp_path / "a" / "pairs.zarr"), cfg_for(batch_size=7))
    b = make_store(f"file://{tmp_path}/b/pairs.zarr", cfg_for(batch_size=64))
    simulate_all(a, cfg_for(batch_size=7))
    simulate_all(b, cfg_for(batch_size=64), order=[3, 1, 0, 2])
    assert a.is_complete() and b.is_complete() and a.pending_shards() == []
    assert raw_equal(a, b)
    for k in range(len(a.plan)):
        assert a.marker(k)["sha256"] == b.marker(k)["sha256"]
        assert a.verify_shard(k) and b.verify_shard(k)
    batch = a.read(slice(0, a.n))
    assert (batch.direction[:96] == 0).all() and (batch.direction[96:] == 1).all()
    assert batch.label.min() >= 0  # all rows labelled (class-conditional)


def test_skip_done_and_resimulate_identical(tmp_path):
    cfg = cfg_for()
    s = make_store(str(tmp_path / "pairs.zarr"), cfg)
    seen = []
    x, y = data()
    r = simulate_shard(s, s.plan[0], affine_for, cfg=cfg, num_classes=NUM_CLASSES,
                       progress=lambda d, t: seen.append((d, t)))
    assert r["shard"] == 0 and r["rows"] == 32 and r["pairs_per_s"] > 0 and not r["skipped"]
    assert seen[-1] == (32, 32) and len(seen) == math.ceil(32 / cfg.batch_size)
    assert s.done_shards() == {0} and s.pending_shards() == [1, 2, 3]
    simulate_all(s, cfg)
    before = s.read_raw(slice(0, s.n))
    marker = s.marker(1)["sha256"]
    assert simulate_shard(s, s.plan[1], affine_for, cfg=cfg, num_classes=NUM_CLASSES)["skipped"] is True
    # a store re-opened from its URL sees the same state
    assert PairStore.open(str(tmp_path / "pairs.zarr")).is_complete()
    s.unmark(1)
    assert s.pending_shards() == [1] and not s.verify_shard(1)
    # corrupt the shard's bytes, then redo it: identical bytes again
    s.write_rows(32, torch.zeros(32, *SHAPE), torch.zeros(32, *SHAPE))
    r = simulate_shard(s, 1, affine_for, cfg=cfg, num_classes=NUM_CLASSES, data_x=x, data_y=y)
    assert not r["skipped"]
    after = s.read_raw(slice(0, s.n))
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert s.marker(1)["sha256"] == marker and s.verify_shard(1)
    s.write_rows(40, torch.ones(2, *SHAPE), torch.ones(2, *SHAPE))
    assert not s.verify_shard(1)


def test_stored_noise_reproduces_stored_sample(tmp_path):
    cfg = cfg_for(n_forward=0, solver="euler", nfe=6, grid="uniform")
    s = make_store(str(tmp_path / "pairs.zarr"), cfg)
    simulate_all(s, cfg)
    b = s.read(slice(0, s.n))
    assert torch.equal(b.noise, row_noise(cfg.seed, range(s.n), SHAPE))
    assert torch.equal(b.label, row_labels(cfg.seed, range(s.n), NUM_CLASSES))
    out = solvers.sample(lambda x, t: affine_v(x, t, b.label), b.noise, cfg.nfe, cfg.solver, "uniform")
    torch.testing.assert_close(out, b.sample, atol=1e-5, rtol=0)
    # the affine field's exact flow: x0 = x1 * exp(-(0.5 + 0.15)) + label term; euler with 6 steps is close-ish
    assert (out - b.noise).abs().max() > 0.1  # something happened


def test_forward_pairs_invert_the_data(tmp_path):
    cfg = cfg_for(n_pairs=16, n_forward=48, shard_size=16, chunk_size=8, nfe=63, grid="uniform")
    s = make_store(str(tmp_path / "pairs.zarr"), cfg)
    x, y = data(n=30)
    for sh in s.plan:
        simulate_shard(s, sh, smooth_for, cfg=cfg, data_x=x, data_y=y, num_classes=0)
    f = s.read(slice(16, 64))
    assert (f.direction == 1).all()
    # row j uses a permutation of the data set, cycled past its length; labels are the data labels
    for j in range(48):
        i = int(((x - f.sample[j]).abs().sum(1) == 0).nonzero()[0])
        assert f.label[j] == y[i]
    assert len({tuple(r.tolist()) for r in f.sample[:30]}) == 30  # first 30 rows: each data point once
    back = solvers.sample(lambda z, t: smooth_v(z, t, None), f.noise, cfg.nfe, cfg.solver, "uniform")
    torch.testing.assert_close(back, f.sample, atol=1e-3, rtol=0)
    assert (f.noise - f.sample).abs().mean() > 0.3


def test_forward_needs_data_and_aligned_sections(tmp_path):
    cfg = cfg_for()
    s = make_store(str(tmp_path / "pairs.zarr"), cfg)
    with pytest.raises(ValueError, match="data_x"):
        simulate_shard(s, s.plan[-1], affine_for, cfg=cfg)
    with pytest.raises(ValueError, match="multiple of chunk_size"):
        PairStore.create(str(tmp_path / "bad.zarr"), shape=SHAPE, n_backward=20, n_forward=8, chunk_size=16,
                         shard_size=32, dtype="float32", attrs={"teacher_hash": "x"})


def test_float16_storage_rounds_as_torch_does():
    """The shard writer rounds float16 with numpy (no OpenMP team in its thread): bit for bit torch's rounding,
    over 15 decades, ties, overflow to inf, subnormals, signed zeros and NaN, without numpy's overflow warning."""
    import warnings

    from reflow_core.pairs.layout import to_storage

    g = torch.Generator().manual_seed(0)
    wide = torch.randn(200_000, generator=g) * 10.0 ** torch.randint(-9, 6, (200_000,), generator=g).float()
    special = torch.tensor([float("inf"), -float("inf"), float("nan"), 65504.0, 65519.99, 65520.0, 1e6, -1e6,
                            2.0 ** -24, 2.0 ** -25, 3 * 2.0 ** -26, 1.0 + 2.0 ** -11, 1.0 + 3 * 2.0 ** -11, -0.0, 0.0])
    x = torch.cat([wide, special]).reshape(-1, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = to_storage(x, "float16")
    assert got.dtype == np.float16 and got.shape == tuple(x.shape)
    assert np.array_equal(got.view(np.uint16), x.to(torch.float16).numpy().view(np.uint16))


@pytest.mark.parametrize("dtype,tol", [("float16", 1e-3), ("bfloat16", 8e-3), ("float32", 0.0)])
def test_dtype_roundtrip(tmp_path, dtype, tol):
    shape = (1, 4, 4)
    cfg = cfg_for(dtype=dtype, n_forward=0, n_pairs=40)
    s = make_store(str(tmp_path / "pairs.zarr"), cfg, shape=shape)
    assert s.attrs["dtype"] == dtype and s.attrs["storage_dtype"] == ("uint16" if dtype == "bfloat16" else dtype)
    g = torch.Generator().manual_seed(0)
    for sh in s.plan:
        noise, sample = torch.randn(sh.rows, *shape, generator=g), torch.randn(sh.rows, *shape, generator=g)
        s.write_shard(sh, noise, sample, torch.arange(sh.rows), 0)
        got = s.read(slice(sh.start, sh.stop))
        assert got.noise.dtype == torch.float32 and got.label.dtype == torch.long
        assert torch.equal(got.noise, noise.to(getattr(torch, dtype)).float())
        torch.testing.assert_close(got.sample, sample, atol=tol * 4, rtol=tol)
        assert torch.equal(got.label, torch.arange(sh.rows)) and s.verify_shard(sh.index)
    assert s.is_complete()
    # read by index (unsorted, repeated) matches slices
    idx = torch.tensor([39, 3, 3, 17])
    b = s.read(idx)
    full = s.read(slice(0, 40))
    assert torch.equal(b.noise, full.noise[idx]) and torch.equal(b.index, idx)


def test_create_is_idempotent_and_refuses_mismatch(tmp_path):
    url = str(tmp_path / "run" / "pairs.zarr")
    cfg = cfg_for(n_forward=0)
    s = make_store(url, cfg)
    simulate_shard(s, 0, affine_for, cfg=cfg, num_classes=NUM_CLASSES)
    again = make_store(url, cfg)  # same identity: opens, progress kept
    assert again.done_shards() == {0} and again.n == 96
    with pytest.raises(PairStoreMismatch) as e:
        make_store(url, cfg, teacher_hash="other")
    assert url in str(e.value) and "teacher_hash" in str(e.value)
    with pytest.raises(PairStoreMismatch, match="chunk_size"):
        make_store(url, cfg_for(n_forward=0, chunk_size=8))
    with pytest.raises(PairStoreMismatch, match="nfe"):
        simulate_shard(s, 1, affine_for, cfg=cfg_for(n_forward=0, nfe=9), num_classes=NUM_CLASSES)
    with pytest.raises(FileNotFoundError):
        PairStore.open(str(tmp_path / "nope.zarr"))


def test_store_records_noise_rng_and_refuses_another_scheme_with_pending_shards(tmp_path):
    import zarr

    url = str(tmp_path / "run" / "pairs.zarr")
    cfg = cfg_for(n_pairs=64, n_forward=0)
    s = make_store(url, cfg)
    assert s.attrs["noise_rng"] == NOISE_RNG == "splitmix64-boxmuller-v1"
    simulate_all(s, cfg)
    group = zarr.open_group(url, mode="r+")
    for old in (None, "torch-generator-per-row"):  # made before the attr existed / by another scheme
        if old is None:
            del group.attrs["noise_rng"]
        else:
            group.attrs["noise_rng"] = old
        assert make_store(url, cfg).is_complete()  # finished: its pairs are stored, nothing is drawn again
        s.unmark(1)
        with pytest.raises(PairStoreMismatch, match=f"noise_rng: existing={old!r} "
                                                    f"requested='splitmix64-boxmuller-v1'"):
            make_store(url, cfg)
        with pytest.raises(PairStoreMismatch, match="noise_rng"):
            simulate_shard(PairStore.open(url), 1, affine_for, cfg=cfg, num_classes=NUM_CLASSES)
        assert PairStore.open(url).pending_shards() == [1]
        group.attrs["noise_rng"] = NOISE_RNG
        simulate_shard(make_store(url, cfg), 1, affine_for, cfg=cfg, num_classes=NUM_CLASSES)


def test_writer_error_is_raised_and_no_marker(tmp_path, monkeypatch):
    cfg = cfg_for(n_forward=0, batch_size=8)
    s = make_store(str(tmp_path / "pairs.zarr"), cfg)

    def boom(start, arrays):
        raise OSError("disk full")

    monkeypatch.setattr(s, "_write_rows", boom)
    with pytest.raises(OSError, match="disk full"):
        simulate_shard(s, 0, affine_for, cfg=cfg, num_classes=NUM_CLASSES)
    assert s.done_shards() == set()


# ------------------------------------------------------------------------------------------------ sampler
MODES = {"memory": {}, "stream": {"ram_budget_bytes": 0}}


@pytest.fixture(scope="module")
def full_store(tmp_path_factory):
    cfg = cfg_for(n_pairs=96, n_forward=64, batch_size=64)
    s = make_store(str(tmp_path_factory.mktemp("full") / "pairs.zarr"), cfg)
    simulate_all(s, cfg)
    return s


@pytest.fixture(scope="module")
def ragged_store(tmp_path_factory):
    """bfloat16, backward only, 90 rows in chunks of 16: the last chunk (and so one window per epoch) is short."""
    s = PairStore.create(str(tmp_path_factory.mktemp("ragged") / "pairs.zarr"), shape=(2, 3), n_backward=90,
                         n_forward=0, chunk_size=16, shard_size=32, dtype="bfloat16", attrs={"teacher_hash": "r"})
    g = torch.Generator().manual_seed(4)
    for sh in s.plan:
        s.write_shard(sh, torch.randn(sh.rows, 2, 3, generator=g), torch.randn(sh.rows, 2, 3, generator=g),
                      torch.randint(5, (sh.rows,), generator=g))
    return s


def assert_batches_equal(a: PairBatch, b: PairBatch):
    for k in ("noise", "sample", "label", "direction", "index"):
        x, y = getattr(a, k), getattr(b, k)
        assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y), k
        if x.is_floating_point():  # bit-identical, not only equal as numbers
            assert torch.equal(x.view(torch.int32), y.view(torch.int32)), k


def test_sampler_refuses_incomplete_store(tmp_path):
    s = make_store(str(tmp_path / "pairs.zarr"), cfg_for())
    with pytest.raises(PairStoreIncomplete, match="pending"):
        PairSampler(s, 8)


def test_sampler_mode_follows_ram_budget(full_store):
    need = ram_bytes(full_store)
    assert need == full_store.n * (2 * 2 * 4 + 16)
    for budget, mode in ((2 * 2 ** 30, "memory"), (need, "memory"), (need - 1, "stream"), (0, "stream")):
        with PairSampler(full_store, 8, ram_budget_bytes=budget) as sp:
            assert sp.mode == mode
            b = sp.batch(0)
            assert b.noise.dtype == torch.float32 and b.sample.dtype == torch.float32
            assert b.label.dtype == torch.long and b.direction.dtype == torch.long and b.index.dtype == torch.long


@pytest.mark.parametrize("mode", MODES)
def test_sampler_shapes_ratio_and_coverage(full_store, mode):
    kw = MODES[mode]
    with PairSampler(full_store, 10, forward_ratio=0.3, seed=1, window_chunks=2, **kw) as sp:
        assert sp.mode == mode
        fwd_seen, bwd_seen = [], []
        for _ in range(20):
            b = next(sp)
            assert isinstance(b, PairBatch) and b.noise.shape == (10, *SHAPE) and b.sample.shape == (10, *SHAPE)
            assert b.noise.dtype == torch.float32 and b.label.dtype == torch.long
            assert int((b.direction == 1).sum()) == 3 and int((b.direction == 0).sum()) == 7
            assert (b.direction[:7] == 0).all() and (b.direction[7:] == 1).all()  # backward rows first
            fwd_seen += b.index[b.direction == 1].tolist()
            bwd_seen += b.index[b.direction == 0].tolist()
        assert all(i >= 96 for i in fwd_seen) and all(i < 96 for i in bwd_seen)
    # backward-only: one epoch's worth of batches sees every backward row exactly once
    with PairSampler(full_store, 12, seed=2, window_chunks=3, **kw) as sp:
        rows = torch.cat([next(sp).index for _ in range(96 // 12)])
        assert sorted(rows.tolist()) == list(range(96))
        # the data matches a direct read
        b = next(sp)
        ref = full_store.read(b.index)
        assert torch.equal(b.noise, ref.noise) and torch.equal(b.sample, ref.sample)
        assert torch.equal(b.label, ref.label) and torch.equal(b.direction, ref.direction)
    # forward-only with a batch size that does not divide the section: still one epoch covers all
    with PairSampler(full_store, 7, forward_ratio=1.0, seed=3, **kw) as sp:
        rows = torch.cat([next(sp).index for _ in range(math.ceil(64 / 7))])
        assert set(rows.tolist()) == set(range(96, 160))
        assert sorted(rows[:64].tolist()) == list(range(96, 160))  # positions [0, 64): each row exactly once


def test_sampler_deterministic(full_store):
    def take(seed, n=15):
        with PairSampler(full_store, 9, forward_ratio=0.5, seed=seed, window_chunks=2, prefetch=False) as sp:
            return [next(sp).index for _ in range(n)]
    a, b, c = take(5), take(5), take(6)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("ratio,batch", [(0.25, 10), (0.0, 12), (1.0, 7)])
def test_memory_and_stream_are_bit_identical(full_store, ratio, batch):
    # backward epoch 96 rows, forward 64: 40 steps cross several epoch boundaries of both streams
    with PairSampler(full_store, batch, forward_ratio=ratio, seed=11, window_chunks=2) as mem, \
            PairSampler(full_store, batch, forward_ratio=ratio, seed=11, window_chunks=2, ram_budget_bytes=0) as st:
        assert mem.mode == "memory" and st.mode == "stream"
        for step in range(40):
            a, b = mem.batch(step), st.batch(step)
            assert_batches_equal(a, b)
            assert torch.equal(a.index, mem.rows_for_step(step)) and len(a) == batch
            n_fwd = round(ratio * batch)
            assert int((a.direction == 1).sum()) == n_fwd
            assert torch.equal(a.direction, (a.index >= 96).long())
        assert st.epoch_at(39) >= 1 and mem.epoch_at(39) == st.epoch_at(39)
        ref = full_store.read(a.index)
        assert torch.equal(a.noise, ref.noise) and torch.equal(a.sample, ref.sample)


def test_memory_and_stream_bit_identical_bfloat16_ragged(ragged_store):
    with PairSampler(ragged_store, 13, seed=3, window_chunks=2) as mem, \
            PairSampler(ragged_store, 13, seed=3, window_chunks=2, ram_budget_bytes=0) as st, \
            PairSampler(ragged_store, 13, seed=3, window_chunks=2, ram_budget_bytes=0, prefetch=False) as nopf:
        assert (mem.mode, st.mode, nopf.mode) == ("memory", "stream", "stream")
        rows = []
        for step in range(30):  # 390 positions: 4+ epochs of 90 rows
            a = mem.batch(step)
            assert_batches_equal(a, st.batch(step))
            assert_batches_equal(a, nopf.batch(step))
            rows.append(a.index)
        rows = torch.cat(rows)
        for e in range(4):
            assert sorted(rows[e * 90:(e + 1) * 90].tolist()) == list(range(90))
        assert not torch.equal(rows[:90], rows[90:180])  # each epoch its own order


@pytest.mark.parametrize("mode", MODES)
def test_batch_is_independent_of_call_order(full_store, mode):
    kw = dict(forward_ratio=0.25, seed=4, window_chunks=2, **MODES[mode])
    with PairSampler(full_store, 12, **kw) as seq:
        ref = [seq.batch(s) for s in range(12)]
    with PairSampler(full_store, 12, **kw) as sp:
        for s in (7, 3, 7, 11, 0, 3):
            assert_batches_equal(sp.batch(s), ref[s])
    # iterating is batch(0), batch(1), ...
    with PairSampler(full_store, 12, **kw) as it:
        for s in range(12):
            assert_batches_equal(next(it), ref[s])


@pytest.mark.parametrize("mode", MODES)
def test_resumed_sampler_equals_uninterrupted(full_store, mode):
    kw = dict(forward_ratio=0.25, seed=9, window_chunks=3, **MODES[mode])
    with PairSampler(full_store, 16, **kw) as run:
        through = [run.batch(s) for s in range(25)]
    for s in (1, 6, 13, 24):  # a fresh process resuming at step s
        with PairSampler(full_store, 16, **kw) as resumed:
            assert_batches_equal(resumed.batch(s), through[s])
            if s + 1 < len(through):
                assert_batches_equal(resumed.batch(s + 1), through[s + 1])


@pytest.mark.parametrize("ratio,batch,n_rows,lo", [(0.0, 1, 96, 0), (0.0, 7, 96, 0), (1.0, 5, 64, 96)])
def test_each_epoch_of_positions_covers_every_row_once(full_store, ratio, batch, n_rows, lo):
    with PairSampler(full_store, batch, forward_ratio=ratio, seed=21, window_chunks=2, prefetch=False) as sp:
        steps = math.ceil(3 * n_rows / batch)
        stream = torch.cat([sp.rows_for_step(s) for s in range(steps)])
        epochs = [stream[e * n_rows:(e + 1) * n_rows] for e in range(3)]
        for ep in epochs:
            assert sorted(ep.tolist()) == list(range(lo, lo + n_rows))
        assert not torch.equal(epochs[0], epochs[1]) and not torch.equal(epochs[1], epochs[2])


def test_rows_for_step_cost_does_not_grow_with_the_step(full_store):
    import time

    with PairSampler(full_store, 12, forward_ratio=0.25, seed=2, prefetch=False) as sp:
        t0 = time.perf_counter()
        sp.rows_for_step(3)
        small = time.perf_counter() - t0
        far = 10 ** 12  # ~10^11 epochs in: located by arithmetic, not by walking the stream
        t0 = time.perf_counter()
        rows = sp.rows_for_step(far)
        assert time.perf_counter() - t0 < max(0.5, 50 * small)
        assert len(rows) == 12 and (rows[:9] < 96).all() and (rows[9:] >= 96).all()
        assert torch.equal(sp.batch(far).index, rows)
        # a whole epoch of positions that far in still covers each backward row once
        assert sp.n_bwd == 9
        first = 32 * 10 ** 10  # 9 * first is a multiple of 96: a backward epoch starts with this step
        got = torch.cat([sp.rows_for_step(s)[:9] for s in range(first, first + 11)])[:96]
        assert sorted(got.tolist()) == list(range(96))


def test_sampler_needs_forward_pairs_for_forward_ratio(tmp_path):
    cfg = cfg_for(n_forward=0, n_pairs=32)
    s = make_store(str(tmp_path / "pairs.zarr"), cfg)
    simulate_all(s, cfg)
    with pytest.raises(ValueError, match="no forward"):
        PairSampler(s, 8, forward_ratio=0.5)


def test_package_imports_no_training_or_pipeline_code():
    import subprocess
    import sys

    code = ("import sys, reflow_core.pairs as p; "
            "bad = [m for m in sys.modules if m.startswith(('flows', 'reflow_core.train', 'reflow_core.distributed', "
            "'reflow_core.stages'))]; "
            "assert not bad, bad; "
            "assert all(hasattr(p, n) for n in p.__all__)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_shard_dataclass_api():
    sh = Shard(index=2, start=10, stop=15, direction=1)
    assert sh.rows == 5 and shard_plan(3, 0, 5) == [Shard(0, 0, 3, 0)]
