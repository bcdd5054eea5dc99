"""deployments/prefect.yaml against a real Prefect server and a real process worker.

Starts `prefect server start` (SQLite under tmp_path), creates the `reflow-process` work pool, deploys every
deployment of deployments/prefect.yaml, starts a worker, runs `reflow/toy2d` with tiny sizes and waits for the
flow run to complete; then checks the MLflow store the flow run logged to.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

from flows import tracking

REPO = Path(__file__).resolve().parent.parent
PREFECT = str(Path(sys.executable).parent / "prefect")
TINY = {
    "data.n_train": 2000, "net.hidden": 64, "net.depth": 2,
    "teacher.train.steps": 100, "teacher.train.batch_size": 128, "teacher.train.ckpt_every": 50,
    "teacher.train.log_every": 20,
    "pairs.n_pairs": 1000, "pairs.shard_size": 500, "pairs.chunk_size": 250, "pairs.batch_size": 250,
    "pairs.nfe": 9, "pairs.workers": 2,
    "reflow.train.steps": 100, "reflow.train.batch_size": 128, "reflow.train.ckpt_every": 50,
    "reflow.train.log_every": 20,
    "eval.n_samples": 256, "eval.nfes": [1, 2], "eval.straightness_steps": 8,
}
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def _prefect(args: list[str], env: dict, cwd: Path, timeout: float = 240) -> str:
    out = subprocess.run([PREFECT, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"prefect {' '.join(args)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}"
    return out.stdout + out.stderr


def _stop(proc: subprocess.Popen | None) -> None:
    """Terminate a process group we started (server or worker, with their children)."""
    if proc is None or proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_deploy_and_run_toy2d_on_a_process_worker(tmp_path):
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "REFLOW_"))}
    env.update({
        "PREFECT_HOME": str(tmp_path / "prefect_home"),
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{tmp_path / 'prefect.db'}",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "INFO",
        "PYTHONUNBUFFERED": "1",
    })
    server_log, worker_log = tmp_path / "server.log", tmp_path / "worker.log"
    server = worker = None
    try:
        with open(server_log, "w") as log:
            server = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                      env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, f"prefect server exited:\n{_tail(server_log)}"
            try:
                if _get_json(f"{api}/health") is True:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"prefect server not healthy after 180 s:\n{_tail(server_log)}"
            time.sleep(1)

        env["PREFECT_API_URL"] = api
        _prefect(["work-pool", "create", "reflow-process", "--type", "process"], env, REPO)
        # REFLOW_REPO is deliberately unset here: the pull step's {{ $REFLOW_REPO }} is resolved by the worker
        out = _prefect(["--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml"], env, REPO)
        deployments = _get_json_post(f"{api}/deployments/filter", {})
        names = {d["name"] for d in deployments}
        assert {"toy2d", "digits", "cifar10"} <= names, out
        toy = next(d for d in deployments if d["name"] == "toy2d")
        assert toy["entrypoint"] == "flows/reflow.py:reflow" and toy["parameters"]["preset"] == "toy2d"
        assert toy["pull_steps"][0]["prefect.deployments.steps.set_working_directory"]["directory"] == \
            "{{ $REFLOW_REPO }}"

        mlflow_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        worker_env = {**env, "REFLOW_REPO": str(REPO), "MLFLOW_TRACKING_URI": mlflow_uri,
                      "PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_WORKER_PREFETCH_SECONDS": "5"}
        with open(worker_log, "w") as log:
            worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", "reflow-process"], env=worker_env,
                                      cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

        root = tmp_path / "runs"
        params = {"root": str(root), "run": "deployed", "overrides": TINY}
        out = _prefect(["deployment", "run", "reflow/toy2d", "--params", json.dumps(params)], env, REPO)
        match = re.search(r"UUID:\s*([0-9a-f-]{36})", out)
        assert match, out
        flow_run_id = match.group(1)

        deadline = time.monotonic() + 420
        state = None
        while time.monotonic() < deadline:
            assert worker.poll() is None, f"worker exited:\n{_tail(worker_log)}"
            state = _get_json(f"{api}/flow_runs/{flow_run_id}")["state"]["type"]
            if state in TERMINAL:
                break
            time.sleep(3)
        assert state == "COMPLETED", f"flow run {flow_run_id} ended {state}:\n{_tail(worker_log, 8000)}"

        # artifacts under the root the deployment run was given, MLflow runs in the worker's tracking store
        run_dir = root / "deployed"
        assert (run_dir / "eval" / "metrics.json").exists()
        stored = json.loads((run_dir / tracking.RUN_FILE).read_text())
        assert stored["tracking_uri"] == mlflow_uri
        client = MlflowClient(tracking_uri=mlflow_uri)
        exp = client.get_experiment_by_name("reflow")
        runs = client.search_runs([exp.experiment_id])
        parents = [r for r in runs if tracking.PARENT_TAG not in r.data.tags]
        children = [r for r in runs if tracking.PARENT_TAG in r.data.tags]
        assert [p.info.run_id for p in parents] == [stored["run_id"]]
        assert sorted(c.info.run_name for c in children) == ["evaluate", "pairs", "reflow", "teacher"]
        assert all(r.info.status == "FINISHED" for r in runs)
        assert parents[0].data.params["pairs.n_pairs"] == "1000"
    finally:
        _stop(worker)
        _stop(server)


def _get_json_post(url: str, body: dict):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"},
                                 method="POST")
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())
