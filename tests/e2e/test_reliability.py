"""Nothing lost, nothing leaked: kill -9 of worker processes, corrupt artifacts, changed configs under a
run name, storage failures during pair writes, credentials. The fault matrix is in docs/reliability.md.

Worker processes are real subprocesses (`python -c` running reflow_core / flows.tracking code) killed with SIGKILL;
the checks afterwards run in this process against the same artifacts.
"""
from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
from fsspec.implementations.memory import MemoryFileSystem

from helpers import tiny, wait_for_line

from flows import cli
from reflow_core import checkpoint, pairs, stages, storage
from reflow_core.callbacks import NullCallback
from reflow_core.pairs import store as pair_store
from reflow_core.config import ConfigError, PairsConfig
from reflow_core.preset import load_preset
from reflow_core.pairs import PairStore, PairStoreMismatch, PairWriteError, simulate_shard, store_for_config
from reflow_core.checkpoint import CheckpointError
from reflow_core.train import NonFiniteLossError

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable

# tiny but real: every stage does work, each in a second or two on one thread
TINY = tiny({
    "pairs.n_pairs": 1000, "reflow.train.ckpt_every": 20, "reflow.train.steps": 40, "teacher.train.ckpt_every": 20,
    "teacher.train.steps": 60,
})


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REFLOW_FAULT", "MLFLOW_TRACKING_URI"))}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **extra)
    return env


