"""The ReFlow effect end to end on toy2d (CPU, ~1 minute): straighter paths and far better 1-NFE samples."""
import json

import pytest
import torch

from reflow_core import solvers
from reflow_core.config import ConfigError
from reflow_core.preset import load_preset
from reflow_core.pairs import PairStore
from reflow_core.stages import RunDir, load_model, prepare_run, run_local, sample_model

SMALL = {
    "teacher.train": {"steps": 1500, "batch_size": 256, "lr": 0.002, "warmup": 100, "ckpt_every": 500,
                      "log_every": 100},
    "reflow.train": {"steps": 1500, "batch_size": 256, "lr": 0.001, "warmup": 100, "ckpt_every": 500,
                     "log_every": 100, "seed": 1},
    "net.hidden": 128, "net.depth": 3,
    "pairs": {"n_pairs": 8000, "shard_size": 2000, "chunk_size": 500, "batch_size": 2000, "solver": "heun",
              "nfe": 31, "grid": "uniform"},
    "eval.n_samples": 1000,
}


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("runs"))
    cfg = load_preset("toy2d", SMALL)
    rows = run_local(cfg, root, "toy")
    return cfg, RunDir.of(root, "toy"), rows


def _row(rows, model, nfe):
    return next(r for r in rows if r["model"] == model and r["nfe"] == nfe and r["solver"] == "euler")


def test_reflow_beats_teacher_at_one_nfe(toy_run):
    _, rundir, rows = toy_run
    t1, r1 = _row(rows, "teacher", 1), _row(rows, "reflow", 1)
    assert r1["sliced_w2"] <= 0.5 * t1["sliced_w2"], (t1, r1)
    assert r1["straightness"] <= t1["straightness"] / 3, (t1, r1)
    stored = json.loads(open(rundir.url("eval", "metrics.json")).read())
    assert stored["rows"] == rows and stored["metric"] == "sliced_w2"
    assert {(r["model"], r["nfe"]) for r in rows} >= {(m, n) for m in ("teacher", "reflow") for n in (1, 2, 4, 8)}
    for png in ("trajectories.png", "sliced_w2_vs_nfe.png", "samples_1nfe.png"):
        assert open(f"{rundir.url('eval')}/{png}", "rb").read(4) == b"\x89PNG"


def test_stored_pairs_are_the_teachers_trajectories(toy_run):
    """A pair is (noise, sample) at the same index: integrating stored noise with the teacher gives the sample."""
    cfg, rundir, _ = toy_run
    store = PairStore.open(rundir.url("pairs.zarr"))
    assert store.is_complete() and store.n == 8000
    batch = store.read(torch.tensor([0, 1, 2, 1999, 2000, 7999]))
    teacher = load_model(f"{rundir.url('teacher')}/ckpt-0001500.pt")
    grid = cfg.pairs.grid.solver_args(cfg.pairs.nfe)  # pairs.grid is a tagged union (uniform | rho)
    again = solvers.sample(teacher.solver_velocity(), batch.noise, cfg.pairs.nfe, cfg.pairs.solver, grid["grid"],
                           grid["rho"])
    assert torch.allclose(again, batch.sample, atol=1e-4)
    assert store.attrs["convention"] == "t0=data,t1=noise"


def test_rerun_skips_every_stage(toy_run):
    cfg, rundir, rows = toy_run
    stamps = {p: p.stat().st_mtime_ns for p in __import__("pathlib").Path(rundir.dir).rglob("*") if p.is_file()}
    assert run_local(cfg, rundir.root, rundir.run) == rows
    after = {p: p.stat().st_mtime_ns for p in stamps}
    changed = [str(p) for p in stamps if stamps[p] != after[p] and p.name != "config.json"]
    assert changed == []


def test_changed_identity_under_same_run_is_refused(toy_run):
    cfg, rundir, _ = toy_run
    other = load_preset("toy2d", SMALL | {"pairs.nfe": 15})
    with pytest.raises(ConfigError, match="pairs.nfe: 31 -> 15"):
        prepare_run(other, rundir.root, rundir.run)
    fresh = prepare_run(other, rundir.root, rundir.run, new=True)
    assert fresh.run == "toy-2"


def test_sample_command_writes_data_space_samples(toy_run):
    _, rundir, rows = toy_run
    x = sample_model(rundir, "reflow", nfe=1, solver="euler", n=1000, seed=2024)
    assert x.shape == (1000, 2)
    # same seed as the evaluation's noise: the same samples as the evaluated ones
    y = sample_model(rundir, "reflow", nfe=1, solver="euler", n=1000, seed=2024)
    assert torch.equal(x, y)
