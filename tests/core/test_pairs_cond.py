"""Conditional pair stores (super-resolution, data.sr): the condition through the store, its identity and hash, the
per-row seeding, the sampler and the reflow stage of `digits_sr_reflow_tiny` (CPU, one thread)."""
from __future__ import annotations

import math
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from reflow_core import solvers, stages
from reflow_core.config import ConfigError, PairsConfig, SRConfig
from reflow_core.pairs import (COND, PairSampler, PairStore, PairStoreCorrupt, PairStoreInvalid, PairStoreMismatch,
                               backward_rows, cond_attrs, condition, data_rows, forward_indices, measurement_noise,
                               ram_bytes, row_noise, simulate_shard, store_for_config, verify_pairs)
from reflow_core.preset import load_preset
from reflow_core.sr import degrade, lift, source
from reflow_core.stages.pairs import check_store

SHAPE = (1, 4, 4)
SR = SRConfig(scale=2, degradation="avgpool", sigma_p=0.3, sigma_y=0.05)
COND_ATTRS = cond_attrs(SR, SHAPE)


def cond_v(x, t, label, cond):
    """Elementwise affine field pulled towards the condition (only + and *): bitwise independent of the batch."""
    tt = t.reshape(-1, *([1] * (x.dim() - 1)))
    return x * (0.5 + 0.3 * tt) + 0.4 * (1.0 - tt) * cond


def cond_for(label, cond):
    return lambda x, t: cond_v(x, t, label, cond)


def cfg_for(**kw) -> PairsConfig:
    base = dict(n_pairs=64, n_forward=32, shard_size=32, chunk_size=16, batch_size=20, solver="heun", nfe=5,
                grid="uniform", dtype="float32", seed=5)
    return PairsConfig(**(base | kw))


def data(n=40, seed=3) -> torch.Tensor:
    return torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def make_store(url, cfg, cond=COND_ATTRS, teacher_hash="t"):
    return store_for_config(str(url), cfg, shape=SHAPE, teacher_hash=teacher_hash, cond=cond)


def simulate(store, cfg, order=None, workers=1):
    x = data()
    order = list(order if order is not None else range(len(store.plan)))
    run = lambda k: simulate_shard(store, k, cond_for, cfg=cfg, data_x=x)  # noqa: E731
    if workers == 1:
        for k in order:
            run(k)
    else:
        with ThreadPoolExecutor(workers) as ex:
            list(ex.map(run, order))
    return x


# --- the rows: pure functions of (seed, row) -------------------------------------------------------------------------
@pytest.mark.parametrize("degradation", ["avgpool", "bicubic"])
def test_conditional_rows_are_functions_of_seed_and_row(degradation):
    cond = cond_attrs(SR.model_copy(update={"degradation": degradation}), SHAPE)
    x = data()
    idx, src, c = backward_rows(cond, 7, range(0, 50), x)
    for lo, hi in ((0, 1), (3, 20), (20, 50)):
        i2, s2, c2 = backward_rows(cond, 7, range(lo, hi), x)
        assert torch.equal(i2, idx[lo:hi]) and torch.equal(s2, src[lo:hi]) and torch.equal(c2, c[lo:hi])
    rows = [41, 2, 17]
    assert torch.equal(backward_rows(cond, 7, rows, x)[1], src[rows])
    assert torch.equal(condition(cond, 7, range(10, 20), x[idx[10:20]]), c[10:20])
    # what each value is: the real row, c = A^T (A x + sigma_y n), x_src = sqrt(1 - sp^2) c + sp eps, eps = row_noise
    assert torch.equal(idx, data_rows(7, range(50), len(x))) and idx.min() >= 0 and idx.max() < len(x)
    assert len(set(idx.tolist())) > 25 and not torch.equal(idx, data_rows(8, range(50), len(x)))
    n = measurement_noise(7, range(50), (1, 2, 2))
    want_c = lift(degrade(x[idx], 2, degradation) + SR.sigma_y * n, 2, degradation)
    assert torch.equal(c, want_c)
    assert torch.equal(src, source(c, row_noise(7, range(50), SHAPE), SR.sigma_p))
    assert not torch.equal(n, row_noise(7, range(50), (1, 2, 2)))  # a stream of its own
    assert abs(float(measurement_noise(1, range(4000), (1,)).std()) - 1.0) < 0.05


