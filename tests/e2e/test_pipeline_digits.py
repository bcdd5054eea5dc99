"""The same pipeline end to end on images: class-conditional U-Net on scikit-learn's digits (CPU, ~1-2 minutes)."""
import pytest
import torch

from reflow_core.preset import load_preset
from reflow_core.pairs import PairStore
from reflow_core.stages import RunDir, run_local, sample_model

TINY = {
    "teacher.train": {"steps": 300, "batch_size": 64, "lr": 0.001, "warmup": 50, "ckpt_every": 300, "log_every": 100},
    "reflow.train": {"steps": 200, "batch_size": 64, "lr": 0.0005, "warmup": 20, "ckpt_every": 200, "log_every": 100},
    "pairs": {"n_pairs": 1000, "shard_size": 500, "chunk_size": 250, "batch_size": 500, "solver": "heun", "nfe": 7},
    "eval": {"nfes": [1, 2], "n_samples": 200, "straightness_steps": 8},
}


@pytest.mark.slow
def test_digits_pipeline_end_to_end(tmp_path):
    cfg = load_preset("digits", TINY)
    rows = run_local(cfg, str(tmp_path), "digits")
    rundir = RunDir.of(str(tmp_path), "digits")
    by = {(r["model"], r["nfe"]): r for r in rows}
    assert set(by) == {(m, n) for m in ("teacher", "reflow") for n in (1, 2)}
    for r in rows:
        assert r["fd_digits"] > 0 and torch.isfinite(torch.tensor(r["fd_digits"]))
    # reflow straightens the teacher's paths even after 200 steps
    assert by[("reflow", 1)]["straightness"] < by[("teacher", 1)]["straightness"]
    store = PairStore.open(rundir.url("pairs.zarr"))
    batch = store.read(slice(0, 1000))
    assert batch.noise.shape == (1000, 1, 8, 8)
    assert ((batch.label >= 0) & (batch.label < 10)).all()  # class-conditional pairs keep their labels
    for name in ("grid_teacher_euler_1.png", "grid_reflow_euler_2.png", "fd_digits_vs_nfe.png"):
        assert open(f"{rundir.url('eval')}/{name}", "rb").read(4) == b"\x89PNG"
    x = sample_model(rundir, "reflow", nfe=1, solver="euler", n=16, seed=0, label=3)
    assert x.shape == (16, 1, 8, 8) and x.min() >= -1 and x.max() <= 1
