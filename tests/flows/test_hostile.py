"""Hostile inputs on a shared root (docs/reliability.md, "Threat model"): stored metadata validated when read
(mlflow_run.json, pair-store attrs, shard markers, latest.json in the flow), presets over a deployment, and write
failures that end a stage clearly and leave the run resumable (a read-only local root, S3 access denied)."""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from flows import tracking, tracking_store
from reflow_core import checkpoint, storage
from reflow_core import stages as st
from flows.params import PRESET_DIR_ENV, allow_any_preset_path, deployment_preset
from reflow_core.config import ConfigError
from reflow_core.preset import load_preset, PRESET_DIR
from reflow_core.pairs import PairStore, PairStoreInvalid, PairStoreMismatch, verify_pairs
from helpers import tiny

TINY = tiny()


def _cfg(**more):
    return load_preset("toy2d", {**TINY, **more})


# --- mlflow_run.json ----------------------------------------------------------------------------------------------

def _tracker(tmp_path: Path) -> tracking.MlflowTracker:
    return tracking.MlflowTracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "hostile", str(tmp_path / "run"))


@pytest.mark.parametrize("content", [b'{"run_id": "ab', b"[1, 2]", b'{"run_id": "x\' or 1=1 --"}', b"{}",
                                     b'{"run_id": 7}'], ids=["torn", "not-an-object", "injected-id", "empty",
                                                             "wrong-type"])
def test_malformed_mlflow_run_json_names_the_file_and_the_fix(tmp_path, content):
    first = _tracker(tmp_path).parent_run_id()
    url = storage.join(str(tmp_path / "run"), tracking_store.RUN_FILE)
    assert _tracker(tmp_path).parent_run_id() == first  # a valid file is reused
    Path(url).write_bytes(content)
    with pytest.raises(tracking_store.TrackingFileError) as e:
        _tracker(tmp_path).parent_run_id()
    msg = str(e.value)
    assert url in msg and "delete it" in msg and "unaffected" in msg
    os.remove(url)  # the documented fix: a new parent run, recorded in a valid file
    again = _tracker(tmp_path).parent_run_id()
    assert again != first and tracking_store.read_run_file(url).run_id == again


# --- pair store attrs and shard markers ---------------------------------------------------------------------------

def _store(tmp_path: Path, name: str = "pairs.zarr") -> PairStore:
    s = PairStore.create(str(tmp_path / "run" / name), shape=(2,), n_backward=64, n_forward=0, chunk_size=16,
                         shard_size=32, dtype="float32", attrs={"teacher_hash": "t" * 64, "solver": "euler",
                                                                "nfe": 4, "grid": "uniform", "rho": 1.0, "seed": 0})
    for k in range(2):
        g = torch.Generator().manual_seed(k)
        s.write_shard(k, torch.randn(32, 2, generator=g), torch.randn(32, 2, generator=g))
    return s


def _edit_attrs(url: str, edit) -> None:
    meta = Path(url) / "zarr.json"
    doc = json.loads(meta.read_text())
    edit(doc["attributes"])
    meta.write_text(json.dumps(doc))


BAD_ATTRS = {
    "count-as-string": lambda a: a.update(n_backward="64"),
    "negative-dim": lambda a: a.update(shape=[-2]),
    "missing-chunk-size": lambda a: a.pop("chunk_size"),
    "unknown-dtype": lambda a: a.update(dtype="float64"),
    "shard-not-multiple": lambda a: a.update(shard_size=24),
    "rows-beyond-arrays": lambda a: a.update(n_backward=128),
    "billions-of-shards": lambda a: a.update(n_backward=2 ** 40, shard_size=1, chunk_size=1),
    "storage-dtype-mismatch": lambda a: a.update(storage_dtype="uint16"),
    "nfe-as-list": lambda a: a.update(nfe=[4]),
}


@pytest.mark.parametrize("name", list(BAD_ATTRS))
def test_malformed_pair_store_attrs_name_the_store_and_redo_stage(tmp_path, name):
    url = _store(tmp_path, "pairs-2.zarr").url
    _edit_attrs(url, BAD_ATTRS[name])
    with pytest.raises(PairStoreInvalid) as e:
        PairStore.open(url)
    assert isinstance(e.value, PairStoreMismatch) and isinstance(e.value, ValueError)
    assert url in str(e.value) and "--redo-stage pairs-2" in str(e.value)


def test_torn_zarr_json_names_the_store(tmp_path):
    url = _store(tmp_path).url
    meta = Path(url) / "zarr.json"
    meta.write_bytes(meta.read_bytes()[:40])
    with pytest.raises(PairStoreInvalid, match="--redo-stage pairs") as e:
        PairStore.open(url)
    assert url in str(e.value)


