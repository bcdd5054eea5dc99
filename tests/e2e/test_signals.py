"""SIGTERM and Ctrl-C are a clean stop: `reflow run` (the Prefect flow with its temporary API server) whose process
group gets SIGTERM (infrastructure stopping a pod or a spot VM) or SIGINT (Ctrl-C in a terminal) mid-stage exits
within 30 s, non-zero, with the flow run's final state recorded in the Prefect API and the run directory's lease
released; running the same command again resumes from the checkpoint and finishes."""
from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
from helpers import REPO
from mlflow import MlflowClient

from flows.api_server import TemporaryServer
from reflow_core import checkpoint

pytestmark = pytest.mark.slow

# toy2d_tiny with a teacher long enough to be stopped mid-stage (checkpoints every 50 of 1500 steps)
SETTINGS = ["--set", "teacher.train.steps=1500", "--set", "teacher.train.ckpt_every=50"]


def _reflow_run(root: str, env: dict) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "flows.cli", "run", "--preset", "toy2d_tiny", "--root", root, "--run", "r",
           *SETTINGS]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own process group, as a pod's or a terminal's


def _flow_run_states(env: dict) -> list[str]:
    """The final states the Prefect API holds for flow runs, read through a server on the same database."""
    old = os.environ.copy()
    os.environ.update(env)
    try:
        server = TemporaryServer()
        server.start()
        try:
            url = server.wait(60.0)
            req = urllib.request.Request(f"{url}/flow_runs/filter", data=b"{}", method="POST",
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=30) as r:
                return [fr["state"]["type"] for fr in json.load(r)]
        finally:
            server.stop()
    finally:
        os.environ.clear()
        os.environ.update(old)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_the_group_is_a_clean_stop_and_the_rerun_resumes(tmp_path, sig):
    root = str(tmp_path / "runs")
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PYTHONPATH": str(REPO),
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("PREFECT_API_URL", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = _reflow_run(root, env)
    t0 = time.monotonic()
    while not glob.glob(f"{root}/r/teacher/ckpt-*.pt"):
        assert proc.poll() is None and time.monotonic() - t0 < 300, proc.stdout.read()
        time.sleep(0.1)
    os.killpg(proc.pid, sig)
    stopped = time.monotonic()
    try:
        out, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"still running 30 s after {sig.name}: {proc.communicate()[0][-3000:]}")
    assert proc.returncode != 0, out[-3000:]
    assert time.monotonic() - stopped < 30
    assert "Connection refused" not in out, out[-3000:]  # the flow reached its API until the end
    assert not os.path.exists(f"{root}/r/run.lock"), "the run directory's lease was not released"
    assert _flow_run_states(env) in (["CRASHED"], ["CANCELLED"])

    killed_at = checkpoint.latest_info(f"{root}/r/teacher").step  # the teacher checkpoint the stop left

    again = _reflow_run(root, env)
    out, _ = again.communicate(timeout=600)
    assert again.returncode == 0, out[-3000:]
    assert os.path.exists(f"{root}/r/eval/metrics.json")
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    teacher_runs = client.search_runs(client.get_experiment_by_name("reflow").experiment_id,
                                      "tags.`reflow.stage` = 'teacher'")
    resumed = [m.value for r in teacher_runs for m in client.get_metric_history(r.info.run_id, "resumed_from_step")]
    assert 0 < killed_at < 1500 and killed_at in resumed, (killed_at, resumed)  # fewer steps than the total
    states = _flow_run_states(env)
    assert len(states) == 2 and "COMPLETED" in states, states
