"""Screenshots for docs/: the MLflow experiment table ranking two pipelines, and a Prefect flow run's artifacts.

Starts a real `prefect server` (with its UI) and runs two small toy pipelines against it with `reflow run` (the
Prefect flow, MLflow sqlite under the root): `toy2d` and `toy2d_baseline` (Simple ReFlow's improvements off), at
reduced sizes. Then opens `mlflow ui` on the root's store, and drives both UIs in headless Chromium (Debian's
chromium) with Playwright, as a user would: sort and pick columns in MLflow, open the Artifacts tab in Prefect.

    apt-get install chromium; python3 -m venv /tmp/pw && /tmp/pw/bin/pip install playwright   # not a project dep
    PYTHONPATH=.venv/lib/python3.11/site-packages /tmp/pw/bin/python docs/tools/ux_screenshots.py --out docs/img
    # about 6 minutes on the 2-core box; --work DIR keeps (and on a second call reuses) the runs
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

BIN = Path(__file__).resolve().parents[2] / ".venv" / "bin"  # the project's prefect, reflow and mlflow
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


def browser(pw):
    """Headless Chromium, no network beyond localhost (the flags keep it from calling home)."""
    return pw.chromium.launch(executable_path="/usr/bin/chromium", args=[
        "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"])


def mlflow_table(pw, url: str, columns: list[str], out: Path) -> None:
    """The experiment's runs table as loaded from url (filter and sort in it), with `columns` shown."""
    page = browser(pw).new_page(viewport={"width": 1500, "height": 900})
    page.goto(url)
    page.wait_for_timeout(6000)
    page.get_by_role("button", name="Columns", exact=True).click()
    page.wait_for_timeout(800)
    for name in ["Dataset", "Source", "Models", *columns]:  # hide three empty attribute columns, show the metrics
        item = page.get_by_text(name, exact=True).last
        item.scroll_into_view_if_needed()
        item.click()
        page.wait_for_timeout(300)
    page.keyboard.press("Escape")
    if page.get_by_role("button", name="Close", exact=True).count():  # the assistant side panel
        page.get_by_role("button", name="Close", exact=True).click()
    page.wait_for_timeout(1500)
    page.screenshot(path=str(out), clip={"x": 0, "y": 0, "width": 1500, "height": 340})
    print(out, url)


def prefect_artifacts(pw, url: str, out: Path, summary_out: Path) -> None:
    """The flow run page's Artifacts tab, then the summary artifact opened."""
    page = browser(pw).new_page(viewport={"width": 1500, "height": 900})
    page.goto(url)
    page.wait_for_timeout(5000)
    page.get_by_role("tab", name="Artifacts").click() if page.get_by_role("tab", name="Artifacts").count() else \
        page.get_by_text("Artifacts", exact=True).first.click()
    page.wait_for_timeout(3000)
    page.screenshot(path=str(out), full_page=True)
    print(out, url)
    page.get_by_text("summary", exact=False).first.click()
    page.wait_for_timeout(4000)
    page.set_viewport_size({"width": 1500, "height": 1600})
    page.screenshot(path=str(summary_out))
    print(summary_out, page.url)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="docs/img")
    ap.add_argument("--work", default=None, help="keep the runs here (default: a temp dir)")
    a = ap.parse_args()
    out = Path(a.out)
    work = Path(a.work or tempfile.mkdtemp(prefix="reflow-ux-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
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
        if not (root / "toy2d" / "eval" / "metrics.json").exists():
            for preset in ("toy2d_baseline", "toy2d"):
                subprocess.run([str(BIN / "reflow"), "run", "--preset", preset, "--root", str(root), *SMALL], env=env,
                               check=True)
        uri = f"sqlite:///{root / 'mlflow.db'}"
        procs.append(subprocess.Popen([str(BIN / "mlflow"), "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
                                       "--port", str(mport)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      start_new_session=True))
        wait_http(f"http://127.0.0.1:{mport}/health")
        from mlflow import MlflowClient
        from playwright.sync_api import sync_playwright

        exp = MlflowClient(uri).get_experiment_by_name("reflow").experiment_id
        q = urllib.parse.urlencode({"orderByKey": "metrics.`sliced_w2.reflow.euler.nfe1`", "orderByAsc": "true",
                                    "searchFilter": "tags.`reflow.kind` = 'pipeline'",
                                    "workflowType": "machine_learning"})
        runs = json.loads(urllib.request.urlopen(urllib.request.Request(
            f"http://127.0.0.1:{pport}/api/flow_runs/filter", data=b"{}", method="POST",
            headers={"Content-Type": "application/json"})).read())
        toy = next(r for r in runs if r["name"] == "toy2d-toy2d")
        with sync_playwright() as pw:
            mlflow_table(pw, f"http://127.0.0.1:{mport}/#/experiments/{exp}/runs?{q}",
                         ["sliced_w2.reflow.euler.nfe1", "sliced_w2.reflow.euler.nfe2", "sliced_w2.teacher.euler.nfe1",
                          "straightness.reflow", "wall_seconds.reflow"], out / "mlflow_experiment_table.png")
            prefect_artifacts(pw, f"http://127.0.0.1:{pport}/runs/flow-run/{toy['id']}",
                              out / "prefect_flow_run_artifacts.png", out / "prefect_summary_artifact.png")
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, 15)
            except ProcessLookupError:
                pass


if __name__ == "__main__":
    main()
