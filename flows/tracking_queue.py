"""The flow's MLflow tracker: `flows.tracking.MlflowTracker`'s interface, with every store call run in order by one
executor, so the flow never waits for MLflow while the pipeline runs.

    tracker = open_tracker(uri, "reflow", rundir.dir, run_name=rundir.run, params=config)
    parent = tracker.parent_run_id()       # a name for the run at once; tracker.resolve(parent) waits for its id
    ...
    tracker.close()                        # every call is in the store when this returns

The executor owns an `MlflowTracker` (the one client of the store) and runs the calls one by one, in the order they
were made, in either of:

- `ProcessExecutor`, the tracking process (`python -m flows.tracking_queue`): `reflow run` starts it first thing
  (`start_process`), so importing mlflow (~1.5 s), opening the store (~1 s), every write and preparing and doing
  the model's logging (torch, mlflow's pyfunc: ~2 s, while the first stage runs) are not work of the flow process,
  which never imports mlflow. It runs at a lower CPU priority (`PROCESS_NICE`; `REFLOW_TRACKING_NICE` sets
  another), in the cycles the flow process and its Prefect API server leave. A child of `reflow run` in its own
  session (a terminal's Ctrl-C goes to the flow, which ends its runs through it) that dies with it
  (PR_SET_PDEATHSIG) once it has written everything it received.
- `ThreadExecutor`, a thread of this process: a flow run without a tracking process (a deployment's flow run, a
  flow called from Python).

Runs are named before they exist: `parent_run_id()` and `child_run_id(stage)` return a reference (`mlflow-run:...`)
at once, which every later call of this tracker may use as a run id (the executor puts the run's id in its place),
or the run's id once the executor has said it. `resolve(run_id)` waits for the id: the flow does at its end, for what
it prints and returns. What waits besides: the evaluation runs, the registered model versions and the experiment at
the end (`log_results`, `call`, `experiment_id`), which the flow uses. Metric timestamps are taken where a call is
made, so what is stored is what the synchronous tracker stored.

Errors: a run file the flow cannot use (`mlflow_run.json` torn or invalid) is still refused at `parent_run_id()`,
read here before anything is queued. A call that fails in the executor (an unreachable MLflow server, a full disk)
is raised by the next call of the tracker, or by `close()`: the flow still fails on a store that fails, a few
seconds later than before (the next metric flush, stage or artifact) instead of at the failing call itself.

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
from typing import Any, Callable, Mapping, Union

from flows.tracking import MlflowStageCallback, MlflowTracker, metric_rows, run_status
from flows.tracking_store import RUN_FILE, read_run_file
from reflow_core import storage

log = logging.getLogger(__name__)

REF = "mlflow-run:"  # a run named before it exists: `mlflow-run:parent`, `mlflow-run:teacher#2`
# the tracking process's CPU priority: below the flow process and its Prefect API server, whose start-up it would
# otherwise slow down on a 2-core machine, where the three start together
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
    """The tracking process (`python -m flows.tracking_queue`): ops go to it over a pipe, in order; answers and
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
                [sys.executable, "-m", "flows.tracking_queue", str(req_r), str(ans_w)], pass_fds=(req_r, ans_w),
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


def open_tracker(tracking_uri: str, experiment: str, run_dir_url: str, run_name: str | None = None,
                 artifact_root: str | None = None, params: Mapping[str, Any] | None = None) -> "QueuedTracker":
    """The flow's tracker: on the tracking process `reflow run` started (taken: one tracker per process), else on a
    thread of this process."""
    global _started
    executor: Executor
    if _started is not None and _started.process.poll() is None:
        executor, _started = _started, None
        if executor.store != tracking_uri:
            executor.open_store(tracking_uri)
    else:
        executor = ThreadExecutor()
    return QueuedTracker(executor, tracking_uri, experiment, run_dir_url, run_name, artifact_root, params)


# --- the tracker ----------------------------------------------------------------------------------------------------

