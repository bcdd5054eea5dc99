"""Super-resolution (OFTSR) through the whole pipeline on the `digits_sr_tiny` preset: teacher -> distill -> evaluate
with `reflow run --local`, what metrics.json holds and which split it was computed on; a conditional run killed with
SIGKILL mid-distill and rerun equals an uninterrupted one bit for bit; a condition that does not match the run is
refused before any work; the Prefect flow gives the same rows as --local.

All runs share one root, so the digit classifier behind fd_digits (<root>/_cache) is trained once.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import assert_same, wait_for_line

from reflow_core import checkpoint, stages, storage
from reflow_core.config import ConfigError
from reflow_core.data import DIGITS_TRAIN, load_heldout
from reflow_core.metrics.sr import sr_row
from reflow_core.preset import load_preset
from reflow_core.sr import degrade
from reflow_core.stages import evaluate_sr
from reflow_core.velocity import generate

REPO = Path(__file__).resolve().parents[2]
PRESET = "digits_sr_tiny"
# longer training than the preset's, so a kill lands inside the distill stage (one checkpoint every 10 steps)
LONGER = {"teacher.train.steps": 30, "distill.train.steps": 60, "distill.train.ckpt_every": 10}


def _strip(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def _sha(tensors: dict) -> str:
    """sha256 over a state dict's tensors, in key order (as tests/e2e/test_golden.py's ema_fingerprint)."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].detach().contiguous().numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("sr"))


@pytest.fixture(scope="module")
def tiny(root):
    """The digits_sr_tiny pipeline, --local: (config, run directory, the rows run_local returned)."""
    cfg = load_preset(PRESET)
    t0 = time.perf_counter()
    rows = stages.run_local(cfg, root, "tiny")
    print(f"digits_sr_tiny --local: {time.perf_counter() - t0:.1f}s")
    return cfg, stages.RunDir.of(root, "tiny"), rows


# --- (a) end to end, --local -----------------------------------------------------------------------------------------

def test_metrics_rows_plots_and_checkpoints(tiny):
    cfg, rundir, rows = tiny
    m = storage.read_json(rundir.url("eval", "metrics.json"))
    assert _strip(m["rows"]) == _strip(rows)
    assert m["models"] == ["teacher", "distilled"] and m["metric"] == "fd_digits"
    teacher = [r for r in rows if r["model"] == "teacher"]
    student = [r for r in rows if r["model"] == "distilled"]
    assert len(teacher) + len(student) == len(rows)
    assert [(r["nfe"], r["solver"]) for r in teacher] == [(n, "euler") for n in cfg.eval.nfes] == [(1, "euler"),
                                                                                                  (2, "euler")]
    assert all("knob" not in r for r in teacher)
    assert [(r["knob"], r["solver"], r["nfe"]) for r in student] == [(k, f"knob {k:g}", 1) for k in cfg.eval.knobs]
    assert [r["solver"] for r in student] == ["knob 0.01", "knob 0.99"]
    assert len({tuple(r[k] for k in ("model", "solver", "nfe")) for r in rows}) == len(rows)  # the row key
    for r in rows:
        for k in ("psnr", "psnr_of_mean", "consistency", "fd_digits", "straightness"):
            assert isinstance(r[k], float) and math.isfinite(r[k]), (r["model"], r["solver"], k)
        assert r["psnr"] > 5.0 and r["consistency"] >= 0.0 and r["fd_digits"] > 0.0 and r["draws"] == 2.0
        assert "lpips" not in r  # eval.lpips is off
    for name in ("fidelity_realism.png", "sr_grid.png"):
        p = Path(rundir.url("eval", name))
        assert p.exists() and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert m["checkpoints"].keys() == {"teacher", "distilled"}
    for stage, steps in (("teacher", cfg.teacher.train.steps), ("distill", cfg.distill.train.steps)):
        state = checkpoint.load_latest(rundir.url(stage))
        assert state["step"] == steps and state["meta"]["sr"] == cfg.data.sr.model_dump(mode="json")
    assert not Path(rundir.url("pairs.zarr")).exists()  # OFTSR reads no pair store


