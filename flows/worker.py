"""`reflow worker`: a Prefect process worker that passes a stop signal on to its flow runs before it stops.

`prefect worker start` runs each flow run in a process of its own session, and when the worker is stopped (SIGTERM
to its process group from a supervisor, a drained VM, `timeout`; Ctrl-C) it kills them with SIGKILL without
recording their state: they stay Running in the API, holding their run directories' leases, and nothing re-runs
them. `reflow worker ARGS...` runs `prefect worker start ARGS...` as its child and, on SIGTERM or SIGINT, first sends
SIGTERM to each flow-run process the worker started. Prefect's engine stops a flow run on SIGTERM cleanly (final
state Crashed, lease released), so the deployment's resume trigger (flows/resume.py) re-runs it wherever a worker is
alive. After the flow runs exit (or `grace` seconds) the worker itself is stopped.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

DEFAULT_GRACE_S = 25.0


def child_pids(pid: int) -> list[int]:
    """The direct children of `pid` (Linux /proc): a process worker's children are its flow-run processes."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        if int(stat[stat.rindex(")") + 2:].split()[1]) == pid:
            out.append(int(entry.name))
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"  # a zombie has exited


def _signal(pid: int, sig: int, group: bool = False) -> None:
    try:
        (os.killpg if group else os.kill)(pid, sig)
    except ProcessLookupError:
        pass


def stop_runs_then_worker(worker: subprocess.Popen, grace: float, log=print) -> None:
    """SIGTERM to each flow-run process of the worker; wait for them up to `grace` s; then stop the worker."""
    runs = child_pids(worker.pid)
    for pid in runs:
        _signal(pid, signal.SIGTERM)
    if runs:
        log(f"reflow worker: sent SIGTERM to {len(runs)} flow run process(es) {runs}; waiting up to {grace:.0f} s")
    deadline = time.monotonic() + grace
    while any(_alive(pid) for pid in runs) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [pid for pid in runs if _alive(pid)]
    if left:
        log(f"reflow worker: flow run process(es) {left} still running after {grace:.0f} s; stopping the worker")
    _signal(worker.pid, signal.SIGTERM, group=True)
    try:
        worker.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        _signal(worker.pid, signal.SIGKILL, group=True)
        worker.wait()


def run(worker_args: list[str], grace: float = DEFAULT_GRACE_S) -> int:
    """Run `prefect worker start worker_args` until it exits, or until SIGTERM / SIGINT stops runs then worker."""
    if not sys.platform.startswith("linux"):
        raise SystemExit("reflow worker needs Linux (/proc); elsewhere use `prefect worker start`")
    return supervise([str(Path(sys.executable).parent / "prefect"), "worker", "start", *worker_args], grace)


def supervise(cmd: list[str], grace: float = DEFAULT_GRACE_S) -> int:
    """Run the worker command `cmd` in a session of its own until it exits (its status), or until SIGTERM / SIGINT
    (128 + the signal) stops its flow runs, then it (`stop_runs_then_worker`)."""
    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum, frame) -> None:
        received.append(signum)
        stop.set()

    # ours before the worker starts: it then starts with both signals at their defaults (a handler is not inherited),
    # even when this process was started with SIGINT ignored (a background job: `reflow worker ... &`, nohup),
    # which the worker would inherit, and with it ignore the SIGINT that Prefect stops it with
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    # its own session: a signal to our group reaches us, and we decide what the worker's runs get first
    worker = subprocess.Popen(cmd, start_new_session=True)
    while worker.poll() is None and not stop.wait(0.5):
        pass
    if stop.is_set() and worker.poll() is None:
        print(f"reflow worker: received {signal.Signals(received[0]).name}", flush=True)
        stop_runs_then_worker(worker, grace, log=lambda m: print(m, flush=True))
        return 128 + received[0]
    return worker.returncode
