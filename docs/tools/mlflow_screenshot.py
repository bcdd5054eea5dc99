"""Screenshot the MLflow UI comparing a run's teacher and reflow stage runs (for docs/; needs Debian's chromium).

    .venv/bin/python docs/tools/mlflow_screenshot.py --root runs --run toy2d --out docs/img/mlflow_compare.png
"""
import argparse
import json
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

from mlflow import MlflowClient


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True)
    ap.add_argument("--run", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--page", choices=["compare", "experiment"], default="compare")
    a = ap.parse_args()
    root = Path(a.root).resolve()
    uri = f"sqlite:///{root}/mlflow.db"
    parent = json.loads((root / a.run / "mlflow_run.json").read_text())["run_id"]
    client = MlflowClient(uri)
    exp = client.get_run(parent).info.experiment_id
    kids = client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent}'")
    ids = [r.info.run_id for r in kids if r.info.run_name in ("teacher", "reflow")]
    port = free_port()
    ui = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "ui", "--backend-store-uri", uri,
                           "--host", "127.0.0.1", "--port", str(port)], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        if a.page == "compare":
            q = urllib.parse.urlencode({"runs": json.dumps(ids), "experiments": json.dumps([exp])})
            url = f"http://127.0.0.1:{port}/#/compare-runs?{q}"
        else:
            url = f"http://127.0.0.1:{port}/#/experiments/{exp}"
        subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        "--user-data-dir=/tmp/reflow-chromium", "--hide-scrollbars", "--window-size=1400,2000",
                        "--virtual-time-budget=15000", f"--screenshot={Path(a.out).resolve()}", url],
                       check=True, timeout=120, capture_output=True)
        print(a.out, url)
    finally:
        ui.terminate()


if __name__ == "__main__":
    main()