def test_the_held_out_split_is_what_was_evaluated(tiny):
    """The evaluation inputs are the held-out digits (scikit-learn rows 1500..), and the rows recompute from them."""
    cfg, rundir, rows = tiny
    x, y, c, src = evaluate_sr.inputs_for(cfg)
    test = load_heldout(cfg.data)
    n = cfg.eval.n_samples // cfg.eval.draws
    assert x.shape == (n, 1, 8, 8) and src.shape == (cfg.eval.draws, n, 1, 8, 8)
    assert torch.equal(x, test.x[:n])
    from sklearn.datasets import load_digits
    images = torch.as_tensor(load_digits().images, dtype=torch.float32) / 8.0 - 1.0
    assert torch.equal(x[:, 0], images[DIGITS_TRAIN:DIGITS_TRAIN + n])  # sklearn rows 1500.., never trained on
    assert torch.equal(y, degrade(x, 2)) and torch.equal(c, torch.repeat_interleave(
        torch.repeat_interleave(y, 2, dim=-1), 2, dim=-2))  # sigma_y = 0: c = A^T A x
    by_key = {(r["model"], r["solver"], r["nfe"]): r for r in rows}

    def scores(truth, lows, outs):
        return sr_row(outs.reshape(src.shape), truth, lows, lambda z: degrade(z, 2), lpips_net=None)

    flat, cs = src.reshape(-1, 1, 8, 8), c.repeat(cfg.eval.draws, 1, 1, 1)
    student = stages.load_model(stages.model_checkpoint(rundir, "distilled"))
    teacher = stages.load_model(stages.model_checkpoint(rundir, "teacher"))
    outs = {("distilled", "knob 0.99", 1): evaluate_sr.knob_output(student, flat, cs, 0.99),
            ("teacher", "euler", 2): generate(teacher, flat, 2, "euler", cond=cs, device="cpu")}
    for key, out in outs.items():
        got = scores(x, y, out)
        for k in ("psnr", "psnr_of_mean", "consistency"):
            assert got[k] == by_key[key][k], (key, k)  # the same computation: exactly


# --- (b) kill -9 mid-distill, rerun: bit-identical to an uninterrupted run -------------------------------------------

WORKER = r"""
import json, sys, torch
torch.set_num_threads(1)
from reflow_core import stages
from reflow_core.callbacks import NullCallback
from reflow_core.preset import load_preset

class Say(NullCallback):
    def on_progress(self, stage, done, total):
        print("progress", stage, done, flush=True)

root, run, overrides = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
stages.run_local(load_preset("digits_sr_tiny", overrides), root, run, callback=Say())
print("finished", flush=True)
"""


def _spawn(*args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REFLOW_FAULT", "MLFLOW_TRACKING_URI"))}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", WORKER, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _files(d: str) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(Path(d).rglob("*")) if p.is_file()}


def test_kill9_mid_distill_then_rerun_equals_an_uninterrupted_run(root, tiny):
    cfg = load_preset(PRESET, LONGER)
    proc = _spawn(root, "killed", json.dumps(LONGER))
    try:
        wait_for_line(proc, "progress distill 12", exact=True, timeout=240)  # past the first distill checkpoint (step 10)
        time.sleep(random.Random(3).uniform(0.0, 0.4))
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        proc.stdout.close()
        proc.stderr.close()
    killed = stages.RunDir.of(root, "killed")
    step = checkpoint.load_latest(killed.url("distill"))["step"]  # a complete, hash-checked checkpoint
    assert 10 <= step < 60, step  # died inside the distill stage
    assert not Path(killed.url("eval", "metrics.json")).exists()
    teacher_files = _files(killed.url("teacher"))

    rows = stages.run_local(cfg, root, "killed")  # the rerun resumes distill from `step`
    clean_rows = stages.run_local(cfg, root, "clean")  # uninterrupted, same config
    assert _files(killed.url("teacher")) == teacher_files  # the finished teacher was not retrained
    clean = stages.RunDir.of(root, "clean")
    for stage in ("teacher", "distill"):
        a, b = (checkpoint.load_latest(r.url(stage)) for r in (clean, killed))
        assert a["step"] == b["step"] == (30 if stage == "teacher" else 60)
        assert _sha(a["ema"]) == _sha(b["ema"]), f"{stage}: EMA differs after the resume"
        assert_same(a["net"], b["net"], f"{stage}.net")
        assert_same(a["opt"], b["opt"], f"{stage}.opt")
    assert _strip(rows) == _strip(clean_rows) and len(rows) == 4
    files = [storage.read_json(r.url("eval", "metrics.json"))["rows"] for r in (clean, killed)]
    assert _strip(files[0]) == _strip(files[1])
    assert _strip(rows) != _strip(tiny[2])  # (the longer training changed the numbers: a real comparison)


