"""The temporary Prefect API server `reflow run` starts for itself (flows/api_server.py)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

CHILD = """
import socket, sys, time
import flows.api_server as api
# the first port it picks is taken by the time the server binds it: the server is started again on another
taken = socket.socket(); taken.bind(("127.0.0.1", 0)); taken.listen()
free, picks = api._free_port, []
api._free_port = lambda: picks.append(1) or (taken.getsockname()[1] if len(picks) == 1 else free())
s = api.TemporaryServer().start()
warm = s.warm_up("reflow-warm-up-check")
url = s.wait(240)
warm.join(120)
assert len(picks) == 2 and url == s.api_url and s.port != taken.getsockname()[1], (picks, url)
print(s.process.pid, url, flush=True)
time.sleep(600)
"""


def test_the_server_dies_with_the_process_that_started_it(tmp_path, prefect_servers):
    """A `reflow run` killed with SIGKILL runs no exit handler: its server still goes (the kernel's parent-death
    signal), instead of holding the Prefect database and a port until someone notices. (Before that: a port taken
    between the probe and the bind makes `wait()` start the server again on another, whose URL it returns, and the
    warm-up has sent that server a flow run's first requests.)"""
    home = tmp_path / "prefect-home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PYTHONPATH=str(REPO), PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    child = subprocess.Popen([sys.executable, "-c", CHILD], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    try:
        pid, url = child.stdout.readline().split()
        with urllib.request.urlopen(f"{url}/health", timeout=10) as r:
            assert r.status == 200
        # the warm-up made the flow's record (the first thing a flow run asks for) once the server answered
        with urllib.request.urlopen(f"{url}/flows/name/reflow-warm-up-check", timeout=10) as r:
            assert json.loads(r.read())["name"] == "reflow-warm-up-check"
        assert prefect_servers(home) == [int(pid)]
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    deadline = time.monotonic() + 30
    while prefect_servers(home) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert prefect_servers(home) == []
