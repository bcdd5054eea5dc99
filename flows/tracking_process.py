"""The executors that run a tracker's MLflow calls in order, off the flow's path (`flows.tracking_queue` queues them),
and the tracking process's loop (`python -m flows.tracking_process`).

The executor owns an `MlflowTracker` (the one client of the store) and runs the calls one by one, in the order they
were made, in either of:

- `ProcessExecutor`, the tracking process (`python -m flows.tracking_process`): `reflow run` starts it first thing
  (`start_process`), so importing mlflow (~1.5 s), opening the store (~1 s), every write and preparing and doing
  the model's logging (torch, mlflow's pyfunc: ~2 s, while the first stage runs) are not work of the flow process,
  which never imports mlflow. It runs at nice `PROCESS_NICE` (`REFLOW_TRACKING_NICE` sets another), which orders
  it only against its own session's processes where Linux groups sessions (autogroup; docs/performance.md). A
  child of `reflow run` in its own session (a terminal's Ctrl-C goes to the flow, which ends its runs through it)
  that dies with it (PR_SET_PDEATHSIG) once it has written everything it received.
- `ThreadExecutor`, a thread of this process: a flow run without a tracking process (a deployment's flow run, a
  flow called from Python).

Crash safety: `close()` runs at the flow's end and on its failure (flows/reflow.py); the thread executor also drains
at interpreter exit (atexit). A SIGKILLed `reflow run` loses no call it has made: they are in the tracking
process's pipe, and it writes all of them before it exits. What a SIGKILL loses is what it lost before, the metrics
a stage's `MlflowStageCallback` has buffered since its last flush (at most `flush_every` or `flush_seconds` of them).
A SIGKILLed flow process with a thread executor (a deployment) loses besides those the calls still queued in it:
in steady state none, or the one being written, as each write takes ~10-30 ms and the queue is drained as it fills.
"""
from __future__ import annotations

import atexit
import contextlib
import ctypes
import importlib
import itertools
import logging
import os
import pickle
import queue
import signal
import subprocess
import sys
import threading
from concurrent.futures import Future
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Union

from flows.tracking import MlflowTracker

log = logging.getLogger(__name__)

REF = "mlflow-run:"  # a run named before it exists: `mlflow-run:parent`, `mlflow-run:teacher#2`
# the tracking process's CPU priority: below the flow process and its Prefect API server, whose start-up it would
# otherwise slow down on a 2-core machine, where the three start together (without autogroup: with it, the nice of a
# process alone in its session ranks it against nobody)
PROCESS_NICE = 5

# (kind, name, args, kwargs, ref): kind "init" (make the executor's tracker), "attr", "method" (of that tracker) or
# "fn" (name "module:qualname", called with the tracker first); ref: the REF name the result is kept under
Op = tuple[str, str, tuple, dict, Union[str, None]]
Answer = tuple[bool, Any]  # (ok, value or exception)


class TrackingProcessError(RuntimeError):
    """The tracking process is gone (killed, or it crashed); the message says what is known."""


class _Runner:
    """Runs ops on the executor's side against its own MlflowTracker; REF names in their arguments stand for the
    runs earlier ops opened."""

    def __init__(self) -> None:
        self.tracker: MlflowTracker | None = None
        self.refs: dict[str, str] = {}

    def _resolve(self, value: Any) -> Any:
        if isinstance(value, str) and value.startswith(REF):
            if value not in self.refs:
                raise RuntimeError(f"{value}: the call that was to open this MLflow run failed")
            return self.refs[value]
        return value

    def run(self, op: Op) -> Answer:
        kind, name, args, kwargs, ref = op
        try:
            args = tuple(self._resolve(a) for a in args)
            if kind == "init":
                self.tracker, value = MlflowTracker(*args, **kwargs), None
            elif kind == "attr":
                value = getattr(self.tracker, name)
            elif kind == "method":
                value = getattr(self.tracker, name)(*args, **kwargs)
            else:
                module, _, qualname = name.partition(":")
                fn: Any = importlib.import_module(module)
                for part in qualname.split("."):
                    fn = getattr(fn, part)
                value = fn(self.tracker, *args, **kwargs)
            if ref is not None:
                self.refs[ref] = value
        except Exception as e:  # noqa: BLE001 - handed to the flow process
            return False, e
        return True, value

    def stop(self) -> None:
        if self.tracker is not None:
            self.tracker.stop_system_metrics()


# --- executors ----------------------------------------------------------------------------------------------------
# Both: `request(op, wait)` queues an op and returns a Future of its answer; an op nobody waits for that fails is
# also put in `errors`, which the tracker raises at its next call. `close()` waits for every op, then stops.

