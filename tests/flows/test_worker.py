"""`reflow worker`'s stop (flows/worker.py) against real processes: the worker's children (its flow runs, each in a
session of its own) get SIGTERM and are waited for before the worker is stopped. (tests/e2e/test_deployment.py runs
`reflow worker` with a real Prefect worker and flow run.)"""
from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

from helpers import REPO

from flows.worker import child_pids, stop_runs_then_worker

# a flow run: on SIGTERM it takes a moment to record its state (here: a file), then exits
CHILD = textwrap.dedent("""
    import signal, sys, time
    def stop(*_):
        time.sleep(0.5)
        open(sys.argv[1], "w").write("stopped cleanly")
        sys.exit(1)
    signal.signal(signal.SIGTERM, stop)
    open(sys.argv[1] + ".started", "w").close()
    time.sleep(120)
""")
# a worker: starts two flow runs in their own sessions; when it gets SIGTERM it notes whether they were still alive
WORKER = textwrap.dedent("""
    import os, signal, subprocess, sys, time
    runs = [subprocess.Popen([sys.executable, "-c", sys.argv[1], f"{sys.argv[2]}/run{i}"], start_new_session=True)
            for i in range(2)]
    def stop(*_):
        open(f"{sys.argv[2]}/worker", "w").write(" ".join(str(r.poll()) for r in runs))
        sys.exit(0)
    signal.signal(signal.SIGTERM, stop)
    time.sleep(120)
""")


def test_the_runs_stop_cleanly_before_the_worker(tmp_path):
    worker = subprocess.Popen([sys.executable, "-c", WORKER, CHILD, str(tmp_path)], start_new_session=True)
    deadline = time.monotonic() + 30
    while not all((tmp_path / f"run{i}.started").exists() for i in range(2)):
        assert time.monotonic() < deadline and worker.poll() is None
        time.sleep(0.05)
    runs = child_pids(worker.pid)
    assert len(runs) == 2
    t0 = time.monotonic()
    stop_runs_then_worker(worker, grace=10, log=lambda m: None)
    assert worker.returncode == 0 and time.monotonic() - t0 < 10
    assert [(tmp_path / f"run{i}").read_text() for i in range(2)] == ["stopped cleanly"] * 2
    # the worker was stopped after its runs had exited (each with its own status), not before
    assert (tmp_path / "worker").read_text() == "1 1"
    assert child_pids(worker.pid) == []


def test_a_run_that_ignores_sigterm_does_not_hold_the_worker_past_the_grace(tmp_path):
    stubborn = CHILD.replace("signal.signal(signal.SIGTERM, stop)", "signal.signal(signal.SIGTERM, signal.SIG_IGN)")
    worker = subprocess.Popen([sys.executable, "-c", WORKER, stubborn, str(tmp_path)], start_new_session=True)
    deadline = time.monotonic() + 30
    while not all((tmp_path / f"run{i}.started").exists() for i in range(2)):
        assert time.monotonic() < deadline and worker.poll() is None
        time.sleep(0.05)
    runs = child_pids(worker.pid)
    t0 = time.monotonic()
    stop_runs_then_worker(worker, grace=1.0, log=lambda m: None)
    assert worker.returncode == 0 and 1.0 <= time.monotonic() - t0 < 10
    assert (tmp_path / "worker").read_text() == "None None"  # still running when the worker was stopped
    for pid in runs:  # (clean up the stubborn runs)
        subprocess.run(["kill", "-KILL", str(pid)], check=False)


def _ignored(status: str) -> set[int]:
    """The signals a /proc/<pid>/status text says are ignored."""
    mask = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigIgn:")), 16)
    return {n for n in range(1, 65) if mask >> (n - 1) & 1}


def test_a_worker_started_in_the_background_still_gets_sigint(tmp_path):
    """`reflow worker ... &` from a script starts with SIGINT ignored; the worker it starts must not inherit that, as
    Prefect stops a process worker with SIGINT (one that ignored it kept taking flow runs until it was killed)."""
    report = tmp_path / "worker-status"
    child = f"import pathlib; pathlib.Path({str(report)!r}).write_text(open('/proc/self/status').read())"
    supervisor = textwrap.dedent(f"""
        import signal, sys
        from flows.worker import supervise
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # as a background job starts
        sys.exit(supervise([sys.executable, "-c", {child!r}], grace=5))
    """)
    out = subprocess.run([sys.executable, "-c", supervisor], cwd=REPO, capture_output=True, text=True, timeout=60,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert out.returncode == 0, out.stderr
    assert signal.SIGINT not in _ignored(report.read_text())