# --- the store -------------------------------------------------------------------------------------------------------
def test_conditional_store_round_trip_through_plain_zarr(tmp_path):
    cfg = cfg_for()
    url = tmp_path / "pairs.zarr"
    s = make_store(url, cfg)
    x = simulate(s, cfg)
    assert s.is_complete() and s.cond_shape == SHAPE and s.array_names[-1] == COND
    g = zarr.open_group(str(url), mode="r")  # plain zarr: what any reader sees
    assert sorted(g.array_keys()) == ["cond", "direction", "label", "noise", "sample"]
    assert g["cond"].shape == (96, *SHAPE) and str(g["cond"].dtype) == "float32" and g["cond"].chunks == (16, *SHAPE)
    assert dict(g.attrs)["cond"] == COND_ATTRS == {"kind": "sr", "shape": [1, 4, 4], "scale": 2,
                                                   "degradation": "avgpool", "sigma_p": 0.3, "sigma_y": 0.05}
    cond, noise, sample = (torch.from_numpy(np.asarray(g[k][...])) for k in ("cond", "noise", "sample"))
    direction, label = np.asarray(g["direction"][...]), np.asarray(g["label"][...])
    assert (direction[:64] == 0).all() and (direction[64:] == 1).all() and (label == -1).all()
    # backward rows: the stored source and condition are the rows' own; the sample is the ODE endpoint under c
    _, src, c = backward_rows(COND_ATTRS, cfg.seed, range(64), x)
    assert torch.equal(cond[:64], c) and torch.equal(noise[:64], src)
    out = solvers.sample(cond_for(None, c), src, cfg.nfe, cfg.solver, "uniform")
    assert torch.equal(out, sample[:64])
    # forward rows: real rows (as an unconditional store picks them), their condition, inverted under it
    real = x[forward_indices(cfg.seed, range(32), len(x))]
    assert torch.equal(sample[64:], real)
    assert torch.equal(cond[64:], condition(COND_ATTRS, cfg.seed, range(64, 96), real))
    assert torch.equal(noise[64:], solvers.invert(cond_for(None, cond[64:]), real, cfg.nfe, cfg.solver, "uniform"))
    # PairStore reads it back, by slice and by index
    b = PairStore.open(str(url)).read(torch.tensor([70, 3, 3]))
    assert torch.equal(b.cond, cond[[70, 3, 3]]) and torch.equal(b.noise, noise[[70, 3, 3]])
    assert set(s.marker(0)["sha256"]) == {"noise", "sample", "label", "direction", "cond", "all"}


def test_an_unconditional_store_is_laid_out_as_before(tmp_path):
    s = make_store(tmp_path / "plain.zarr", cfg_for(n_forward=0), cond=None)
    assert s.cond_shape is None and "cond" not in s.attrs
    assert sorted(zarr.open_group(str(tmp_path / "plain.zarr"), mode="r").array_keys()) == [
        "direction", "label", "noise", "sample"]
    s.write_shard(0, torch.zeros(32, *SHAPE), torch.ones(32, *SHAPE))
    assert set(s.marker(0)["sha256"]) == {"noise", "sample", "label", "direction", "all"}
    assert s.read(slice(0, 4)).cond is None and ram_bytes(s) == 64 * (2 * 16 * 4 + 16)
    assert ram_bytes(make_store(tmp_path / "c.zarr", cfg_for(n_forward=0))) == 64 * (3 * 16 * 4 + 16)