class ThreadExecutor:
    """One thread of this process runs the ops in order. Drained at interpreter exit if not closed before."""

    def __init__(self, name: str = "mlflow-writer") -> None:
        self._queue: queue.SimpleQueue[tuple[Op | None, Future, bool]] = queue.SimpleQueue()
        self._runner = _Runner()
        self.errors: list[BaseException] = []
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()
        atexit.register(self.close)

    def _loop(self) -> None:
        while True:
            op, fut, wait = self._queue.get()
            if op is None:
                self._runner.stop()
                fut.set_result((True, None))
                return
            answer = self._runner.run(op)
            if not answer[0] and not wait:
                _warn(op, answer[1])
                self.errors.append(answer[1])
            fut.set_result(answer)

    def request(self, op: Op, wait: bool = False) -> Future:
        if self._closed:
            raise RuntimeError("this MLflow tracker was closed")
        fut: Future = Future()
        self._queue.put((op, fut, wait))
        return fut

    def close(self) -> Answer:
        if self._closed:
            return True, None
        self._closed = True
        fut: Future = Future()
        self._queue.put((None, fut, True))
        answer = fut.result()
        self._thread.join()
        atexit.unregister(self.close)
        return answer


def _warn(op: Op, e: BaseException) -> None:
    log.warning("MLflow: %s failed: %s: %s", op[1] or op[0], type(e).__name__, e)


def _start_child() -> None:  # runs in the child between fork and exec
    os.nice(int(os.environ.get("REFLOW_TRACKING_NICE", PROCESS_NICE)))
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: the flow process died