def _spawn(code: str, *args: str, **env) -> subprocess.Popen:
    return subprocess.Popen([PY, "-c", code, *args], cwd=REPO, env=_env(**env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _kill9(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    proc.stdout.close()
    proc.stderr.close()


# =====================================================================================================================
# kill -9 during a checkpoint write

CKPT_WORKER = r"""
import os, sys, time, torch
torch.set_num_threads(1)
from reflow_core import checkpoint
d, hold = sys.argv[1], float(sys.argv[2])
if hold:  # widen the window between the temp file's write and its rename, and say when the worker is in it
    rename = os.replace
    def held_replace(src, dst):
        if ".tmp-" in src:
            print("renaming", flush=True)
            time.sleep(hold)
        rename(src, dst)
    os.replace = held_replace
latest = checkpoint.latest(d)
step = checkpoint.load(latest)["step"] if latest else 0
print("ready", step, flush=True)
while True:  # nothing but checkpoint writes: a kill at any moment lands inside checkpoint.save
    step += 1
    checkpoint.save(d, {"step": step, "w": torch.full((3_000_000,), float(step))})
"""


def _check_latest(d: str) -> int:
    url = checkpoint.latest(d)
    if url is None:
        return 0
    assert ".tmp-" not in url
    ptr = storage.read_json(f"{d}/latest.json")
    state = checkpoint.load(url)  # sha256-verified against latest.json
    assert state["step"] == ptr["step"] and url.endswith(ptr["file"])
    assert torch.equal(state["w"], torch.full((3_000_000,), float(state["step"])))  # complete, not torn
    return state["step"]


def test_kill9_during_checkpoint_writes(tmp_path):
    """SIGKILLs of a process writing 12 MB checkpoints in a loop: after every kill checkpoint.latest +
    checkpoint.load return a complete, hash-verified checkpoint, never a temp file; the next worker resumes.
    Even kills come at random moments. Odd kills come while the worker holds a finished temp file before its
    rename: on fast disks that window is too short for random kills to hit it reliably."""
    d = str(tmp_path / "ckpt")
    rng = random.Random(7)
    last = mid_write = 0
    for kill in range(8):
        held = kill % 2 == 1
        proc = _spawn(CKPT_WORKER, d, "0.5" if held else "0")
        ready = wait_for_line(proc, "ready")
        assert int(ready.split()[1]) == last  # resumed from the last good checkpoint
        if held:
            for _ in range(1 + rng.randrange(2)):  # the first or the second checkpoint write of this worker
                wait_for_line(proc, "renaming")
            time.sleep(0.1)
        else:
            time.sleep(rng.uniform(0.05, 0.6))
        _kill9(proc)
        left = list(Path(d).glob("*.tmp-*"))  # killed between the temp write and its rename
        assert left or not held
        mid_write += bool(left)
        step = _check_latest(d)
        assert step >= last
        last = step
    assert mid_write >= 4 and last > 0
    # a later (clean) save sweeps the temp files a killed writer left behind
    checkpoint.save(d, {"step": last + 1, "w": torch.full((3_000_000,), float(last + 1))})
    assert not list(Path(d).glob("*.tmp-*")) and _check_latest(d) == last + 1


# =====================================================================================================================
# kill -9 during a shard write

SHARD_CFG = dict(n_pairs=2000, shard_size=500, chunk_size=125, batch_size=125, solver="euler", nfe=12,
                 grid="uniform", seed=3)

SHARD_WORKER = r"""
import json, sys, time, torch
torch.set_num_threads(1)
from reflow_core.config import PairsConfig
from reflow_core.pairs import PairStore, simulate_shard, store_for_config
url, cfg = sys.argv[1], PairsConfig(**json.loads(sys.argv[2]))
store = store_for_config(url, cfg, shape=(2,), teacher_hash="teacher-a")
def v(x, t):
    time.sleep(0.003)  # a slow teacher (the values do not depend on it)
    return torch.tanh(x) * (1 + t[:, None])
for k in store.pending_shards():
    simulate_shard(store, k, lambda label: v, cfg=cfg, progress=lambda done, n, k=k: print("progress", k, done, n, flush=True))
print("finished", flush=True)
"""


def _velocity(x, t):
    return torch.tanh(x) * (1 + t[:, None])


def _velocity_for(label):  # simulate_shard's velocity_for (an unconditional teacher: label is None)
    return _velocity


def _store_files(url: str) -> dict[str, bytes]:
    """Chunk objects of every array (not zarr.json: it holds created_at; not the markers: they hold timings)."""
    root = Path(url)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and "/c/" in f"/{p.relative_to(root)}"}


def test_kill9_during_shard_write(tmp_path):
    cfg = PairsConfig(**SHARD_CFG)
    clean = str(tmp_path / "clean.zarr")
    ref = store_for_config(clean, cfg, shape=(2,), teacher_hash="teacher-a")
    for k in ref.pending_shards():
        simulate_shard(ref, k, _velocity_for, cfg=cfg)

    url = str(tmp_path / "pairs.zarr")
    proc = _spawn(SHARD_WORKER, url, json.dumps(SHARD_CFG))
    wait_for_line(proc, "progress 2 250 ")  # half of shard 2 integrated, its first chunks on their way to disk
    time.sleep(random.Random(11).uniform(0.0, 0.03))
    _kill9(proc)

    store = PairStore.open(url)
    assert store.done_shards() == {0, 1}
    kept = {k: store.marker(k) for k in (0, 1)}
    assert all(store.verify_shard(k) for k in (0, 1))
    for k in store.pending_shards():  # resume: only the missing shards are simulated
        simulate_shard(store, k, _velocity_for, cfg=cfg)
    assert store.is_complete()
    assert {k: store.marker(k) for k in (0, 1)} == kept  # finished shards untouched
    assert all(store.verify_shard(k) for k in range(len(store.plan)))
    a, b = _store_files(url), _store_files(clean)
    assert a.keys() == b.keys() and len(a) == 2 * 16  # noise, sample (label/direction chunks stay fill values)
    assert all(a[k] == b[k] for k in a), "resumed store differs from a clean one"
    for k in ("noise", "sample", "label", "direction"):
        assert store.read_raw(slice(None))[k].tobytes() == ref.read_raw(slice(None))[k].tobytes()


# =====================================================================================================================
# kill -9 during MLflow logging

TRACKED_WORKER = r"""
import json, sys, torch
torch.set_num_threads(1)
from flows.tracking import MlflowTracker
from flows.tracking_store import resolve_tracking_uri
from reflow_core import stages
from reflow_core.callbacks import NullCallback
from reflow_core.preset import load_preset
root, run, overrides, flush_every = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
cfg = load_preset("toy2d", overrides)
rundir = stages.prepare_run(cfg, root, run)
plan = stages.plan(cfg, rundir)
tracker = MlflowTracker(resolve_tracking_uri(None, root), "reflow", rundir.dir, run_name=rundir.run)
parent = tracker.parent_run_id()
tracker.log_params(parent, cfg.model_dump(mode="json"))
print("parent", parent, flush=True)

def stage(name, fn):  # as flows.tasks.run_stage: a finished stage is called with a silent callback
    done = name != "evaluate" and stages.stage_done(rundir, name)
    cb = tracker.stage_callback(name)
    cb.flush_every = flush_every  # 1: every metric is its own MLflow write, so a kill lands inside one
    out = fn(NullCallback() if done else cb)
    tracker.set_tags(cb.run_id, {"reflow.skipped": str(done).lower()})
    tracker.finish(name, "FINISHED")
    return out

def run(name, cb, **inputs):  # one stage instance of the plan, as flows.tasks.stage_task
    s = stages.find(plan, name)
    return stages.module(s).run(s, stages.Context(cfg, rundir, cb), inputs)

teacher = stage("teacher", lambda cb: run("teacher", cb))
pairs = stage("pairs", lambda cb: run("pairs", cb, model=teacher))
reflow = stage("reflow", lambda cb: run("reflow", cb, pairs=pairs, init=teacher))
stage("evaluate", lambda cb: run("evaluate", cb, teacher=teacher, reflow=reflow))
tracker.finish(None, "FINISHED")
print("finished", flush=True)
"""


@pytest.mark.slow
def test_kill9_during_mlflow_logging(tmp_path):
    """A tracked run (flows.tracking, MLflow on sqlite) SIGKILLed at a random moment while it logs a metric per
    step; the rerun completes and logs into the same parent run and the same child runs."""
    from mlflow import MlflowClient

    from flows import tracking, tracking_store

    root = str(tmp_path / "runs")
    overrides = json.dumps(TINY | {"teacher.train.steps": 150, "teacher.train.log_every": 1,
                                   "reflow.train.log_every": 1})
    proc = _spawn(TRACKED_WORKER, root, "killed", overrides, "1")
    parent = wait_for_line(proc, "parent").split()[1]
    time.sleep(random.Random(5).uniform(0.5, 1.5))  # inside the teacher's per-step metric logging
    _kill9(proc)
    assert storage.read_json(f"{root}/killed/{tracking_store.RUN_FILE}")["run_id"] == parent

    proc = _spawn(TRACKED_WORKER, root, "killed", overrides, "200")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert f"parent {parent}" in out and "finished" in out

    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("reflow").experiment_id], max_results=100)
    parents = [r for r in runs if tracking.PARENT_TAG not in r.data.tags]
    children = [r for r in runs if tracking.PARENT_TAG in r.data.tags]
    assert [p.info.run_id for p in parents] == [parent] and parents[0].info.status == "FINISHED"
    assert sorted(c.info.run_name for c in children) == ["evaluate", "pairs", "reflow", "teacher"]
    assert all(c.info.status == "FINISHED" and c.data.tags[tracking.PARENT_TAG] == parent for c in children)
    teacher = next(c for c in children if c.info.run_name == "teacher")
    steps = {m.step for m in client.get_metric_history(teacher.info.run_id, "loss")}
    assert 150 in steps and len(steps) > 20  # logged before the kill and after the resume, one run