@pytest.mark.parametrize("dtype,layout", [("float32", {}), ("bfloat16", {"zarr_shards": True, "compress": True})])
def test_values_do_not_depend_on_shard_size_workers_or_batch_size(tmp_path, dtype, layout):
    a_cfg = cfg_for(dtype=dtype, batch_size=7)
    b_cfg = cfg_for(dtype=dtype, batch_size=64, shard_size=16, **layout)  # (a layout choice: the same values)
    a, b = make_store(tmp_path / "a.zarr", a_cfg), make_store(tmp_path / "b.zarr", b_cfg)
    assert len(a.plan) == 3 and len(b.plan) == 6
    simulate(a, a_cfg)
    order = list(range(6))
    random.Random(0).shuffle(order)
    simulate(b, b_cfg, order=order, workers=2)  # two shards at a time, out of order
    ra, rb = a.read_raw(slice(0, 96)), b.read_raw(slice(0, 96))
    assert set(ra) == set(rb) == {"noise", "sample", "label", "direction", "cond"}
    for k in ra:
        assert ra[k].dtype == rb[k].dtype and np.array_equal(ra[k].view(np.uint8), rb[k].view(np.uint8)), k
    assert all(b.verify_shard(k) for k in range(6))
    # the sampler's batches carry the condition, the same from RAM and streamed, and as stored
    with PairSampler(a, 12, forward_ratio=0.25, seed=3, window_chunks=2) as mem, \
            PairSampler(a, 12, forward_ratio=0.25, seed=3, window_chunks=2, ram_budget_bytes=0) as st:
        assert (mem.mode, st.mode) == ("memory", "stream")
        for step in range(12):  # past an epoch of both sections
            m, t = mem.batch(step), st.batch(step)
            assert m.cond.shape == (12, *SHAPE) and torch.equal(m.cond, t.cond) and torch.equal(m.index, t.index)
            assert torch.equal(m.cond, a.read(m.index).cond) and torch.equal(m.noise, t.noise)


@pytest.mark.parametrize("array", ["cond", "noise"])
def test_a_changed_cond_byte_fails_verification_like_a_noise_byte(tmp_path, array):
    cfg = cfg_for()
    url = tmp_path / "pairs.zarr"
    s = make_store(url, cfg)
    simulate(s, cfg)
    chunks = sorted(p for p in (url / array / "c").glob("**/*") if p.is_file())
    assert len(chunks) == 6
    victim = chunks[3]  # chunk 3 of 16 rows: shard 1
    raw = bytearray(victim.read_bytes())
    raw[100] ^= 0x01
    victim.write_bytes(bytes(raw))
    store = PairStore.open(str(url))
    assert store.is_complete()  # the markers alone do not see it ...
    assert not store.verify_shard(1) and store.verify_shard(0) and store.verify_shard(2)
    bad = verify_pairs(store)  # ... the hash does
    assert len(bad) == 1 and bad[0].startswith("shard 1 ") and "chunks 2..3" in bad[0] and "sha256 differs" in bad[0]
    with pytest.raises(PairStoreCorrupt, match="(?s)shard 1 .*--redo-stage pairs"):
        check_store(str(url), "pairs", verify=True)