class ProcessExecutor:
    """The tracking process (`python -m flows.tracking_process`): ops go to it over a pipe, in order; answers and
    errors come back on another, read by a thread of this process."""

    def __init__(self) -> None:
        req_r, req_w = os.pipe()
        ans_r, ans_w = os.pipe()
        env = dict(os.environ)
        here = str(Path(__file__).resolve().parent.parent)  # where `flows` is, whatever the working directory
        env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
        # its torch only reads a checkpoint and samples 4 points to log the model: no thread team next to training
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "flows.tracking_process", str(req_r), str(ans_w)], pass_fds=(req_r, ans_w),
                env=env, stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_start_child)
        finally:
            os.close(req_r)
            os.close(ans_w)
        self._send = Connection(req_w, readable=False)
        self._recv = Connection(ans_r, writable=False)
        self._lock = threading.Lock()
        self._seq = itertools.count()
        self._waiting: dict[int, Future] = {}
        self._gone: BaseException | None = None
        self._closed = False
        self.errors: list[BaseException] = []
        self.store: str | None = None  # the URI it was told to open
        self._reader = threading.Thread(target=self._read, name="mlflow-answers", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                kind, seq, answer = pickle.loads(self._recv.recv_bytes())
            except (EOFError, OSError) as e:
                with self._lock:
                    code = self.process.poll()
                    self._gone = TrackingProcessError(
                        f"the MLflow tracking process (pid {self.process.pid}) has gone"
                        + (f" (exit status {code})" if code is not None else "") + f": {type(e).__name__}")
                    waiting, self._waiting = self._waiting, {}
                for fut in waiting.values():
                    fut.set_result((False, self._gone))
                return
            if kind == "error":
                self.errors.append(answer[1])
            if seq is not None:
                with self._lock:
                    fut = self._waiting.pop(seq)
                fut.set_result(answer)

    def _put(self, message: tuple, answered: bool) -> Future:
        """Send a message; answered: the process sends its answer back (else only its error, if it fails)."""
        fut: Future = Future()
        with self._lock:
            if self._gone is not None:
                raise self._gone
            seq = next(self._seq) if answered else None
            if answered:
                self._waiting[seq] = fut
            try:
                self._send.send((message[0], seq, *message[1:]))
            except OSError as e:
                self._waiting.pop(seq, None)
                raise TrackingProcessError(f"the MLflow tracking process (pid {self.process.pid}) has gone: "
                                           f"{e}") from None
        if not answered:
            fut.set_result((True, None))  # (as far as this side knows: a failure comes as an error)
        return fut

    def open_store(self, uri: str) -> None:
        """Have the process open (for a new sqlite file: create) the store now, before the flow asks for a run."""
        self.store = uri
        self._put(("open", uri), answered=False)

    def request(self, op: Op, wait: bool = False) -> Future:
        if self._closed:
            raise RuntimeError("this MLflow tracker was closed")
        return self._put(("op", op, wait), answered=wait or op[4] is not None)

    def close(self, timeout: float = 600.0) -> Answer:
        """Wait until the process has written every op; it then exits on its own."""
        if self._closed:
            return True, None
        self._closed = True
        atexit.unregister(self.close)
        try:
            answer = self._put(("close",), answered=True).result(timeout)
        except Exception as e:  # noqa: BLE001 - gone or stuck: reported to the caller
            answer = (False, e)
        with contextlib.suppress(OSError):
            self._send.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        return answer


Executor = Union[ThreadExecutor, ProcessExecutor]


# --- the tracking process `reflow run` starts -----------------------------------------------------------------------

_started: ProcessExecutor | None = None  # started by `start_process`, not yet taken by a tracker


def start_process() -> ProcessExecutor:
    """Start the tracking process now (`reflow run`, first thing): the flow's tracker takes it (`open_tracker`); one
    never taken is ended at exit."""
    global _started
    if _started is None:
        _started = ProcessExecutor()
        atexit.register(_started.close)
    return _started


def open_store_in_process(uri: str) -> bool:
    """Hand the store to open to the started tracking process, if there is one (tracking_store.open_store)."""
    if _started is None:
        return False
    _started.open_store(uri)
    return True


def take_started() -> ProcessExecutor | None:
    """The tracking process `start_process` started, handed to one tracker (`open_tracker`): None if there is none,
    it has gone, or a tracker took it already."""
    global _started
    executor, _started = _started, None
    return executor if executor is not None and executor.process.poll() is None else None


# --- the tracking process's side ------------------------------------------------------------------------------------

def serve(fd_in: int, fd_out: int) -> None:
    """The tracking process: run the ops from fd_in in order, answers to fd_out, until told to close or until the
    flow process is gone (the end of its pipe: everything it sent has been written by then)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # (own session: a terminal's Ctrl-C goes to the flow process)
    # the flow process died (PR_SET_PDEATHSIG): write what it sent (its pipe ends there), within a minute
    signal.signal(signal.SIGTERM, lambda *_: signal.alarm(60))
    recv, send = Connection(fd_in, writable=False), Connection(fd_out, readable=False)
    runner = _Runner()
    warm = True
    status = 0
    out: Connection | None = send
    try:
        from flows import tracking

        # mlflow (for a local store also its SQL stores: ~1 s more) while the flow process imports torch and prefect
        tracking.import_mlflow(store=not os.environ.get("MLFLOW_TRACKING_URI", "").startswith(("http:", "https:")))
        tracking.skip_requirement_check()
        while True:
            try:
                message = recv.recv()
            except (EOFError, OSError):
                break
            kind, seq = message[0], message[1]
            if kind == "open":
                try:
                    tracking.new_client(message[2])
                except Exception as e:  # noqa: BLE001 - the tracker's first call opens it again and raises
                    log.debug("opening %s: %s", message[2], e)
            elif kind == "op":
                op, wait = message[2], message[3]
                answer = runner.run(op)
                if not answer[0] and not wait:
                    _warn(op, answer[1])
                    out = _answer(out, "error", seq, answer)  # raised by the tracker's next call
                elif seq is not None:
                    out = _answer(out, "answer", seq, answer)
                if warm and op[1] == "open_child" and runner.tracker is not None:
                    # the first stage has its run: the model's logging is prepared now (a thread: the ops go on)
                    warm = False
                    from flows import serving  # (torch, through reflow_core.export)

                    threading.Thread(target=serving.prepare, args=(runner.tracker.tracking_uri,), name="warm-up",
                                     daemon=True).start()
            elif kind == "close":
                runner.stop()
                _answer(out, "answer", seq, (True, None))
                break
    except BaseException:  # a bug of this loop: said, and the flow process hears that the process has gone
        import traceback
        traceback.print_exc()
        status = 1
    finally:
        runner.stop()
        # everything is written (each write is its own committed transaction): skip the interpreter's teardown of
        # mlflow, sqlalchemy and torch (~1-2 s on the 2-core box), which nobody needs to wait for
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def _answer(send: Connection | None, kind: str, seq: int | None, answer: Answer) -> Connection | None:
    """Send an answer (kind "error": the failure of an op nobody waits for); None, no more answers, once the flow
    process is gone (the ops are still written)."""
    if send is None:
        return None
    try:
        payload = pickle.dumps((kind, seq, answer))
        pickle.loads(payload)  # an exception must also unpickle on the other side
    except Exception as e:  # noqa: BLE001 - what does not travel goes as text
        ok, value = answer
        what = value if isinstance(value, BaseException) else e
        payload = pickle.dumps((kind, seq, (False, RuntimeError(f"{type(what).__name__}: {what}"))))
    try:
        send.send_bytes(payload)
    except OSError:
        return None
    return send


if __name__ == "__main__":
    serve(int(sys.argv[1]), int(sys.argv[2]))
