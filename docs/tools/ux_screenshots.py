"""Screenshots for docs/: the MLflow experiment table ranking two pipelines, and a Prefect flow run's artifacts.

Starts a real `prefect server` (with its UI) and runs two small toy pipelines against it with `reflow run` (the
Prefect flow, MLflow sqlite under the root): `toy2d` and `toy2d_baseline` (Simple ReFlow's improvements off), at
reduced sizes. Then opens `mlflow ui` on the root's store and both UIs in headless Chromium (Debian's chromium).

    .venv/bin/python docs/tools/ux_screenshots.py --out docs/img     # about 5 minutes on the 2-core box
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent
SMALL = ["--set", "teacher.train.steps=2000", "--set", "reflow.train.steps=1500", "--set", "pairs.n_pairs=8000",
         "--set", "eval.n_samples=2000"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def screenshot(url: str, out: Path, size: str = "1600,1000", budget_ms: int = 20000) -> None:
    """Headless Chromium, no network beyond localhost (the flags keep it from calling home)."""
    with tempfile.TemporaryDirectory(prefix="reflow-chromium-") as profile:
        subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        f"--user-data-dir={profile}", "--hide-scrollbars", f"--window-size={size}",
                        f"--virtual-time-budget={budget_ms}", f"--screenshot={out.resolve()}", url],
                       check=True, timeout=180, capture_output=True)
    print(out, url)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="docs/img")
    ap.add_argument("--work", default=None, help="keep the runs here (default: a temp dir)")
    a = ap.parse_args()
    out = Path(a.out)
    work = Path(a.work or tempfile.mkdtemp(prefix="reflow-ux-")).resolve()
    root = work / "runs"
    pport, mport = free_port(), free_port()
    env = {**os.environ, "PREFECT_HOME": str(work / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{work / 'prefect.db'}",
           "PREFECT_UI_API_URL": f"http://127.0.0.1:{pport}/api"}
    procs = []
    try:
        procs.append(subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                                       str(pport)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      start_new_session=True))
        wait_http(f"http://127.0.0.1:{pport}/api/health")
        env["PREFECT_API_URL"] = f"http://127.0.0.1:{pport}/api"
        for preset in ("toy2d_baseline", "toy2d"):
            subprocess.run([str(BIN / "reflow"), "run", "--preset", preset, "--root", str(root), *SMALL], env=env,
                           check=True)
        uri = f"sqlite:///{root / 'mlflow.db'}"
        procs.append(subprocess.Popen([str(BIN / "mlflow"), "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
                                       "--port", str(mport)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      start_new_session=True))
        wait_http(f"http://127.0.0.1:{mport}/health")
        from mlflow import MlflowClient

        exp = MlflowClient(uri).get_experiment_by_name("reflow").experiment_id
        q = urllib.parse.urlencode({"orderByKey": "metrics.`sliced_w2.reflow.euler.nfe1`", "orderByAsc": "true",
                                    "searchFilter": "tags.`reflow.kind` = 'pipeline'", "isComparingRuns": "false"})
        screenshot(f"http://127.0.0.1:{mport}/#/experiments/{exp}/runs?{q}", out / "mlflow_experiment_table.png")
        runs = json.loads(urllib.request.urlopen(urllib.request.Request(
            f"http://127.0.0.1:{pport}/api/flow_runs/filter", data=b"{}", method="POST",
            headers={"Content-Type": "application/json"})).read())
        toy = next(r for r in runs if r["name"] == "toy2d-toy2d")
        screenshot(f"http://127.0.0.1:{pport}/runs/flow-run/{toy['id']}?tab=Artifacts",
                   out / "prefect_flow_run_artifacts.png", size="1600,1400")
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, 15)
            except ProcessLookupError:
                pass


if __name__ == "__main__":
    main()
