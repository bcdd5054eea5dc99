"""Golden outputs: tiny toy2d, toy2d-with-student and digits runs on CPU with one thread give bit-identical pair
stores, trained EMA weights and evaluation rows to the ones recorded in tests/e2e/golden.json.

A refactor that keeps the maths must keep these. The fingerprints are taken with plain zarr and torch.load, not with
our own readers. After an intended change of outputs, re-record with `python tests/e2e/test_golden.py --record` and say
why in the commit.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

GOLDEN = Path(__file__).with_name("golden.json")

_TRAIN = {"batch_size": 64, "warmup": 5, "ckpt_every": 20, "log_every": 10}
CASES = {
    "toy2d": ("toy2d", {
        "data.n_train": 1000, "net.hidden": 32, "net.depth": 2,
        "teacher.train": {**_TRAIN, "steps": 40}, "reflow.train": {**_TRAIN, "steps": 30, "seed": 1},
        "pairs": {"n_pairs": 600, "shard_size": 250, "chunk_size": 125, "batch_size": 250, "nfe": 5,
                  "solver": "heun", "grid": "uniform"},
        "eval": {"n_samples": 200, "nfes": [1, 2], "straightness_steps": 4}}),
    "toy2d_distill": ("toy2d_distill", {
        "data.n_train": 1000, "net.hidden": 32, "net.depth": 2,
        "teacher.train": {**_TRAIN, "steps": 40}, "reflow.train": {**_TRAIN, "steps": 20, "seed": 1},
        "distill.train": {**_TRAIN, "steps": 20, "seed": 2},
        "pairs": {"n_pairs": 500, "shard_size": 250, "chunk_size": 125, "batch_size": 250, "nfe": 3,
                  "solver": "euler", "grid": "uniform"},
        "eval": {"n_samples": 200, "nfes": [1, 2], "straightness_steps": 4}}),
    "digits": ("digits", {
        "teacher.train": {**_TRAIN, "steps": 30, "batch_size": 32}, "reflow.train": {**_TRAIN, "steps": 20,
                                                                                     "batch_size": 32, "seed": 1},
        "pairs": {"n_pairs": 300, "shard_size": 150, "chunk_size": 75, "batch_size": 150, "nfe": 3,
                  "solver": "heun", "grid": "uniform"},
        "eval": {"n_samples": 100, "nfes": [1, 2], "straightness_steps": 4}}),
}
# wall-clock fields of an evaluation row: everything else must match exactly
TIMING = {"seconds"}


def _sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def store_fingerprint(url: str) -> dict:
    """sha256 of every array of a pair store, read with plain zarr."""
    g = zarr.open_group(url, mode="r")
    return {name: _sha(np.asarray(g[name][...])) for name in sorted(g.array_keys())}


def ema_fingerprint(ckpt_dir: Path) -> str:
    """sha256 over the EMA tensors of a stage's latest checkpoint, in key order."""
    latest = json.loads((ckpt_dir / "latest.json").read_text())
    state = torch.load(ckpt_dir / latest["file"], map_location="cpu", weights_only=True)
    h = hashlib.sha256()
    for k in sorted(state["ema"]):
        v = state["ema"][k]
        h.update(k.encode())
        if torch.is_tensor(v):
            h.update(v.detach().contiguous().numpy().tobytes())
        else:
            h.update(repr(v).encode())
    return h.hexdigest()


def fingerprint(tmp: Path, case: str) -> dict:
    from reflow_core.preset import load_preset
    from reflow_core.stages import run_local

    preset, overrides = CASES[case]
    torch.set_num_threads(1)
    run_local(load_preset(preset, overrides), str(tmp), case)
    run = tmp / case
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    rows = [{k: v for k, v in r.items() if k not in TIMING} for r in metrics["rows"]]
    trained = sorted(p.name for p in run.iterdir() if (p / "latest.json").exists())
    stores = sorted(p.name for p in run.iterdir() if p.name.endswith(".zarr"))
    return {"stores": {s: store_fingerprint(str(run / s)) for s in stores},
            "ema": {d: ema_fingerprint(run / d) for d in trained},
            "rows": rows}


@pytest.mark.parametrize("case", sorted(CASES))
def test_outputs_bit_identical(tmp_path, case):
    golden = json.loads(GOLDEN.read_text())[case]
    got = json.loads(json.dumps(fingerprint(tmp_path, case)))  # floats through JSON, as recorded
    assert got["stores"] == golden["stores"]
    assert got["ema"] == golden["ema"]
    assert got["rows"] == golden["rows"]


if __name__ == "__main__" and sys.argv[1:] == ["--record"]:
    import tempfile

    out = {}
    for name in sorted(CASES):
        with tempfile.TemporaryDirectory() as d:
            out[name] = fingerprint(Path(d), name)
    GOLDEN.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    print(f"recorded {GOLDEN}")
