"""The queued tracker (flows/tracking_queue.py) and its executors (flows/tracking_process.py), checked against what a
plain `mlflow.MlflowClient` reads back from a real sqlite store: the runs, their tags, params, metric histories and
artifacts; a failed call raised at the tracker's next wait; a tracking process that dies is an error; a flow process
SIGKILLed with calls still in the pipe loses none of them.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import mlflow
import pytest

from flows.tracking import PARENT_TAG, STAGE_TAG
from flows.tracking_process import REF, ProcessExecutor, ThreadExecutor, TrackingProcessError
from flows.tracking_queue import QueuedTracker

ROOT = Path(__file__).resolve().parents[2]


def _tracker(kind: str, tmp_path: Path, params: dict | None = None) -> QueuedTracker:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    executor = ThreadExecutor() if kind == "thread" else ProcessExecutor()
    return QueuedTracker(executor, uri, "queued", str(tmp_path / "run"), params=params)


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_queued_calls_are_what_mlflow_reads_back(kind, tmp_path):
    tracker = _tracker(kind, tmp_path, params={"teacher": {"lr": 0.001}, "name": "q"})
    parent = tracker.parent_run_id()
    child = tracker.child_run_id("teacher")
    assert parent.startswith(REF) or len(parent) == 32  # a name at once, or the id if already opened
    cb = tracker.stage_callback("teacher")
    for step in range(5):
        cb.on_metrics("teacher", step, {"loss": 1.0 / (step + 1), "note": "not a number"})
    art = tmp_path / "plot.txt"
    art.write_text("a plot")
    cb.on_artifact("teacher", str(art))
    tracker.set_tags(parent, {"reflow.answer": 42})
    tracker.finish("teacher")
    tracker.finish(None)
    parent_id, child_id = tracker.resolve(parent), tracker.resolve(child)
    tracker.close()

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    p, c = client.get_run(parent_id), client.get_run(child_id)
    assert p.info.status == "FINISHED" and c.info.status == "FINISHED"
    assert p.data.tags["reflow.answer"] == "42"
    assert c.data.tags[PARENT_TAG] == parent_id and c.data.tags[STAGE_TAG] == "teacher"
    assert c.data.params["teacher.lr"] == "0.001" and c.data.params["name"] == "q"
    hist = sorted((m.step, m.value) for m in client.get_metric_history(child_id, "loss"))
    assert hist == [(s, pytest.approx(1.0 / (s + 1))) for s in range(5)]
    assert "note" not in c.data.metrics
    assert [a.path for a in client.list_artifacts(child_id)] == ["plot.txt"]
    # the run file names the parent, so a second tracker of the run dir (a resume) logs into the same run
    assert json.loads((tmp_path / "run" / "mlflow_run.json").read_text())["run_id"] == parent_id


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_a_failed_call_is_raised_at_the_next_wait(kind, tmp_path):
    tracker = _tracker(kind, tmp_path)
    child = tracker.child_run_id("teacher")
    tracker.log_artifact(child, str(tmp_path / "missing.png"))  # queued: returns at once
    with pytest.raises(Exception, match="missing.png"):
        tracker.flush()
    tracker.log_metrics(child, {"loss": 0.5})  # the tracker goes on after the error was raised
    tracker.close()
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.get_run(tracker.resolve(child)).data.metrics == {"loss": 0.5}


def test_a_tracking_process_that_dies_is_an_error(tmp_path):
    tracker = _tracker("process", tmp_path)
    tracker.resolve(tracker.parent_run_id())
    os.kill(tracker.executor.process.pid, signal.SIGKILL)
    tracker.executor.process.wait(timeout=30)
    with pytest.raises(TrackingProcessError, match="has gone"):
        for _ in range(100):  # the reader thread sees the pipe close; then every call raises
            tracker.log_metrics(tracker.parent_run_id(), {"x": 1.0})
            time.sleep(0.05)
    with pytest.raises(TrackingProcessError):
        tracker.flush()


def test_sigkilled_flow_process_loses_no_queued_call(tmp_path):
    """The flow process queues 300 metric rows and a tag on the tracking process, then SIGKILLs itself without
    flushing: the tracking process writes them all before it exits."""
    script = textwrap.dedent(f"""
        import os, signal, sys
        from flows.tracking_process import ProcessExecutor
        from flows.tracking_queue import QueuedTracker
        t = QueuedTracker(ProcessExecutor(), {f"sqlite:///{tmp_path / 'mlflow.db'}"!r}, "queued", {str(tmp_path / "run")!r})
        run = t.resolve(t.parent_run_id())
        print(t.executor.process.pid, run, flush=True)
        for step in range(300):
            t.log_metrics(run, {{"loss": float(step)}}, step=step)
        t.set_tags(run, {{"last": "written"}})
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    pid, run_id = proc.stdout.split()
    deadline = time.monotonic() + 90
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{pid}").exists(), "the tracking process did not exit after its flow process died"
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    hist = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "loss"))
    assert hist == [(s, float(s)) for s in range(300)]
    assert client.get_run(run_id).data.tags["last"] == "written"
