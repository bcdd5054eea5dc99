"""A temporary Prefect API server for one `reflow run`, started before the heavy imports.

Without `PREFECT_API_URL`, Prefect's ephemeral mode starts a local API server (uvicorn in a subprocess) the first
time the flow needs it: after `import prefect`, torch and mlflow, so the run waits for it. `reflow run` starts the
same server itself, first thing, so it comes up on another core while this process imports and prepares the MLflow
store; the flow then talks to it through `PREFECT_API_URL`, and it is stopped when the command ends. Once it
answers, a background thread sends it the first requests a flow run makes, so it pays their one-time costs while
this process is still importing.

Same command and settings as Prefect's ephemeral server (`prefect.server.api.server.SubprocessASGIServer`):
`uvicorn --factory prefect.server.api.server:create_app` with the UI off and the ephemeral service set, on the
database of `PREFECT_HOME`; once that database has had Prefect's block types registered (its memo store says so),
the server skips registering them again at start (importing every installed Prefect collection to hash their block
types: ~0.4 s of its start-up; a flow run uses no block type). On Linux the server also dies with this process
(PR_SET_PDEATHSIG), so a killed `reflow run` leaves no server behind.
"""
from __future__ import annotations

import ctypes
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

# the exit status uvicorn uses when its port was taken between our probe and its bind: try another port
_PORT_IN_USE = 3
_PORT_TRIES = 5


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _blocks_registered(env: dict) -> bool:
    """Whether the server's database (PREFECT_HOME's, no other configured) has had the block types registered: the
    memo store Prefect writes after registering them (`$PREFECT_HOME/memo_store.toml`) says so."""
    if any(k in env for k in ("PREFECT_API_DATABASE_CONNECTION_URL", "PREFECT_SERVER_DATABASE_CONNECTION_URL",
                              "PREFECT_SERVER_REGISTER_BLOCKS_ON_START", "PREFECT_API_BLOCKS_REGISTER_ON_START")):
        return False
    home = Path(env.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()
    memo = Path(env.get("PREFECT_SERVER_MEMO_STORE_PATH") or env.get("PREFECT_MEMO_STORE_PATH")
                or home / "memo_store.toml").expanduser()
    try:
        return "block_auto_registration" in memo.read_text(encoding="utf-8")
    except OSError:
        return False


def _die_with_parent() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


# What a flow run asks a fresh server first. Each costs the new server 0.1-0.4 s once (imports, first queries) and
# then ~10 ms; all are reads, except creating the flow's record, which the flow run does anyway (by name, idempotent).
_WARM_UP = (("GET", "/admin/version", None), ("POST", "/flow_runs/filter", {"limit": 1}),
            ("POST", "/task_runs/filter", {"limit": 1}))


class TemporaryServer:
    """`start()` returns at once; `warm_up()` primes it in the background; `wait()` blocks until /api/health
    answers; `stop()` ends it."""

    def __init__(self) -> None:
        self.port: int | None = None
        self.process: subprocess.Popen | None = None
        self._app_dir = ""

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def start(self) -> "TemporaryServer":
        spec = importlib.util.find_spec("prefect")  # where prefect is, without importing it (that takes seconds)
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError("prefect is not installed")
        self._app_dir = str(Path(list(spec.submodule_search_locations)[0]).parent)
        self._spawn()
        return self

    def _spawn(self) -> None:
        self.port = _free_port()
        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
               "PREFECT__SERVER_FINAL": "1"}
        env.pop("PREFECT_API_URL", None)
        if _blocks_registered(env):
            env.setdefault("PREFECT_SERVER_REGISTER_BLOCKS_ON_START", "false")
            env.setdefault("PREFECT_SERVER_MEMOIZE_BLOCK_AUTO_REGISTRATION", "false")
        args = [sys.executable, "-m", "uvicorn", "--app-dir", self._app_dir, "--factory",
                "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port),
                "--log-level", "error", "--lifespan", "on"]
        # its output (errors only) goes where ours goes, as with Prefect's own ephemeral server
        # its own session: a signal to the run's process group (infrastructure's SIGTERM, Ctrl-C's SIGINT) reaches
        # the flow, which records its final state through this server, and not the server; it dies with us instead
        self.process = subprocess.Popen(args, env=env, stdin=subprocess.DEVNULL, start_new_session=True,
                                        preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)

    def warm_up(self, flow_name: str) -> threading.Thread:
        """In a background thread, once the server answers: the first requests a flow run makes (`_WARM_UP`, and
        creating the flow `flow_name`), so the server pays its first-request costs while this process is still
        importing rather than while the flow run waits. Best effort: any error ends the warm-up quietly."""
        def run() -> None:
            deadline = time.monotonic() + 120.0
            while not self._healthy():  # (wait() alone restarts a server whose port was taken)
                proc = self.process
                if proc is None or proc.poll() not in (None, _PORT_IN_USE) or time.monotonic() > deadline:
                    return
                time.sleep(0.25)  # (each try costs both processes CPU while they start up)
            try:
                for method, path, body in (*_WARM_UP, ("POST", "/flows/", {"name": flow_name})):
                    req = urllib.request.Request(f"{self.api_url}{path}", method=method,
                                                 data=None if body is None else json.dumps(body).encode(),
                                                 headers={"Content-Type": "application/json"})
                    with urllib.request.urlopen(req, timeout=30) as r:
                        r.read()
            except Exception:  # noqa: BLE001 - the flow run makes the same requests and reports their errors
                pass

        thread = threading.Thread(target=run, name="prefect-server-warm-up", daemon=True)
        thread.start()
        return thread

    def wait(self, timeout: float = 120.0) -> str:
        """Block until the server answers /api/health; returns the API URL."""
        assert self.process is not None, "start() first"
        deadline, tries = time.monotonic() + timeout, 1
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code == _PORT_IN_USE and tries < _PORT_TRIES:
                tries += 1
                self._spawn()
                continue
            if code is not None:
                raise RuntimeError(f"the temporary Prefect API server exited with status {code} (its errors are "
                                   "printed above)")
            if self._healthy():
                return self.api_url
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"the temporary Prefect API server did not answer within {timeout:.0f} s "
                           "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS sets the limit)")

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    def stop(self, timeout: float = 5.0) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