# =====================================================================================================================
# corrupt or truncated artifacts; --redo-stage


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("runs"))
    cfg = load_preset("toy2d", TINY)
    rows = stages.run_local(cfg, root, "tiny")
    return cfg, stages.RunDir.of(root, "tiny"), rows


def _copy_run(tiny_run, tmp_path, name="copy"):
    import shutil
    cfg, rundir, rows = tiny_run
    shutil.copytree(rundir.dir, tmp_path / name)
    return cfg, stages.RunDir.of(str(tmp_path), name), rows


def test_truncated_checkpoint_names_file_and_way_out(tiny_run, tmp_path):
    cfg, rundir, _ = _copy_run(tiny_run, tmp_path)
    ckpt = Path(checkpoint.latest(rundir.url("reflow")).removeprefix("file://"))
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    with pytest.raises(CheckpointError) as exc:
        stages.run_local(cfg, rundir.root, rundir.run)
    msg = str(exc.value)
    assert ckpt.name in msg and "truncated or corrupt" in msg and "--redo-stage" in msg
    removed = stages.reset_stage(rundir, "reflow")
    assert removed == [rundir.url("reflow"), rundir.url("eval")]
    assert Path(rundir.url("teacher")).exists() and Path(rundir.url("pairs.zarr")).exists()
    rows = stages.run_local(cfg, rundir.root, rundir.run)
    assert {r["model"] for r in rows} == {"teacher", "reflow"}
    assert checkpoint.load(checkpoint.latest(rundir.url("reflow")))["step"] == cfg.reflow.train.steps