def test_a_store_never_mixes_conditional_and_unconditional_rows(tmp_path):
    cfg = cfg_for(n_forward=0)
    plain, cond = tmp_path / "plain.zarr", tmp_path / "cond.zarr"
    make_store(plain, cfg, cond=None)
    make_store(cond, cfg)
    with pytest.raises(PairStoreMismatch, match="differs in cond: existing=None.*never mix"):
        make_store(plain, cfg)
    with pytest.raises(PairStoreMismatch, match="differs in cond: existing=.*requested=None"):
        make_store(cond, cfg, cond=None)
    other = cond_attrs(SR.model_copy(update={"sigma_p": 0.5}), SHAPE)
    with pytest.raises(PairStoreMismatch, match="cond"):  # another condition is another store too
        make_store(cond, cfg, cond=other)
    assert make_store(cond, cfg).cond_shape == SHAPE  # the same one reopens
    s, p = PairStore.open(str(cond)), PairStore.open(str(plain))
    with pytest.raises(ValueError, match="conditional: rows need their condition"):
        s.write_shard(0, torch.zeros(32, *SHAPE), torch.zeros(32, *SHAPE))
    with pytest.raises(ValueError, match="unconditional but the rows have a condition"):
        p.write_shard(0, torch.zeros(32, *SHAPE), torch.zeros(32, *SHAPE), cond=torch.zeros(32, *SHAPE))
    with pytest.raises(ValueError, match="cond must have shape"):
        s.write_shard(0, torch.zeros(32, *SHAPE), torch.zeros(32, *SHAPE), cond=torch.zeros(32, 1, 2, 2))
    with pytest.raises(ValueError, match="conditional pairs: pass data_x"):
        simulate_shard(s, 0, cond_for, cfg=cfg)
    # a marker without the cond digest (written for an unconditional layout) is not trusted
    s.write_shard(0, torch.zeros(32, *SHAPE), torch.zeros(32, *SHAPE), cond=torch.zeros(32, *SHAPE))
    assert s.done_shards() == {0}
    m = s.marker(0)
    del m["sha256"]["cond"]
    s.mark_done(s.plan[0], m["sha256"])
    assert s.done_shards() == set()


def test_a_conditional_store_with_torn_metadata_is_invalid(tmp_path):
    with pytest.raises(ValueError, match="kind"):  # checked before anything is written
        make_store(tmp_path / "bad.zarr", cfg_for(n_forward=0), cond={**COND_ATTRS, "kind": "inpaint"})
    assert not PairStore.exists(str(tmp_path / "bad.zarr"))
    url = tmp_path / "pairs.zarr"
    make_store(url, cfg_for(n_forward=0))
    g = zarr.open_group(str(url), mode="r+")
    g.attrs["cond"] = {**COND_ATTRS, "kind": "inpaint"}
    with pytest.raises(PairStoreInvalid, match="attributes"):
        PairStore.open(str(url))
    g.attrs["cond"] = COND_ATTRS
    del g["cond"]
    with pytest.raises(PairStoreInvalid, match="array 'cond' is missing"):
        PairStore.open(str(url))


# --- the pipeline ----------------------------------------------------------------------------------------------------
def test_sr_configs_with_reflow_rounds():
    cfg = load_preset("digits_sr_reflow_tiny")
    assert cfg.reflow.rounds == 1 and cfg.distill.method == "oftsr" and cfg.data.sr is not None
    names = [s.name for s in stages.plan(cfg, stages.RunDir("/r", "x"))]
    assert names == ["teacher", "pairs", "reflow", "distill", "evaluate"]
    assert stages.find(stages.plan(cfg, stages.RunDir("/r", "x")), "distill").inputs == {"teacher": "reflow",
                                                                                          "init": "reflow"}
    two = load_preset("digits_sr_reflow_tiny", {"reflow.rounds": 2, "distill": None})
    assert [s.name for s in stages.plan(two, stages.RunDir("/r", "x"))] == [
        "teacher", "pairs", "reflow", "pairs-2", "reflow-2", "evaluate"]
    with pytest.raises(ConfigError, match="distill.method='pairs' has no conditional student"):
        load_preset("digits_sr_reflow_tiny", {"distill.method": "pairs"})
    with pytest.raises(ConfigError, match="OFTSR's student needs data.sr"):
        load_preset("digits", {"distill": {"method": "oftsr"}})


@pytest.fixture(scope="module")
def sr_reflow(tmp_path_factory):
    torch.set_num_threads(1)
    root = str(tmp_path_factory.mktemp("srr"))
    cfg = load_preset("digits_sr_reflow_tiny")
    rows = stages.run_local(cfg, root, "srr")
    return cfg, stages.RunDir.of(root, "srr"), rows


