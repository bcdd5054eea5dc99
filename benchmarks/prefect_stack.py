"""A real Prefect deployment stack on this machine, as a team runs it: `prefect server`, the `reflow-process` work
pool, every deployment of deployments/prefect.yaml (with their resume triggers), the team's root variable and a
process worker; MLflow in sqlite. Used by tests/e2e/test_deployment.py and benchmarks/worker_sharing.py.

    with prefect_stack(tmp) as stack:
        fr_id = run_deployment(stack, "toy2d", {"run": "a"})
        wait_state(stack, fr_id, TERMINAL)
"""
from __future__ import annotations

import contextlib
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
from typing import Callable, Iterator

REPO = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).parent / "prefect")
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def post_json(url: str, body: dict):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"},
                                 method="POST")
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def prefect(args: list[str], env: dict, cwd: Path, timeout: float = 240) -> str:
    out = subprocess.run([PREFECT, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"prefect {' '.join(args)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return out.stdout + out.stderr


def stop(proc: subprocess.Popen | None) -> None:
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


def tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


def wait_healthy(api: str, server: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    """Until `prefect server start`'s API at api answers /health; RuntimeError (with its log) if it exits or not."""
    deadline = time.monotonic() + timeout
    while True:
        if server.poll() is not None:
            raise RuntimeError(f"prefect server exited:\n{tail(log)}")
        try:
            if get_json(f"{api}/health") is True:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"prefect server not healthy after {timeout} s:\n{tail(log)}")
        time.sleep(1)


def start_worker(stack: dict, limit: int | None = None, reflow_worker: bool = False) -> subprocess.Popen:
    """A process worker on the pool (`prefect worker start`, or `reflow worker` which stops its flow runs cleanly
    when stopped), started in another directory than the root (the root comes from the variable, never the cwd);
    its output appended to the stack's worker log."""
    command = [str(Path(sys.executable).parent / "reflow"), "worker"] if reflow_worker else [PREFECT, "worker", "start"]
    args = command + ["--pool", "reflow-process"] + (["--limit", str(limit)] if limit else [])
    with open(stack["logs"]["worker"], "a") as log:
        return subprocess.Popen(args, env=stack["worker_env"], cwd=stack["tmp"], stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


@contextlib.contextmanager
def prefect_stack(tmp: Path, worker_limit: int | None = None, worker_env: dict | None = None) -> Iterator[dict]:
    """The stack under `tmp`: a dict with api, env (for prefect commands), root, mlflow_uri, worker (a Popen a test
    may replace), logs, deploy_output, worker_env and tmp. Everything started is stopped on exit."""
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "REFLOW_"))}
    env.update({
        "PREFECT_HOME": str(tmp / "prefect_home"),
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{tmp / 'prefect.db'}",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "INFO",
        "PYTHONUNBUFFERED": "1",
    })
    logs = {"server": tmp / "server.log", "worker": tmp / "worker.log"}
    server = None
    stack: dict = {}
    try:
        with open(logs["server"], "w") as log:
            server = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                      env=env, cwd=tmp, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_healthy(api, server, logs["server"])
        env["PREFECT_API_URL"] = api
        prefect(["work-pool", "create", "reflow-process", "--type", "process"], env, REPO)
        # REFLOW_REPO is deliberately unset here: the pull step's {{ $REFLOW_REPO }} is resolved by the worker
        out = prefect(["--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml"], env, REPO)
        root = tmp / "team-root"
        prefect(["variable", "set", "reflow_root", str(root)], env, REPO)  # set once for the team (docs/cloud.md)
        mlflow_uri = f"sqlite:///{tmp / 'mlflow.db'}"
        stack = {"api": api, "env": env, "root": root, "mlflow_uri": mlflow_uri, "logs": logs, "deploy_output": out,
                 "tmp": tmp, "worker_env": {**env, "REFLOW_REPO": str(REPO), "MLFLOW_TRACKING_URI": mlflow_uri,
                                            "PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_WORKER_PREFETCH_SECONDS": "5",
                                            **(worker_env or {})}}
        stack["worker"] = start_worker(stack, worker_limit)
        yield stack
    finally:
        stop(stack.get("worker"))  # a test may have replaced it
        stop(server)


def run_deployment(stack: dict, deployment: str, params: dict) -> str:
    """`prefect deployment run reflow/<deployment> --params ...`; the new flow run's id."""
    out = prefect(["deployment", "run", f"reflow/{deployment}", "--params", json.dumps(params)], stack["env"], REPO)
    match = re.search(r"UUID:\s*([0-9a-f-]{36})", out)
    if not match:
        raise RuntimeError(out)
    return match.group(1)


def flow_run(stack: dict, flow_run_id: str) -> dict:
    return get_json(f"{stack['api']}/flow_runs/{flow_run_id}")


def wait_for(predicate: Callable[[], bool], what: str, stack: dict, timeout: float = 300) -> None:
    """Poll until predicate() holds; fail with the worker's log if the worker exits or time runs out."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if stack["worker"].poll() is not None:
            raise AssertionError(f"worker exited:\n{tail(stack['logs']['worker'])}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}:\n{tail(stack['logs']['worker'], 8000)}")
        time.sleep(1)


def wait_state(stack: dict, flow_run_id: str, states: set[str], timeout: float = 420) -> dict:
    found: list[dict] = []

    def reached() -> bool:
        found[:] = [flow_run(stack, flow_run_id)]
        return found[0]["state"]["type"] in states

    wait_for(reached, f"flow run {flow_run_id} to reach {sorted(states)}", stack, timeout)
    return found[0]