def _chunk_files(rundir) -> list[Path]:
    return sorted(p for p in Path(rundir.url("pairs.zarr")).glob("sample/c/**/*") if p.is_file())


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_pair_chunk_is_caught_before_training(tiny_run, tmp_path, damage):
    cfg, rundir, _ = _copy_run(tiny_run, tmp_path)
    stages.reset_stage(rundir, "reflow")
    chunks = _chunk_files(rundir)
    assert len(chunks) == 8
    victim = chunks[5]  # chunk 5 of 125 rows: shard 2
    data = bytearray(victim.read_bytes())
    if damage == "truncate":
        victim.write_bytes(bytes(data[: len(data) // 3]))
    else:
        data[100] ^= 0x01
        victim.write_bytes(bytes(data))
    store = PairStore.open(rundir.url("pairs.zarr"))
    assert store.is_complete()  # the markers alone do not see it ...
    if damage == "flip":
        assert not store.verify_shard(2) and store.verify_shard(1)
    with pytest.raises(pairs.PairStoreCorrupt) as exc:  # ... the reflow stage's hash check does
        stages.run_local(cfg, rundir.root, rundir.run)
    msg = str(exc.value)
    assert "shard 2 " in msg and "chunks 4..5" in msg and "--redo-stage pairs" in msg and rundir.url("pairs.zarr") in msg
    assert "shard 1 " not in msg
    assert checkpoint.latest(rundir.url("reflow")) is None  # no training on bad pairs

    # the way out, through the CLI: reflow run --local ... --redo-stage pairs
    sets = [f"{k}={json.dumps(v)}" for k, v in TINY.items()]
    argv = ["run", "--local", "--preset", "toy2d", "--root", rundir.root, "--run", rundir.run, "--redo-stage", "pairs"]
    assert cli.main(argv + sum((["--set", s] for s in sets), [])) == 0
    store = PairStore.open(rundir.url("pairs.zarr"))
    assert all(store.verify_shard(k) for k in range(len(store.plan)))
    assert victim.read_bytes() == (Path(tiny_run[1].url("pairs.zarr")) / victim.relative_to(rundir.url("pairs.zarr"))).read_bytes()


def test_truncated_config_json_is_a_config_error(tiny_run, tmp_path):
    cfg, rundir, _ = _copy_run(tiny_run, tmp_path)
    p = Path(rundir.config_json)
    p.write_text(p.read_text()[:40])
    for call in (lambda: stages.prepare_run(cfg, rundir.root, rundir.run), rundir.config,
                 lambda: cli._run_config(rundir.root, rundir.run)):
        with pytest.raises(ConfigError, match="config.json is not valid JSON") as exc:
            call()
        assert str(p) in str(exc.value) and "delete it" in str(exc.value)
    p.write_text(json.dumps({"pairs": {"nfe": "many"}}))
    with pytest.raises(ConfigError, match=r"pairs\.nfe"):
        rundir.config()


def test_redo_stage_cli_and_flow_parameter(tmp_path, capsys):
    args = cli.build_parser().parse_args(["run", "--redo-stage", "pairs", "--redo-stage", "evaluate"])
    assert args.redo_stage == ["pairs", "evaluate"]
    # stage names depend on the plan (pairs-2, reflow-2, ...): an unknown one is refused by the command, before any
    # work (no run directory is created)
    with pytest.raises(SystemExit) as exc:
        cli.main(["run", "--local", "--preset", "toy2d", "--root", str(tmp_path), "--run", "r",
                  "--redo-stage", "nope"])
    assert exc.value.code == 2 and "nope" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    from flows.reflow import reflow
    assert "redo_stages" in reflow.parameters.properties


def test_reset_stage(tmp_path):
    rundir = stages.RunDir.of(str(tmp_path), "r")
    for url in (rundir.url("teacher"), rundir.url("pairs.zarr"), rundir.url("reflow"), rundir.url("eval")):
        Path(url).mkdir(parents=True)
        (Path(url) / "x").write_text("x")
    Path(rundir.config_json).write_text("{}")
    assert stages.reset_stage(rundir, "evaluate") == [rundir.url("eval")]
    assert stages.reset_stage(rundir, "teacher") == [rundir.url("teacher"), rundir.url("pairs.zarr"), rundir.url("reflow")]
    assert [p.name for p in Path(rundir.dir).iterdir()] == ["config.json"]
    with pytest.raises(ValueError, match="unknown stage"):  # a ConfigError (a ValueError)
        stages.reset_stage(rundir, "nope")


# =====================================================================================================================
# a changed configuration under an existing run name


@pytest.mark.parametrize("change, expect", [
    ({"teacher.train.steps": 61}, "teacher.train.steps: 60 -> 61"),
    ({"pairs.nfe": 7}, "pairs.nfe: 5 -> 7"),
    ({"data.toy": "moons"}, "data.toy: '8gaussians' -> 'moons'"),
])
def test_changed_identity_refused_and_new_run(tmp_path, change, expect):
    root = str(tmp_path)
    stages.prepare_run(load_preset("toy2d", TINY), root, "r")
    other = load_preset("toy2d", TINY | change)
    with pytest.raises(ConfigError) as exc:
        stages.prepare_run(other, root, "r")
    assert expect in str(exc.value) and "--new" in str(exc.value)
    assert stages.prepare_run(other, root, "r", new=True).run == "r-2"
    assert stages.prepare_run(load_preset("toy2d", TINY | {"eval.n_samples": 300}), root, "r").run == "r"


def test_execution_settings_may_change_on_resume(tmp_path):
    """A failed run resumed elsewhere (other workers, a Dask cluster, compile on, a bigger pair batch) keeps its
    name and artifacts; config.json then records the new settings."""
    root = str(tmp_path)
    stages.prepare_run(load_preset("toy2d", TINY), root, "r")
    moved = load_preset("toy2d", TINY | {"pairs.workers": 4, "pairs.engine": "dask", "pairs.batch_size": 1000,
                                         "pairs.auto_batch": True, "pairs.compile": True,
                                         "reflow.train.compile": True, "teacher.train.log_every": 7})
    rundir = stages.prepare_run(moved, root, "r")
    assert rundir.run == "r"
    assert stages.read_run_config(rundir.config_json).pairs.workers == 4  # (pairs.engine is the flow's: params.py)


def _stage(cfg, rundir, name, **inputs) -> stages.StageOutput:
    """Run one stage instance of the run's plan with the given inputs (role -> earlier stage output)."""
    s = stages.find(stages.plan(cfg, rundir), name)
    return stages.module(s).run(s, stages.Context(cfg, rundir, NullCallback()), inputs)


def test_pairs_of_another_teacher_are_never_mixed_in(tmp_path):
    """teacher.checkpoint is part of the run's identity by path; if the file at that path is replaced by another
    teacher, the pair store (keyed by the teacher's sha256) refuses to be resumed or trained on."""
    small = TINY | {"teacher.train.steps": 20}
    teachers = []
    for seed in (0, 1):
        cfg = load_preset("toy2d", small | {"teacher.train.seed": seed})
        rundir = stages.prepare_run(cfg, str(tmp_path), f"t{seed}")
        teachers.append(_stage(cfg, rundir, "teacher").urls["model"])
    given = tmp_path / "teacher.pt"
    given.write_bytes(Path(teachers[0]).read_bytes())
    cfg = load_preset("toy2d", small | {"teacher.checkpoint": str(given)})
    rundir = stages.prepare_run(cfg, str(tmp_path), "student")
    teacher_out = _stage(cfg, rundir, "teacher")
    teacher = teacher_out.urls["model"]
    assert teacher == str(given)
    ctx, pairs_stage = stages.Context(cfg, rundir), stages.find(stages.plan(cfg, rundir), "pairs")
    pending = stages.pairs.pending(pairs_stage, ctx, {"model": teacher_out})
    stages.pairs.simulate(pairs_stage, ctx, {"model": teacher_out}, pending[0])  # one shard by teacher 0

    given.write_bytes(Path(teachers[1]).read_bytes())  # someone replaces the file
    with pytest.raises(PairStoreMismatch, match="teacher_hash") as exc:
        _stage(cfg, rundir, "pairs", model=teacher_out)
    assert "--redo-stage pairs" in str(exc.value)
    store = PairStore.open(rundir.url("pairs.zarr"))
    assert store.done_shards() == {0}  # nothing written by teacher 1
    given.write_bytes(Path(teachers[0]).read_bytes())  # a finished store of teacher 0 ...
    pairs_out = _stage(cfg, rundir, "pairs", model=teacher_out)
    given.write_bytes(Path(teachers[1]).read_bytes())
    with pytest.raises(RuntimeError, match="another model"):  # ... is not trained on with teacher 1 either
        _stage(cfg, rundir, "reflow", pairs=pairs_out, init=teacher_out)
    assert checkpoint.latest(rundir.url("reflow")) is None
    stages.reset_stage(rundir, "pairs")
    _stage(cfg, rundir, "pairs", model=teacher_out)
    assert PairStore.open(rundir.url("pairs.zarr")).attrs["teacher_hash"] == storage.sha256(given.read_bytes())


def test_nonfinite_data_stops_the_teacher_stage(tmp_path, monkeypatch):
    cfg = load_preset("toy2d", TINY | {"teacher.train.max_bad_steps": 3})
    rundir = stages.prepare_run(cfg, str(tmp_path), "nan")
    ds = stages.dataset(cfg)
    bad = dataclasses.replace(ds, x=torch.full_like(ds.x, math.nan))
    monkeypatch.setattr(stages.teacher, "dataset", lambda c: bad)  # the teacher stage's data
    with pytest.raises(NonFiniteLossError, match="max_bad_steps=3"):
        _stage(cfg, rundir, "teacher")
    assert checkpoint.latest(rundir.url("teacher")) is None  # nothing poisoned was saved


# =====================================================================================================================
# disk full / object store unavailable during pair writes


class FlakyFS(MemoryFileSystem):
    """An in-memory fsspec filesystem whose next `fail` writes of chunk objects or done markers raise ENOSPC
    (`only` narrows them to paths containing a substring)."""

    protocol = ("flaky",)
    fail = 0
    only = ""
    failures: list[str] = []

    def _check(self, path) -> None:
        path = str(path)
        if ("/c/" in path or "/done/" in path) and FlakyFS.only in path and FlakyFS.fail > 0:
            FlakyFS.fail -= 1
            FlakyFS.failures.append(path)
            raise OSError(errno.ENOSPC, "No space left on device (injected)", path)

    def pipe_file(self, path, value, *args, **kwargs):
        self._check(path)
        return super().pipe_file(path, value, *args, **kwargs)

    def _open(self, path, mode="rb", *args, **kwargs):
        if "w" in mode or "a" in mode:
            self._check(path)
        return super()._open(path, mode, *args, **kwargs)


@pytest.fixture()
def flaky(monkeypatch):
    fsspec.register_implementation("flaky", FlakyFS, clobber=True)
    monkeypatch.setattr(pair_store, "WRITE_BACKOFF_S", 0.001)
    FlakyFS.fail, FlakyFS.only, FlakyFS.failures = 0, "", []
    yield FlakyFS
    FlakyFS.fail, FlakyFS.only = 0, ""


def _clean_reference(tmp_path, cfg):
    ref = store_for_config(str(tmp_path / "clean.zarr"), cfg, shape=(2,), teacher_hash="t")
    for k in ref.pending_shards():
        simulate_shard(ref, k, _velocity_for, cfg=cfg)
    return ref.read_raw(slice(None))


def _same(store, ref_raw) -> bool:
    raw = store.read_raw(slice(None))
    return all(np.array_equal(raw[k], ref_raw[k]) for k in ref_raw)


def test_transient_write_failures_are_retried(tmp_path, flaky):
    cfg = PairsConfig(**SHARD_CFG)
    url = f"flaky://retry-{uuid.uuid4().hex[:8]}/pairs.zarr"
    store = store_for_config(url, cfg, shape=(2,), teacher_hash="t")
    flaky.fail = 3  # < WRITE_TRIES consecutive failures: absorbed by the backoff
    for k in store.pending_shards():
        simulate_shard(store, k, _velocity_for, cfg=cfg)
    flaky.only, flaky.fail = "/done/", 2
    store.unmark(3)
    simulate_shard(store, 3, _velocity_for, cfg=cfg)
    assert len(flaky.failures) == 5 and store.is_complete()
    assert all(store.verify_shard(k) for k in range(4)) and _same(store, _clean_reference(tmp_path, cfg))


def test_backoff_timing(monkeypatch):
    sleeps = []
    monkeypatch.setattr(pair_store.time, "sleep", sleeps.append)
    calls = []

    def broken():
        calls.append(1)
        raise OSError(errno.ENOSPC, "disk full")

    with pytest.raises(PairWriteError, match="s3://b/p.zarr"):
        pairs.with_retries(broken, "s3://b/p.zarr", "shard 7 array 'noise'")
    assert len(calls) == pair_store.WRITE_TRIES == 4 and sleeps == [0.5, 1.0, 2.0]

    class ClientError(Exception):  # botocore's, by name
        pass

    assert storage.is_transient(ClientError()) and storage.is_transient(ConnectionResetError())
    assert not storage.is_transient(ValueError()) and not storage.is_transient(FileNotFoundError())


@pytest.mark.parametrize("where", ["/c/", "/done/"])
def test_persistent_write_failure_is_clear_and_store_stays_consistent(tmp_path, flaky, where):
    cfg = PairsConfig(**SHARD_CFG)
    url = f"flaky://full-{uuid.uuid4().hex[:8]}/pairs.zarr"
    store = store_for_config(url, cfg, shape=(2,), teacher_hash="t")
    simulate_shard(store, 0, _velocity_for, cfg=cfg)
    flaky.only, flaky.fail = where, 10_000  # the disk stays full
    with pytest.raises(PairWriteError) as exc:
        simulate_shard(store, 1, _velocity_for, cfg=cfg)
    msg = str(exc.value)
    assert url in msg and "shard 1" in msg and "failed after 4 tries" in msg and "No space left" in msg
    assert store.done_shards() == {0} and store.marker(1) is None  # a failed shard is never marked done
    flaky.fail = 0  # space freed: the rerun redoes shard 1 and the rest
    for k in store.pending_shards():
        simulate_shard(store, k, _velocity_for, cfg=cfg)
    assert store.is_complete() and all(store.verify_shard(k) for k in range(4))
    assert _same(store, _clean_reference(tmp_path, cfg))


# =====================================================================================================================
# credentials never written anywhere

MARKERS = {"AWS_ACCESS_KEY_ID": "AKIAMARKERc0ffee42", "AWS_SECRET_ACCESS_KEY": "aws-secret-marker-9f3e2d1c",
           "MLFLOW_TRACKING_TOKEN": "mlflow-token-marker-7a6b5c4d",
           "MLFLOW_TRACKING_PASSWORD": "mlflow-password-marker-1e2f3a"}


@pytest.mark.slow
def test_credentials_never_written(tmp_path, prefect_servers):
    """The Prefect flow (`reflow run`, its temporary Prefect API server) with credentials in its environment: no
    marker in any file under the run root (artifacts, config.json, MLflow sqlite store and artifact dir), the Prefect
    home (its database: flow parameters, logs) or the captured output. The server is gone when the command ends."""
    root, home = tmp_path / "runs", tmp_path / "prefect-home"
    sets = sum((["--set", f"{k}={json.dumps(v)}"] for k, v in TINY.items()), [])
    proc = subprocess.run([PY, "-m", "flows.cli", "run", "--preset", "toy2d", "--root", str(root), "--run", "cred",
                           *sets], cwd=REPO, capture_output=True, text=True, timeout=400,
                          env=_env(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                                   PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="240", **MARKERS))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert prefect_servers(home) == []
    assert "Error logging to API" not in proc.stderr  # the last logs reached the server before it stopped
    assert (root / "cred" / "eval" / "metrics.json").exists() and (root / "mlflow.db").exists()
    assert list((root / "mlartifacts").rglob("metrics.json"))
    files = [p for d in (root, home) for p in d.rglob("*") if p.is_file()]
    assert len(files) > 20
    blobs = {str(p): p.read_bytes() for p in files}
    blobs["stdout"], blobs["stderr"] = proc.stdout.encode(), proc.stderr.encode()
    for name, value in MARKERS.items():
        leaks = [where for where, data in blobs.items() if value.encode() in data]
        assert not leaks, f"{name} written to {leaks}"