def test_the_reflow_stage_trains_on_the_condition_and_evaluate_has_every_model(sr_reflow):
    from reflow_core import checkpoint
    from reflow_core.stages.base import dataset, load_model
    from reflow_core.stages.batches import pair_batches

    cfg, rundir, rows = sr_reflow
    store = PairStore.open(rundir.url("pairs.zarr"))
    assert store.attrs["cond"] == cond_attrs(cfg.data.sr, dataset(cfg).shape) and store.n == 96
    assert all(store.verify_shard(k) for k in range(len(store.plan)))
    state = checkpoint.load(checkpoint.latest(rundir.url("reflow")))
    assert state["step"] == cfg.reflow.train.steps and state["meta"]["sr"] == cfg.data.sr.model_dump(mode="json")
    teacher_ckpt = checkpoint.latest(rundir.url("teacher"))
    teacher, teacher_ema = load_model(teacher_ckpt), checkpoint.load(teacher_ckpt)["ema"]
    assert list(state["ema"]) == list(teacher_ema)
    assert not all(torch.equal(state["ema"][k], teacher_ema[k]) for k in teacher_ema)  # fine-tuned
    # the stored sample is the teacher's ODE endpoint from the stored source under the stored condition
    b = store.read(slice(0, 8))
    out = solvers.sample(teacher.solver_velocity(None, cond=b.cond), b.noise, cfg.pairs.nfe, "heun", "uniform")
    torch.testing.assert_close(out, b.sample, atol=1e-5, rtol=0)
    # the reflow batches carry it: Batch.cond is the stored condition of the batch's rows
    reflow = load_model(checkpoint.latest(rundir.url("reflow")))
    rc = cfg.reflow.train
    with pair_batches(store, reflow, rc, cfg.reflow.forward_ratio, 64) as (batches, mode):
        batch = batches(3)
        assert mode == "memory" and batch.cond is not None and batch.cond.shape == batch.x_data.shape
    with PairSampler(store, rc.batch_size, forward_ratio=cfg.reflow.forward_ratio, seed=rc.seed) as sp:
        ref = store.read(sp.rows_for_step(3))
    assert torch.equal(batch.cond, ref.cond) and torch.equal(batch.x_noise, ref.noise)
    assert torch.equal(batch.x_data, ref.sample) and batch.label is None
    # evaluate: teacher and reflow at every NFE, the OFTSR student (from the reflow model) at every knob
    got = {(r["model"], r["solver"], r["nfe"]) for r in rows}
    assert got == {(m, "euler", n) for m in ("teacher", "reflow") for n in cfg.eval.nfes} | {
        ("distilled", f"knob {k:g}", 1) for k in cfg.eval.knobs}
    assert all(math.isfinite(r["psnr"]) for r in rows)
    assert Path(rundir.url("eval", "metrics.json")).exists()


def test_a_conditional_model_refuses_an_unconditional_store(sr_reflow, tmp_path):
    from reflow_core import checkpoint
    from reflow_core.stages.base import load_model
    from reflow_core.stages.batches import pair_batches
    from reflow_core.velocity import build_velocity_model

    cfg, rundir, _ = sr_reflow
    plain = make_store(tmp_path / "pairs.zarr", cfg_for(n_forward=0), cond=None)
    model = load_model(checkpoint.latest(rundir.url("reflow")))
    with pytest.raises(PairStoreMismatch, match="unconditional .*model is conditioned on an image.*--redo-stage pairs"):
        with pair_batches(plain, model, cfg.reflow.train, 0.0, 64):
            pass
    unconditional = build_velocity_model(load_preset("digits").net, (1, 8, 8), num_classes=10)
    with pytest.raises(PairStoreMismatch, match="is conditional .*takes no condition"):
        with pair_batches(PairStore.open(rundir.url("pairs.zarr")), unconditional, cfg.reflow.train, 0.0, 64):
            pass