class QueuedTracker:
    """MlflowTracker's interface (what the flow, its tasks and its publish task use), the store calls queued on an
    executor. Thread-safe. Pickled (a Dask shard's process), it becomes an MlflowTracker of the same runs."""

    def __init__(self, executor: Executor, tracking_uri: str, experiment: str, run_dir_url: str,
                 run_name: str | None = None, artifact_root: str | None = None,
                 params: Mapping[str, Any] | None = None):
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.run_dir_url = run_dir_url.rstrip("/")
        self.run_name = run_name or self.run_dir_url.rsplit("/", 1)[-1]
        self.artifact_root = artifact_root
        self.params = dict(params) if params else None
        self.settings = {"tracking_uri": tracking_uri, "experiment": experiment, "run_dir_url": self.run_dir_url,
                         "run_name": self.run_name, "artifact_root": artifact_root, "params": self.params}
        self.executor = executor
        self._lock = threading.RLock()
        self._count = itertools.count(1)
        self._runs: dict[str, Future] = {}  # REF -> the answer of the op opening it
        self._experiment_id: str | None = None
        self._parent: str | None = None
        self._children: dict[str, str] = {}
        self._callbacks: dict[str, MlflowStageCallback] = {}
        self._queue("init", "", (), self.settings)

    def __reduce__(self):
        return MlflowTracker.resumed, (self.settings, self.experiment_id, self.resolve(self.parent_run_id()),
                                       {stage: self.resolve(ref) for stage, ref in dict(self._children).items()})

    def _raise_failed(self) -> None:
        """Raise the first call that failed in the executor since the last check (the others, logged there, mostly
        follow from it: a run that could not be opened fails every call into it)."""
        errors = self.executor.errors
        if errors:
            first = errors[0]
            errors.clear()
            raise first

    def _queue(self, kind: str, name: str, args: tuple = (), kwargs: dict | None = None,
               ref: str | None = None) -> Future:
        self._raise_failed()
        return self.executor.request((kind, name, args, kwargs or {}, ref))

    def _wait(self, kind: str, name: str, *args, **kwargs) -> Any:
        self._raise_failed()
        ok, value = self.executor.request((kind, name, args, kwargs, None), wait=True).result()
        self._raise_failed()
        if not ok:
            raise value
        return value

    def _open(self, method: str, *args) -> str:
        ref = f"{REF}{args[0] if args else 'parent'}#{next(self._count)}"
        self._runs[ref] = self._queue("method", method, args, ref=ref)
        return ref

    def resolve(self, run_id: str) -> str:
        """The id of a run this tracker named (waits until the executor has opened it); any other id as it is."""
        fut = self._runs.get(run_id)
        if fut is None:
            return run_id
        ok, value = fut.result()
        if not ok:
            raise value
        return value

    def _known(self, ref: str) -> str:
        fut = self._runs[ref]
        if fut.done():
            ok, value = fut.result()
            if ok:
                return value
        return ref

    def when_opened(self, run_id: str, then: Callable[[str], Any]) -> None:
        """then(the run's id) once the executor has opened it (at once for an id; never if opening it failed)."""
        fut = self._runs.get(run_id)
        if fut is None:
            then(run_id)
            return

        def done(f: Future) -> None:
            ok, value = f.result()
            if ok:
                then(value)
        fut.add_done_callback(done)

    # -- runs --------------------------------------------------------------------------------------------------------
    @property
    def experiment_id(self) -> str:
        with self._lock:
            if self._experiment_id is None:
                self._experiment_id = self._wait("attr", "experiment_id")
            return self._experiment_id

    def parent_run_id(self) -> str:
        """The pipeline's parent run (as MlflowTracker.parent_run_id), named at once. The run file is read here: a
        torn or invalid one raises TrackingFileError now, before the flow does any work."""
        with self._lock:
            if self._parent is None:
                read_run_file(storage.join(self.run_dir_url, RUN_FILE))
                self._parent = self._open("parent_run_id")
            return self._known(self._parent)

    def child_run_id(self, stage: str) -> str:
        with self._lock:
            if stage not in self._children:
                ref = self._open("open_child", stage)
                if self.params:  # (MlflowTracker.child_run_id logs them when it opens the run)
                    self._queue("method", "log_params", (ref, self.params))
                self._children[stage] = ref
            return self._known(self._children[stage])

    def stage_callback(self, stage: str) -> MlflowStageCallback:
        with self._lock:
            if stage not in self._callbacks:
                self._callbacks[stage] = MlflowStageCallback(self, stage, self.child_run_id(stage))
            return self._callbacks[stage]

    def finish(self, stage: str | None, status: str = "FINISHED") -> None:
        status = run_status(status)
        with self._lock:
            if stage is not None:
                cb = self._callbacks.pop(stage, None)
                if cb is not None:
                    cb.flush()
                self._children.pop(stage, None)  # a later use of this stage re-opens the run
            self._queue("method", "finish", (stage, status))

    def finish_open(self, status: str) -> None:
        """Every stage run still open, then the parent, ended with status (the pipeline failed). Waits; an error of
        the store is logged, not raised: the flow is failing with its own."""
        with self._lock:
            for cb in self._callbacks.values():
                with contextlib.suppress(Exception):
                    cb.flush()
            self._callbacks.clear()
            self._children.clear()
            try:
                self.executor.errors.clear()
                ok, value = self.executor.request(("method", "finish_open", (status,), {}, None), wait=True).result()
                if not ok:
                    raise value
            except Exception as e:  # noqa: BLE001
                log.warning("MLflow: could not end the open runs as %s: %s: %s", status, type(e).__name__, e)

    # -- logging -----------------------------------------------------------------------------------------------------
    def log_params(self, run_id: str, config: Mapping[str, Any]) -> None:
        self._queue("method", "log_params", (run_id, dict(config)))

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
        self._queue("method", "log_metric_rows", (run_id, metric_rows(metrics, step)))

    def log_metric_rows(self, run_id: str, rows: list[tuple[str, float, int, int]]) -> None:
        self._queue("method", "log_metric_rows", (run_id, list(rows)))

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        self._queue("method", "set_tags", (run_id, {str(k): str(v) for k, v in tags.items()}))

    def log_artifact(self, run_id: str, path: str, artifact_path: str | None = None) -> None:
        self._queue("method", "log_artifact", (run_id, path, artifact_path))

    @contextlib.contextmanager
    def system_metrics(self, run_id: str, every_s: float = 5.0):
        self._queue("method", "start_system_metrics", (run_id, every_s))
        try:
            yield
        finally:
            self._queue("method", "stop_system_metrics")

    # -- results (waited for) ----------------------------------------------------------------------------------------
    def has_metric(self, run_id: str, prefix: str) -> bool:
        return self._wait("method", "has_metric", run_id, prefix)

    def eval_run_ids(self, models: list[str]) -> dict[str, str]:
        return self._wait("method", "eval_run_ids", models)

    def log_results(self, rows: list[dict], metric: str, wall_seconds: Mapping[str, float]) -> dict[str, str]:
        return self._wait("method", "log_results", rows, metric, dict(wall_seconds))

    def call(self, fn: Callable, *args, **kwargs) -> Any:
        """fn(the executor's MlflowTracker, *args, **kwargs) where the store is (fn: a module-level function)."""
        return self._wait("fn", f"{fn.__module__}:{fn.__qualname__}", *args, **kwargs)

    # -- the end -----------------------------------------------------------------------------------------------------
    def flush(self) -> None:
        """Wait until every call made so far is in the store (raises one that failed)."""
        with self._lock:
            for cb in list(self._callbacks.values()):
                cb.flush()
        self._wait("method", "close")  # (MlflowTracker.close does nothing: this waits for the calls before it)

    def close(self) -> None:
        """Flush, then end the executor (the tracking process exits). Raises a call that failed."""
        with self._lock:
            for cb in list(self._callbacks.values()):
                cb.flush()
            self._callbacks.clear()
        ok, value = self.executor.close()
        self._raise_failed()
        if not ok:
            raise value


Tracker = Union[MlflowTracker, QueuedTracker]


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