# --- (c) a condition that does not match the run is refused before any work ----------------------------------------

@pytest.mark.parametrize("change,expect", [
    ({"data.sr.scale": 4}, "data.sr.scale: 2 -> 4"),
    ({"data.sr.degradation": "bicubic"}, "data.sr.degradation: 'avgpool' -> 'bicubic'"),
    ({"data.sr.sigma_p": 0.5}, "data.sr.sigma_p: 0.2 -> 0.5"),
])
def test_a_changed_condition_is_a_changed_identity(tiny, tmp_path, change, expect):
    _, rundir, _ = tiny
    copy = tmp_path / "runs"
    shutil.copytree(rundir.dir, copy / "tiny")
    before = _files(str(copy))
    other = load_preset(PRESET, change)
    for call in (lambda: stages.prepare_run(other, str(copy), "tiny"),
                 lambda: stages.run_local(other, str(copy), "tiny")):
        with pytest.raises(ConfigError) as exc:
            call()
        assert expect in str(exc.value) and "--new" in str(exc.value), str(exc.value)
    assert _files(str(copy)) == before  # nothing written, nothing trained
    # evaluation settings are no identity: more knobs reopen the same run
    assert stages.prepare_run(load_preset(PRESET, {"eval.knobs": [0.5]}), str(copy), "tiny").run == "tiny"


def test_a_condition_of_the_wrong_shape_is_refused_by_the_model(tiny):
    _, rundir, _ = tiny
    model = stages.load_model(stages.model_checkpoint(rundir, "teacher"))
    assert model.cond_channels == 1
    x, t = torch.randn(4, 1, 8, 8), torch.rand(4)
    with pytest.raises(ValueError, match=r"condition of shape \(4, 3, 8, 8\), expected \(4, 1, 8, 8\)"):
        model(x, t, None, torch.randn(4, 3, 8, 8))  # RGB condition for a one-channel run
    with pytest.raises(ValueError, match=r"condition of shape \(4, 1, 4, 4\), expected \(4, 1, 8, 8\)"):
        model(x, t, None, torch.randn(4, 1, 4, 4))  # y instead of c = A^T y
    with pytest.raises(ValueError, match="conditioned on an image"):
        model(x, t)
    with pytest.raises(ValueError, match="conditioned on an image"):
        generate(model, x, 2, "euler", device="cpu")  # an SR model never samples from N(0, I) alone
    assert model(x, t, None, torch.randn(4, 1, 8, 8)).shape == x.shape


# --- (d) the Prefect flow gives the --local rows ---------------------------------------------------------------------

@pytest.mark.slow
def test_prefect_flow_equals_local(tiny, tmp_path, prefect_api, monkeypatch):
    from flows import reflow as reflow_module

    for k in ("MLFLOW_TRACKING_URI", "REFLOW_FAULT_STAGE", "REFLOW_FAULT_AT_STEP"):
        monkeypatch.delenv(k, raising=False)
    _, local, local_rows = tiny
    flow_root = str(tmp_path / "flow")
    t0 = time.perf_counter()
    result = reflow_module.reflow(preset=PRESET, root=flow_root, run="tiny")
    print(f"digits_sr_tiny flow: {time.perf_counter() - t0:.1f}s")
    assert set(result["checkpoints"]) == {"teacher", "distill"}
    flow = stages.RunDir.of(flow_root, "tiny")
    for stage in ("teacher", "distill"):
        a, b = (checkpoint.load_latest(r.url(stage)) for r in (local, flow))
        assert a["step"] == b["step"] > 0
        assert _sha(a["ema"]) == _sha(b["ema"]), stage
    assert _strip(result["metrics"]) == _strip(local_rows)
    assert _strip(storage.read_json(result["metrics_json"])["rows"]) == _strip(local_rows)
    assert Path(flow.url("eval", "sr_grid.png")).exists()