def test_torn_or_foreign_shard_marker_is_not_trusted(tmp_path):
    """The safe choice: an invalid marker counts as missing, so its shard is pending and simulated again (rows are
    seeded per row: same values), and writing the shard replaces the marker."""
    s = _store(tmp_path)
    assert s.done_shards() == {0, 1}
    m1 = Path(s._marker_path(1))
    good = m1.read_bytes()
    for bad in (good[: len(good) // 2], Path(s._marker_path(0)).read_bytes(), b'{"shard": 1}', b"\x00" * 10):
        m1.write_bytes(bad)  # torn, another shard's marker copied over, incomplete, garbage
        again = PairStore.open(s.url)
        assert again.done_shards() == {0} and again.pending_shards() == [1] and not again.is_complete()
        assert again.marker(1) is None and not again.verify_shard(1)
        assert verify_pairs(again) == [next(line for line in verify_pairs(again))]
        assert "no valid done marker" in verify_pairs(again)[0]
    g = torch.Generator().manual_seed(1)
    again.write_shard(1, torch.randn(32, 2, generator=g), torch.randn(32, 2, generator=g))  # the redo
    assert PairStore.open(s.url).is_complete() and m1.read_bytes() != good[: len(good) // 2]
    assert verify_pairs(PairStore.open(s.url)) == []


# --- presets over a deployment ------------------------------------------------------------------------------------

def test_deployment_presets_are_names_or_files_under_the_preset_dir(tmp_path):
    allowed = tmp_path / "presets"
    (allowed / "team").mkdir(parents=True)
    shutil.copy(PRESET_DIR / "toy2d.yaml", allowed / "team" / "mine.yaml")
    outside = tmp_path / "outside.yaml"
    shutil.copy(PRESET_DIR / "toy2d.yaml", outside)
    (allowed / "link.yaml").symlink_to(outside)
    (allowed / "notes.txt").write_text("x")
    env = {PRESET_DIR_ENV: str(allowed)}

    assert deployment_preset("toy2d", {}) == "toy2d"  # a shipped name needs no directory
    assert deployment_preset("team/mine.yaml", env) == str((allowed / "team" / "mine.yaml").resolve())
    assert deployment_preset(str(allowed / "team" / "mine.yaml"), env) == str((allowed / "team/mine.yaml").resolve())
    refused = {
        "outside-no-dir": (str(outside), {}),
        "outside": (str(outside), env),
        "dotdot": ("team/../../outside.yaml", env),
        "symlink-out": ("link.yaml", env),
        "etc": ("/etc/passwd", env),
        "not-yaml": ("notes.txt", env),
        "unknown-name": ("toy3d", {}),
        "empty": ("", env),
    }
    for what, (preset, e) in refused.items():
        with pytest.raises(ConfigError, match=f"refused.*{PRESET_DIR_ENV}") as err:
            deployment_preset(preset, e)
        assert "reflow run --preset PATH" in str(err.value), what
    with allow_any_preset_path():  # the CLI's own caller
        assert deployment_preset(str(outside), {}) == str(outside)
    with pytest.raises(ConfigError):
        deployment_preset(str(outside), {})  # the allowance ends with the block


# --- write failures: checkpoints -----------------------------------------------------------------------------------

def test_checkpoint_write_failure_is_a_checkpoint_error_and_nothing_is_marked_done(tmp_path, monkeypatch):
    ckpt_dir = str(tmp_path / "teacher")
    checkpoint.save(ckpt_dir, {"step": 10, "w": torch.ones(3)})
    real_fsync = os.fsync

    def full(fd):  # ENOSPC from the file system, inside the real atomic write (temp file already written)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.save(ckpt_dir, {"step": 20, "w": torch.zeros(3)})
    msg = str(e.value)
    assert ckpt_dir in msg and "No space left" in msg and "not marked done" in msg and "rerun" in msg
    assert checkpoint.latest_info(ckpt_dir).step == 10  # the pointer still names the previous checkpoint
    assert sorted(os.listdir(ckpt_dir)) == ["ckpt-0000010.pt", "latest.json"]  # no temp file, nothing half-written
    with pytest.raises(checkpoint.CheckpointError, match="guide.pt.*sidecar"):
        checkpoint.save_file(str(tmp_path / "teacher" / "guide.pt"), {"step": 5})
    monkeypatch.setattr(os, "fsync", real_fsync)
    checkpoint.save(ckpt_dir, {"step": 20, "w": torch.zeros(3)})
    assert torch.equal(checkpoint.load_latest(ckpt_dir)["w"], torch.zeros(3))


def _immutable(path: Path, on: bool) -> bool:
    """chattr -R [+-]i: as root chmod does not stop writes, the immutable attribute does (needs CAP_LINUX_IMMUTABLE
    and a file system that has it)."""
    if shutil.which("chattr") is None:
        return False
    return subprocess.run(["chattr", "-R", "+i" if on else "-i", str(path)], capture_output=True).returncode == 0


def test_read_only_local_root_fails_clearly_then_resumes(tmp_path):
    root, cfg = tmp_path / "root", _cfg()
    st.run_local(cfg, str(root), "r", stages=["teacher"])
    if not _immutable(root, True):
        pytest.skip("chattr +i is not available here (no CAP_LINUX_IMMUTABLE or file system without it)")
    try:
        with pytest.raises(OSError) as e:  # the first write of a run: its lease (run.lock), before config.json
            st.run_local(cfg, str(root), "r")
        assert isinstance(e.value, storage.StorageWriteError)
        assert str(root / "r" / "run.lock") in str(e.value) and "writable" in str(e.value)
        # the root writable again, but the reflow stage's directory not: its first checkpoint cannot be written
        _immutable(root, False)
        (root / "r" / "reflow").mkdir()
        _immutable(root / "r" / "reflow", True)
        with pytest.raises(checkpoint.CheckpointError) as e2:
            st.run_local(cfg, str(root), "r")
        msg = str(e2.value)
        assert str(root / "r" / "reflow") in msg and "not marked done" in msg and "rerun" in msg
        assert os.listdir(root / "r" / "reflow") == []  # nothing half-written
        assert PairStore.open(str(root / "r" / "pairs.zarr")).is_complete()  # the stage before it is kept
    finally:
        _immutable(root, False)
    rows = st.run_local(cfg, str(root), "r")  # writable again: resumes (the teacher is kept) and finishes
    assert rows and checkpoint.latest_info(str(root / "r" / "reflow")).step == 30
    assert checkpoint.latest_info(str(root / "r" / "teacher")).step == 40


# --- write failures: S3 access denied (moto server enforces a bucket policy's Deny) -------------------------------

@pytest.mark.s3
def test_s3_access_denied_fails_clearly_then_resumes(moto_s3):
    import s3fs

    client, bucket = moto_s3["client"], "reflow-hostile"
    client.create_bucket(Bucket=bucket)
    deny = {"Version": "2012-10-17", "Statement": [{
        "Effect": "Deny", "Principal": "*", "Action": "s3:PutObject",
        "Resource": f"arn:aws:s3:::{bucket}/root/r/teacher/*"}]}
    client.put_bucket_policy(Bucket=bucket, Policy=json.dumps(deny))
    cfg, root = _cfg(), f"s3://{bucket}/root"
    with pytest.raises(checkpoint.CheckpointError) as e:
        st.run_local(cfg, root, "r", stages=["teacher"])
    msg = str(e.value)
    assert f"{root}/r/teacher" in msg and "not marked done" in msg and "policy" in msg
    assert "Traceback" not in msg and len(msg) < 1500
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert "root/r/config.json" in keys and not [k for k in keys if "/teacher/" in k]
    client.delete_bucket_policy(Bucket=bucket)  # the policy lifted: the run resumes and finishes the stage
    s3fs.S3FileSystem.clear_instance_cache()
    st.run_local(cfg, root, "r", stages=["teacher"])
    assert checkpoint.latest_info(f"{root}/r/teacher").step == 40


# --- the Prefect flow: presets, a torn latest.json, a torn mlflow_run.json -----------------------------------------

@pytest.mark.slow
def test_flow_presets_and_stored_metadata(prefect_api, tmp_path, monkeypatch):
    from flows.cli import main
    from flows.reflow import reflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv(PRESET_DIR_ENV, raising=False)
    root = tmp_path / "root"
    outside = tmp_path / "mine.yaml"
    shutil.copy(PRESET_DIR / "toy2d.yaml", outside)

    # over the flow (a deployment): a path outside $REFLOW_PRESET_DIR is refused before any I/O
    with pytest.raises(ConfigError, match=f"refused.*{PRESET_DIR_ENV}"):
        reflow(preset=str(outside), overrides=TINY, root=str(root), run="r")
    monkeypatch.setenv(PRESET_DIR_ENV, str(tmp_path / "presets"))
    (tmp_path / "presets").mkdir()
    with pytest.raises(ConfigError, match="refused"):
        reflow(preset="../mine.yaml", overrides=TINY, root=str(root), run="r")
    assert not root.exists()

    # the CLI's flow path keeps accepting any path its caller can read
    for k, v in (("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", "true"), ("PREFECT_SERVER_ANALYTICS_ENABLED", "false"),
                 ("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")):
        monkeypatch.setenv(k, os.environ.get(k, v))  # main() setdefaults them: restored after the test
    sets = [a for k, v in TINY.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    assert main(["run", "--preset", str(outside), "--root", str(root), "--run", "r", "--stages", "teacher",
                 *sets]) == 0
    assert checkpoint.latest_info(str(root / "r" / "teacher")).step == 40

    # a torn mlflow_run.json: the file and the fix, before any stage runs
    run_file = root / "r" / tracking_store.RUN_FILE
    good = run_file.read_bytes()
    run_file.write_bytes(good[:10])
    with pytest.raises(tracking_store.TrackingFileError, match="delete it"):
        reflow(preset="toy2d", overrides=TINY, root=str(root), run="r", stages=["teacher"])
    run_file.write_bytes(good)

    # a torn latest.json on the flow path: the documented CheckpointError, not a JSONDecodeError
    latest = root / "r" / "teacher" / "latest.json"
    latest.write_bytes(latest.read_bytes()[:15])
    with pytest.raises(checkpoint.CheckpointError) as e:
        reflow(preset="toy2d", overrides=TINY, root=str(root), run="r", stages=["teacher"])
    assert str(latest) in str(e.value) and "--redo-stage" in str(e.value)
